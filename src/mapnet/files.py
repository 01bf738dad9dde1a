"""Every file and folder mapnet writes: single files replaced atomically, and folders committed
whole under a lock, with a manifest that lets a reader check every byte before it parses any.

    atomic_write_bytes(path, data)      replace one file in one rename (old or new, never a mix)
    write_json(path, data)              the same for json.dumps(data, indent=2)
    commit_file(path, data)             atomic_write_bytes under the file's lock
    with lock(path): ...                an advisory lock beside `path` naming its holder's pid
    with commit(target, "m.json", fields) as staging: ...   write a folder, swap it in whole
    read_verified(target, "m.json")     the manifest and every file's bytes, each checked
    verify(target, "m.json")            the same checks, streaming, without keeping the bytes

A committed folder and what lies beside it, for `commit("run/ckpt", "mapnet.json", fields)`:

    run/ckpt/mapnet.json        the manifest: `fields` plus "files", a table of every other file
                                (relative POSIX paths, nested folders included), each
                                {"size": bytes, "sha256": hex digest}
    run/ckpt/...                the files the caller wrote
    run/.ckpt.lock              the lock file while a writer holds it (it holds the pid)
    run/.ckpt.staging-<random>  a commit being written; one left by a killed writer is removed
                                by the next writer
    run/.ckpt.old               only where the folder swap needs two renames (below), between
                                them: then this one is the current version

The swap: on Linux, renameat2(RENAME_EXCHANGE) exchanges the staging folder and the target in
one step and the old version (now at the staging name) is deleted after. The first commit to a
target is one plain rename. Where the exchange is unsupported (another OS, a file system that
answers EINVAL or ENOSYS), the target is renamed to `.<name>.old` and the staging folder to the
target: a reader that finds no target but that sibling reads the sibling, and the next writer
renames it back before anything else. Files and folders are fsynced before the swap and the
parent after it. So a writer killed at any instant leaves the old or the new folder loadable.

Locks: `commit` waits up to COMMIT_LOCK_TIMEOUT for another writer of the same target (a
commit is short, so waiting for one to end is the useful answer) and then raises InUseError
naming the holder's pid. `lock` itself defaults to no wait: a lock held around a whole job
(a training run in a folder) is held for hours, and a second one should be told at once. The
kernel drops a killed holder's lock. Where fcntl is missing (Windows), `lock` excludes no
other writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mapnet.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

COMMIT_LOCK_TIMEOUT = 10.0  # seconds a commit waits for another writer of its target
FILES = "files"  # the manifest's table of files
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_READ_ATTEMPTS = 3  # a reader racing a writer's swap starts again, at most this often


class InUseError(TimeoutError):
    """Another process (or thread) holds the lock of `path`; `pid` is its process id (None where
    the lock file does not say yet)."""

    def __init__(self, path: Path, pid: int | None, lock_file: Path, waited: float):
        holder = "an unknown pid" if pid is None else f"pid {pid}"
        if pid == os.getpid():
            holder += " (this process, another thread)"
        super().__init__(
            f"{path} is in use by {holder}: its lock {lock_file} was held for the "
            f"{waited:g} s this writer waited"
        )
        self.path, self.pid, self.lock_file = path, pid, lock_file


# ---------------------------------------------------------------- single files


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` (folders created) so that readers see the old file or the new
    one, never a mix: a temporary file beside it, fsynced, renamed over it, the folder fsynced."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(file.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """`json.dumps(data, indent=2)` written atomically (`atomic_write_bytes`)."""
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def commit_file(
    path: str | os.PathLike[str], data: bytes, *, lock_timeout: float | None = None
) -> None:
    """`atomic_write_bytes` under `lock(path)`: a second writer of the same file waits up to
    `lock_timeout` seconds (None: COMMIT_LOCK_TIMEOUT), then fails naming the first one."""
    wait = COMMIT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with lock(path, timeout=wait):
        atomic_write_bytes(path, data)


# ---------------------------------------------------------------- locks

# The locks this process holds, by lock file: ((pid, thread), depth). A thread may take a lock it
# holds again (a caller holding lock(folder) that commits that folder); flock would wait on
# itself. The pid: a forked child inherits this table but not the lock.
_held: dict[str, tuple[tuple[int, int], int]] = {}
_held_guard = threading.Lock()


def lock_file_of(path: str | os.PathLike[str]) -> Path:
    """The lock file of `path`: `.<name>.lock` beside it."""
    target = Path(path)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def lock(path: str | os.PathLike[str], timeout: float = 0.0) -> Iterator[None]:
    """Hold the advisory lock of `path` (a file or folder, which need not exist) for the block.

    Another holder makes this wait up to `timeout` seconds, then raise InUseError naming the
    holder's pid. Re-entrant within a thread. The lock file is removed on release."""
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    target = Path(path)
    lock_file = lock_file_of(target)
    key = os.path.abspath(lock_file)
    me = (os.getpid(), threading.get_ident())
    with _held_guard:
        holder, depth = _held.get(key, (None, 0))
        if holder == me:
            _held[key] = (me, depth + 1)
    if holder == me:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(target, lock_file, timeout)
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        _release(fd, lock_file)


