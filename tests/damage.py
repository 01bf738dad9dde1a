"""Damaging a committed folder the way a careful forger would: edit its files, then `reseal`
it, recomputing the manifest's files table, so that only the reader's own checks of what the
files hold can catch the edit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save


def reseal(folder: Path, manifest: str) -> None:
    """Rewrite the files table of `folder`'s manifest to match the files as they are now."""
    description = json.loads((folder / manifest).read_text())
    table = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != manifest):
        data = file.read_bytes()
        name = file.relative_to(folder).as_posix()
        table[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    description["files"] = table
    (folder / manifest).write_text(json.dumps(description))


def edit_tensors(
    folder: Path, file: str, manifest: str, edit: Callable[[dict[str, torch.Tensor]], Any]
) -> None:
    """`edit` the tensors of `folder/file` in place (its result is ignored), then reseal."""
    tensors = load_file(str(folder / file))
    edit(tensors)
    (folder / file).write_bytes(save(tensors))
    reseal(folder, manifest)


def edit_manifest(folder: Path, manifest: str, edit: Callable[[dict[str, Any]], Any]) -> None:
    """`edit` the manifest in place (its result is ignored), then reseal it."""
    description = json.loads((folder / manifest).read_text())
    edit(description)
    (folder / manifest).write_text(json.dumps(description))
    if "files" in description:
        reseal(folder, manifest)
