"""mapnet.files: single files replaced atomically, folders committed whole under a lock, and
the verifying reader."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from interrupts import killed_at_call
from mapnet import files
from mapnet.errors import CheckpointError

MANIFEST = "m.json"
# Every step of a commit that changes what is on disk, as a kill would find it.
STEPS = [
    (os, "fsync"),
    (os, "rename"),
    (os, "replace"),
    (os, "unlink"),
    (files, "_exchange"),
    (shutil, "rmtree"),
]


def commit_version(target: Path, version: str, **options: float) -> None:
    with files.commit(target, MANIFEST, {"version": version}, **options) as staging:
        (staging / "data.bin").write_bytes(version.encode() * 100)
        (staging / "nested").mkdir()
        (staging / "nested" / "more.bin").write_bytes(version.encode())


def version_of(target: Path) -> str:
    verified = files.read_verified(target, MANIFEST)
    version = verified.manifest["version"]
    assert verified.contents == {
        "data.bin": version.encode() * 100,
        "nested/more.bin": version.encode(),
    }
    return version


def test_a_commit_lists_every_file_with_its_size_and_sha256_and_leaves_nothing_beside_it(
    tmp_path: Path,
) -> None:
    commit_version(tmp_path / "t", "one")
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    assert manifest == {
        "version": "one",
        "files": {
            "data.bin": {"size": 300, "sha256": hashlib.sha256(b"one" * 100).hexdigest()},
            "nested/more.bin": {"size": 3, "sha256": hashlib.sha256(b"one").hexdigest()},
        },
    }
    commit_version(tmp_path / "t", "two")
    assert version_of(tmp_path / "t") == "two"
    assert os.listdir(tmp_path) == ["t"]  # no lock file, staging folder or old version


def test_write_json_writes_exactly_json_dumps_with_indent_2(tmp_path: Path) -> None:
    data = {"b": [1, 2.5, None], "a": {"é": "x"}}
    files.write_json(tmp_path / "deep" / "r.json", data)
    assert (tmp_path / "deep" / "r.json").read_bytes() == json.dumps(data, indent=2).encode()
    files.atomic_write_bytes(tmp_path / "deep" / "r.json", b"new")
    assert os.listdir(tmp_path / "deep") == ["r.json"]
    assert (tmp_path / "deep" / "r.json").read_bytes() == b"new"


def test_an_error_in_the_block_keeps_the_previous_version(tmp_path: Path) -> None:
    commit_version(tmp_path / "t", "one")
    with pytest.raises(RuntimeError, match="boom"), files.commit(tmp_path / "t", MANIFEST) as s:
        (s / "data.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert version_of(tmp_path / "t") == "one"
    assert os.listdir(tmp_path) == ["t"]


def test_a_commit_may_hold_a_committed_folder(tmp_path: Path) -> None:
    """A run's state folder holding a checkpoint: the inner commit's lock and staging stay
    inside the outer staging folder and leave nothing there but the inner folder."""
    with files.commit(tmp_path / "state", "state.json", {"epoch": 3}) as staging:
        commit_version(staging / "model", "inner")
        (staging / "trainer.bin").write_bytes(b"t")
    verified = files.read_verified(tmp_path / "state", "state.json")
    assert sorted(verified.contents) == [
        "model/data.bin",
        "model/m.json",
        "model/nested/more.bin",
        "trainer.bin",
    ]
    assert version_of(tmp_path / "state" / "model") == "inner"


def test_a_folder_with_files_no_version_lists_is_refused_not_replaced(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that no version of it lists \(notes"):
        commit_version(project, "one")
    assert os.listdir(project) == ["notes.txt"]
    assert os.listdir(tmp_path) == ["project"]


def test_a_manifest_named_by_the_caller_is_refused() -> None:
    with pytest.raises(ValueError, match="a manifest name must be a relative path"):
        files.commit("x", "../m.json").__enter__()
    with pytest.raises(ValueError, match="'files' table is written by commit"):
        files.commit("x", MANIFEST, {"files": {}}).__enter__()


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "in_a").touch()
    (tmp_path / "b").mkdir()
    if not files._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system or file system has no RENAME_EXCHANGE")
    assert os.listdir(tmp_path / "b") == ["in_a"]
    assert os.listdir(tmp_path / "a") == []


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    if swap == "two renames":  # as on a system without RENAME_EXCHANGE
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    # A kill, not a power cut: fsync need not reach the disk here, only count as a step.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    target = tmp_path / "t"
    seen, read_from = set(), set()
    for n, after in ((n, after) for n in itertools.count(1) for after in (False, True)):
        commit_version(target, "old")
        if not killed_at_call(lambda: commit_version(target, "new"), STEPS, n, after=after):
            break
        seen.add(version_of(target))  # what a reader finds right after the kill
        read_from.add(files.read_verified(target, MANIFEST).folder.name)
        commit_version(target, "next")  # the next writer mends and cleans up
        assert version_of(target) == "next"
        assert os.listdir(tmp_path) == ["t"]
    assert n > 10  # fsyncs, the swap, the removal of the old version file by file
    assert seen == {"old", "new"}
    # With two renames a reader must find the old version beside the target at some point.
    assert read_from == ({"t", ".t.old"} if swap == "two renames" else {"t"})


def test_a_second_process_waits_for_the_lock_then_fails_naming_the_holders_pid(
    tmp_path: Path,
) -> None:
    target, report = tmp_path / "t", tmp_path / "report.txt"

    def second_writer() -> None:
        started = time.monotonic()
        try:
            commit_version(target, "second", lock_timeout=0.3)
        except files.InUseError as error:
            report.write_text(f"{time.monotonic() - started:.2f} {error.pid} {error}")

    with files.lock(target):
        assert files.lock_file_of(target).read_text() == f"{os.getpid()}\n"
        assert not killed_at_call(second_writer, [], 1)
    waited, pid, message = report.read_text().split(" ", 2)
    assert float(waited) >= 0.3
    assert int(pid) == os.getpid()
    assert message.startswith(f"{target} is in use by pid {os.getpid()}: its lock ")
    assert not files.lock_file_of(target).exists()  # removed on release
    commit_version(target, "free")  # and free again
    assert version_of(target) == "free"


def test_a_waiting_writer_proceeds_once_the_holder_is_done(tmp_path: Path) -> None:
    target, holding = tmp_path / "t", threading.Event()

    def hold() -> None:
        with files.lock(target):
            holding.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    started = time.monotonic()
    commit_version(target, "after", lock_timeout=10)
    holder.join()
    assert time.monotonic() - started >= 0.2
    assert version_of(target) == "after"


def test_a_thread_holding_a_lock_may_commit_under_it(tmp_path: Path) -> None:
    with files.lock(tmp_path / "t"), files.lock(tmp_path / "t"):
        commit_version(tmp_path / "t", "inside")
        assert files.lock_file_of(tmp_path / "t").exists()
    assert not files.lock_file_of(tmp_path / "t").exists()
    assert version_of(tmp_path / "t") == "inside"


def test_a_lock_refuses_a_negative_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout must be >= 0"), files.lock(tmp_path, -1):
        pass


def test_the_next_writer_removes_stale_staging_folders_and_restores_a_cut_swap(
    tmp_path: Path,
) -> None:
    commit_version(tmp_path / "t", "old")
    (tmp_path / ".t.staging-killed").mkdir()
    (tmp_path / ".t.staging-killed" / "data.bin").write_bytes(b"half")
    (tmp_path / "t").rename(tmp_path / ".t.old")  # cut between the two renames
    assert version_of(tmp_path / "t") == "old"  # readers take the sibling
    files.lock_file_of(tmp_path / "t").write_text("999999\n")  # left by the killed writer
    commit_version(tmp_path / "t", "new")
    assert version_of(tmp_path / "t") == "new"
    assert os.listdir(tmp_path) == ["t"]


def _manifest_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        result = change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest if result is None else result))

    return edit


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "data.bin").read_bytes())
    data[7] ^= 1
    (folder / "data.bin").write_bytes(bytes(data))


def _folder_for_file(folder: Path) -> None:
    (folder / "nested" / "more.bin").unlink()
    (folder / "nested" / "more.bin").mkdir()


DAMAGE = {
    "no manifest": (
        lambda f: (f / MANIFEST).unlink(),
        r"m.json not found: \S+ is not a committed folder",
    ),
    "truncated manifest": (
        lambda f: (f / MANIFEST).write_bytes((f / MANIFEST).read_bytes()[:40]),
        r"m.json is not valid JSON \(truncated or edited\?\)",
    ),
    "manifest is a list": (
        lambda f: (f / MANIFEST).write_text("[1, 2]"),
        "m.json is not a JSON object but a list",
    ),
    "no files table": (
        _manifest_edit(lambda m: m.pop("files")),
        "m.json has no 'files' table",
    ),
    "path outside the folder": (
        _manifest_edit(lambda m: m["files"].update({"../x": m["files"]["data.bin"]})),
        r"m.json: '../x' is not a relative path inside the folder",
    ),
    "size not a number": (
        _manifest_edit(lambda m: m["files"]["data.bin"].update(size="300")),
        r"m.json: the size of data.bin is '300', not a byte count",
    ),
    "digest not hex": (
        _manifest_edit(lambda m: m["files"]["data.bin"].update(sha256="abc")),
        r"m.json: the sha256 of data.bin is 'abc', not a hex digest",
    ),
    "entry not an object": (
        _manifest_edit(lambda m: m["files"].update({"data.bin": 3})),
        "the entry of data.bin is not a JSON object",
    ),
    "listed file missing": (
        lambda f: (f / "nested" / "more.bin").unlink(),
        "corrupt: nested/more.bin is missing",
    ),
    "listed file is a folder": (_folder_for_file, "corrupt: nested/more.bin is missing"),
    "truncated file": (
        lambda f: (f / "data.bin").write_bytes(b"x" * 50),
        "corrupt: data.bin has 50 bytes, m.json lists 300",
    ),
    "flipped bit": (_flip_a_byte, "corrupt: data.bin does not match the checksum in m.json"),
    "unlisted file": (
        lambda f: (f / "nested" / "extra.txt").write_text("?"),
        "corrupt: nested/extra.txt is not listed in m.json",
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_kind_of_damage_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path, kind: str
) -> None:
    edit, message = DAMAGE[kind]
    commit_version(tmp_path / "t", "one")
    edit(tmp_path / "t")
    for reader in (files.read_verified, files.verify):
        with pytest.raises(CheckpointError, match=message):
            reader(tmp_path / "t", MANIFEST)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is not a mapnet checkpoint folder"):
        files.verify(tmp_path / "nowhere", MANIFEST, what="a mapnet checkpoint")


def test_a_manifest_older_than_the_files_table_is_read_through_its_own_digests(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"abc")
    (folder / MANIFEST).write_text(json.dumps({"sha": hashlib.sha256(b"abc").hexdigest()}))

    def legacy(file: Path, manifest: dict) -> dict[str, str | None]:
        assert file == folder / MANIFEST
        return {"data.bin": manifest.get("sha")}

    verified = files.read_verified(folder, MANIFEST, legacy=legacy)
    assert verified.contents == {"data.bin": b"abc"}
    (folder / "data.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match=r"data\.bin does not match the checksum"):
        files.read_verified(folder, MANIFEST, legacy=legacy)
    with pytest.raises(CheckpointError, match="has no 'files' table"):
        files.read_verified(folder, MANIFEST)
