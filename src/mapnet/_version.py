"""The package version, in a module of its own so that any module of mapnet may import it."""

__version__ = "0.3.0"
