"""docs/api.md from the library's public docstrings: `python -m mapnet_experiments.apidocs`
(`make docs`) writes it, and a test checks that the committed page is current.

Public means: the names in a module's `__all__`, or, for a module without one, the functions and
classes it defines whose names do not start with an underscore; for a class, the methods and
properties it defines itself (not those it inherits, e.g. from torch.nn.Module). Each entry is
its signature and its docstring as written (in a text block: the docstrings lay out tables and
code by indentation)."""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# The library's public modules, in the order the page shows them.
MODULES = (
    "mapnet",
    "mapnet.files",
    "mapnet.compress",
    "mapnet.export",
    "mapnet.loss",
    "mapnet.projections",
    "mapnet.checks",
)
OUT = Path("docs/api.md")


class _Written(str):
    """An annotation as written in the source (a string under `from __future__ import
    annotations`), shown without quotes."""

    def __repr__(self) -> str:
        return str(self)


def signature(obj: Callable[..., Any], method: bool = False) -> str:
    """`(a: int, b: str = 'x') -> bool`, annotations as written; '' when there is none. A
    method's `self` or `cls` is left out, and so is a class's `-> None`."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    if method and sig.parameters:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    if inspect.isclass(obj):
        sig = sig.replace(return_annotation=inspect.Signature.empty)

    def written(annotation: Any) -> Any:
        if annotation is inspect.Parameter.empty:
            return annotation
        return _Written(
            annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
        )

    parameters = [p.replace(annotation=written(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=parameters, return_annotation=written(sig.return_annotation)))


def public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return sorted(names, key=lambda n: (n[0].islower(), n.lower()))
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    )


def _doc(obj: Any) -> list[str]:
    doc = inspect.getdoc(obj)
    return ["", "```text", *doc.splitlines(), "```"] if doc else []


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            yield name, value.__func__
        elif inspect.isfunction(value) or isinstance(value, property):
            yield name, value


def entry(qualified: str, value: Any) -> list[str]:
    """A name's section: heading with its signature, docstring, and a class's own members."""
    if inspect.isclass(value):
        lines = [f"### class `{qualified}{signature(value)}`", *_doc(value)]
        for name, member in _members(value):
            if isinstance(member, property):
                lines += ["", f"#### property `{name}`", *_doc(member)]
            else:
                lines += ["", f"#### `{name}{signature(member, method=True)}`", *_doc(member)]
        return lines
    if callable(value):
        return [f"### `{qualified}{signature(value)}`", *_doc(value)]
    return [f"### `{qualified}`", "", f"`{value!r}`"]


def page() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the public docstrings by `python -m mapnet_experiments.apidocs` (`make "
        "docs`); do not edit by hand. What each name is for, with examples: [guide.md](guide.md).",
        "",
        "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in MODULES) + ".",
    ]
    for name in MODULES:
        module = importlib.import_module(name)
        lines += ["", f"## {name}", *_doc(module)]
        for public in public_names(module):
            lines += ["", *entry(f"{name}.{public}", getattr(module, public))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mapnet_experiments.apidocs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=OUT, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
