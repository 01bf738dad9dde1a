"""Study rows that each run in a fresh process and leave one result file (the fine-tuning
studies): a finished row is skipped, a row is locked while it runs, so processes started with
the same command share a stage, and a deadline stops between rows."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from mapnet import files


class Row(Protocol):
    """A dataclass row with an id, rebuilt from its JSON form by `from_dict`."""

    id: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row: ...


Runner = Callable[[str, Any, Path, bool], dict[str, Any]]


def in_fresh_process(
    run_row: Callable[..., dict[str, Any]], stage: str, row: Row, root: Path, progress: bool
) -> dict[str, Any]:
    """`run_row(stage, row, root, progress=…)` in a fresh Python, so the row's peak RSS and
    allocator state are its own. The function and the row's class are named from the objects
    themselves: a move cannot leave a string behind."""
    code = (
        f"import json, sys; from pathlib import Path; "
        f"from {run_row.__module__} import {run_row.__qualname__} as run; "
        f"from {type(row).__module__} import {type(row).__qualname__} as Row; "
        "row = Row.from_dict(json.loads(sys.argv[2])); "
        "print(json.dumps(run(sys.argv[1], row, Path(sys.argv[3]), progress=sys.argv[4] == '1')))"
    )
    row_json = json.dumps(dataclasses.asdict(row))  # type: ignore[call-overload]
    command = [sys.executable, "-c", code, stage, row_json, str(root), "1" if progress else "0"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"row {stage}/{row.id} failed (exit {finished.returncode})")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_rows(
    study: str,
    stage: str,
    rows: Sequence[Row],
    root: Path,
    runner: Runner,
    deadline: float | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run every row of `stage` not finished yet (<root>/<stage>/<id>.json, written
    atomically); returns the result files of the finished rows. A row another process holds is
    left to it."""
    done = []
    for row in rows:
        out = root / stage / f"{row.id}.json"
        if out.exists():
            done.append(out)
            continue
        if deadline is not None and time.monotonic() > deadline:
            print(f"{study}: --hours reached; {row.id} and later wait", file=sys.stderr)
            break
        try:
            with files.lock(out):
                if out.exists():  # finished by another process meanwhile
                    done.append(out)
                    continue
                print(f"{study}: {stage}/{row.id}", file=sys.stderr, flush=True)
                files.write_json(out, runner(stage, row, root, progress))
                done.append(out)
        except files.InUseError:
            continue  # another process runs it
    return done