def _acquire(target: Path, lock_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            pid = _pid_in(fd)
            os.close(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                raise InUseError(target, pid, lock_file, timeout)
            time.sleep(min(0.02, left))
            continue
        # The holder we waited for removed the file on release: this lock is on a file no one
        # else will open. Lock the one that is there now.
        try:
            current = os.stat(lock_file)
            opened = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pid_in(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _release(fd: int, lock_file: Path) -> None:
    # Removed while still held, so a waiter that then gets the removed file notices and retries
    # (without fcntl there is no waiter, and an open file cannot be removed on Windows).
    if fcntl is not None:
        lock_file.unlink(missing_ok=True)
    os.close(fd)
    if fcntl is None:
        lock_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- committed folders


def staging_prefix(target: Path) -> str:
    """How the names of `target`'s staging folders begin."""
    return f".{target.name}.staging-"


def old_of(target: Path) -> Path:
    """Where the two-rename swap keeps the previous version between its renames."""
    return target.parent / f".{target.name}.old"


@contextlib.contextmanager
def commit(
    target: str | os.PathLike[str],
    manifest_name: str,
    fields: Mapping[str, Any] | None = None,
    *,
    lock_timeout: float | None = None,
) -> Iterator[Path]:
    """Write the folder `target` whole: the block writes its files (nested folders allowed)
    into the staging folder it is given; when the block ends, the manifest `manifest_name`
    (`fields`, read then, plus the files table) is written, everything is fsynced and the
    folder swapped in (see the module docstring). An exception in the block leaves `target` as
    it was. Holds `lock(target)` throughout, waiting up to `lock_timeout` seconds (None:
    COMMIT_LOCK_TIMEOUT).

    An existing target is replaced only if every file in it is listed in its manifest, is the
    manifest, or has a name the new version writes too: a folder holding other files (a
    project folder given by mistake) is refused, not deleted."""
    target = Path(target)
    if target.is_symlink():  # the folder it points to is the one replaced
        target = target.resolve()
    _check_relative(manifest_name)
    if FILES in (fields or {}):
        raise ValueError(f"the manifest's {FILES!r} table is written by commit(), not given")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait = COMMIT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with lock(target, timeout=wait):
        recover(target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=staging_prefix(target)))
        try:
            yield staging
            if (staging / manifest_name).exists():
                raise ValueError(f"{manifest_name} is written by commit(); write the other files")
            table = _hash_and_sync(staging)
            manifest = {**(fields or {}), FILES: table}
            with open(staging / manifest_name, "xb") as handle:
                handle.write(json.dumps(manifest, indent=2).encode())
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_folders(staging)
            _refuse_foreign_files(target, manifest_name, set(table))
            _swap(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def recover(target: str | os.PathLike[str]) -> None:
    """Mend what a killed writer left beside `target`: a two-rename swap cut between its renames
    (the previous version is put back) or after them (its leftover removed), and staging
    folders. Only a writer holding `lock(target)` may call it; `commit` does."""
    target = Path(target)
    old = old_of(target)
    if os.path.lexists(old):
        if os.path.lexists(target):
            shutil.rmtree(old)
        else:
            os.rename(old, target)
            _fsync_dir(target.parent)
    prefix = staging_prefix(target)
    for stale in target.parent.glob(glob.escape(prefix) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _refuse_foreign_files(target: Path, manifest_name: str, new_files: set[str]) -> None:
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: refusing to replace it")
    listed = set(new_files) | {manifest_name}
    with contextlib.suppress(OSError, ValueError):  # an unreadable manifest lists nothing
        manifest = json.loads((target / manifest_name).read_bytes())
        if isinstance(manifest, dict) and isinstance(manifest.get(FILES), dict):
            listed |= set(manifest[FILES])
    foreign = sorted(name for name in _walk(target) if name not in listed)
    if foreign:
        raise FileExistsError(
            f"{target} holds files that no version of it lists ({', '.join(foreign[:5])}"
            f"{', …' if len(foreign) > 5 else ''}): refusing to replace the folder; save to "
            "an empty or new folder"
        )


def _swap(staging: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    if _exchange(staging, target):
        _fsync_dir(target.parent)
        shutil.rmtree(staging)  # the previous version, now at the staging name
        return
    old = old_of(target)
    os.rename(target, old)
    _fsync_dir(target.parent)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step (Linux renameat2 with RENAME_EXCHANGE); False
    where the system or file system does not support it."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _walk(folder: Path) -> list[str]:
    """Every entry of `folder` that is not a folder, as a relative POSIX path."""
    names = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        names += [(base / name).as_posix() for name in files]
        # os.walk lists symbolic links to folders among `dirs` and does not enter them
        names += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return names


def _hash_and_sync(staging: Path) -> dict[str, dict[str, Any]]:
    table = {}
    for name in sorted(_walk(staging)):
        file = staging / name
        if file.is_symlink() or not file.is_file():
            raise ValueError(f"a committed folder holds files and folders only; {name} is not")
        digest, size = hashlib.sha256(), 0
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(handle.fileno())
        table[name] = {"size": size, "sha256": digest.hexdigest()}
    return table


def _fsync_folders(staging: Path) -> None:
    for root, _, _ in os.walk(staging, topdown=False):
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere
        return
    fsync(folder)


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's or folder's data and metadata to disk (os.fsync on a fresh handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- verified reading


@dataclass(frozen=True)
class Verified:
    """A committed folder that passed every check.

    folder: where it was read (the target, or `.<name>.old` beside it after a cut swap).
    manifest: the manifest, a JSON object. contents: every listed file's bytes by relative
    path (`read_verified`; empty from `verify`)."""

    folder: Path
    manifest: dict[str, Any]
    contents: dict[str, bytes] = field(default_factory=dict)


# A manifest without a files table (a format older than the files table) names what it checks
# instead, given the manifest's path and content: {relative path: sha256, or None for a file
# written without one}; or it raises CheckpointError.
Legacy = Callable[[Path, dict[str, Any]], Mapping[str, str | None]]


def current(target: str | os.PathLike[str]) -> Path:
    """The folder that holds `target`'s current version: the target, or `.<name>.old` while a
    two-rename swap is cut between its renames."""
    target = Path(target)
    old = old_of(target)
    if not os.path.lexists(target) and os.path.isdir(old):
        return old
    return target


def read_verified(
    target: str | os.PathLike[str],
    manifest_name: str,
    *,
    what: str = "a committed",
    legacy: Legacy | None = None,
) -> Verified:
    """The manifest of `target` and the bytes of every file it lists, after checking them all
    (`verify`). Every failure is a CheckpointError naming the file and what is wrong."""
    return _verified(Path(target), manifest_name, what, legacy, keep=True)


def verify(
    target: str | os.PathLike[str],
    manifest_name: str,
    *,
    what: str = "a committed",
    legacy: Legacy | None = None,
) -> Verified:
    """Check a committed folder before anything in it is parsed: the manifest exists and is a
    JSON object with a files table; every listed file exists with its size and sha256; no file
    is unlisted. `what` names the kind of folder in messages ("a mapnet checkpoint folder").
    A manifest without a files table is read through `legacy` (else refused): its files are
    checked by the digests it returns, unlisted files allowed."""
    return _verified(Path(target), manifest_name, what, legacy, keep=False)


def _verified(
    target: Path, manifest_name: str, what: str, legacy: Legacy | None, keep: bool
) -> Verified:
    for attempt in range(_READ_ATTEMPTS):
        folder = current(target)
        before = _identity(folder)
        try:
            return _read_once(folder, manifest_name, what, legacy, keep)
        except CheckpointError:
            # A writer swapped a new version in while this one was read: read that one.
            if attempt + 1 == _READ_ATTEMPTS or _identity(current(target)) in (before, None):
                raise
    raise AssertionError("unreachable")


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(folder)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def read_manifest(folder: Path, manifest_name: str, what: str) -> dict[str, Any]:
    """The manifest of `folder` as a JSON object, or a CheckpointError saying why not."""
    file = folder / manifest_name
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found: {folder} is not {what} folder") from None
    except OSError as error:
        raise CheckpointError(f"{file} cannot be read: {error}") from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON (truncated or edited?): {error}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file} is not a JSON object but a {type(manifest).__name__}")
    return manifest


def _read_once(
    folder: Path,
    manifest_name: str,
    what: str,
    legacy: Legacy | None,
    keep: bool,
) -> Verified:
    manifest = read_manifest(folder, manifest_name, what)
    file = folder / manifest_name
    table = manifest.get(FILES)
    if table is None and legacy is not None:
        expected = {
            _relative(file, name): (None, digest) for name, digest in legacy(file, manifest).items()
        }
        strict = False
    elif not isinstance(table, dict):
        raise CheckpointError(f"{file} has no {FILES!r} table of its folder's files")
    else:
        expected = {
            _relative(file, name): _entry(file, name, entry) for name, entry in table.items()
        }
        strict = True
    problems, contents = [], {}
    for name, (size, digest) in expected.items():
        path = folder / name
        if name == manifest_name or not path.is_file() or path.is_symlink():
            problems.append(f"{name} is missing")
            continue
        try:
            actual_size, actual_digest, data = _read_file(path, keep)
        except OSError as error:
            problems.append(f"{name} cannot be read ({error})")
            continue
        if size is not None and actual_size != size:
            problems.append(f"{name} has {actual_size} bytes, {manifest_name} lists {size}")
        elif digest is not None and actual_digest != digest:
            problems.append(f"{name} does not match the checksum in {manifest_name}")
        elif keep:
            contents[name] = data
    if strict:
        unlisted = sorted(set(_walk(folder)) - set(expected) - {manifest_name})
        problems += [f"{name} is not listed in {manifest_name}" for name in unlisted]
    if problems:
        shown = "; ".join(problems[:6]) + ("; …" if len(problems) > 6 else "")
        raise CheckpointError(
            f"{folder} is corrupt: {shown} (a file was truncated, edited, added, removed or "
            "belongs to another save)"
        )
    return Verified(folder, manifest, contents)


def _relative(file: Path, name: object) -> str:
    if not isinstance(name, str) or not _is_relative(name):
        raise CheckpointError(f"{file}: {name!r} is not a relative path inside the folder")
    return name


def _entry(file: Path, name: str, entry: object) -> tuple[int, str]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{file}: the entry of {name} is not a JSON object")
    size, digest = entry.get("size"), entry.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CheckpointError(f"{file}: the size of {name} is {size!r}, not a byte count")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise CheckpointError(f"{file}: the sha256 of {name} is {digest!r}, not a hex digest")
    return size, digest


def _is_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return (
        bool(name)
        and not path.is_absolute()
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _check_relative(name: str) -> None:
    if not isinstance(name, str) or not _is_relative(name):
        raise ValueError(f"a manifest name must be a relative path, got {name!r}")


def _read_file(path: Path, keep: bool) -> tuple[int, str, bytes]:
    digest, size, parts = hashlib.sha256(), 0, []
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                parts.append(chunk)
    return size, digest.hexdigest(), b"".join(parts)
