"""The error every mapnet reader raises for a file, folder or state it cannot trust."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or state dict that is missing, corrupt, edited, or made for another model or
    mapping."""
