"""What every bench stands on: measurements in fresh processes, the machine they ran on, and the
header, progress lines and closing of a results file.

A measurement is a module-level function that returns a JSON-able dict. `in_subprocess` runs it
in a fresh Python, so peak RSS (VmHWM) belongs to that measurement alone and nothing is warm
from the previous one. The fresh process finds the function by its "package.module:function"
name, taken from the function object itself (`qualified_name`): a renamed or moved function
breaks where it is passed, at import time, and a name given as text is resolved and checked
(`resolve`) before any process starts.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

import mapnet
from mapnet.files import write_json

T = TypeVar("T")
Measurement = Callable[..., dict[str, Any]]
# How a bench calls one measurement: run(measurement, **kwargs) -> its result (see `runner`).
Runner = Callable[..., dict[str, Any]]

# ---------------------------------------------------------------- fresh processes


def qualified_name(function: Callable[..., Any]) -> str:
    """'package.module:function': what a fresh process imports to call `function`."""
    name = f"{function.__module__}:{function.__qualname__}"
    if function.__module__ == "__main__" or "." in function.__qualname__:
        raise ValueError(f"{name}: a fresh process can only import a module-level function")
    return name


def resolve(name: str) -> Measurement:
    """The function that 'package.module:function' names; a wrong name fails naming it."""
    module_name, colon, function_name = name.partition(":")
    if not (colon and module_name and function_name):
        raise ValueError(f"{name!r} is not a 'package.module:function' name")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise  # the module exists; one of its own imports failed
        raise LookupError(f"{name!r}: there is no module {module_name}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise LookupError(f"{name!r}: {module_name} has no function {function_name}")
    return function


def in_subprocess(
    function: Measurement | str, /, *, env: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`function(**kwargs)` in a fresh Python; `function` is the function or its
    'package.module:function' name; `env` adds variables."""
    name = function if isinstance(function, str) else qualified_name(function)
    resolve(name)  # a wrong name fails here, not in the fresh process
    code = (
        "import json, sys; from mapnet_experiments.bench.harness import resolve; "
        "print(json.dumps(resolve(sys.argv[1])(**json.loads(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=None if env is None else os.environ | env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name}({kwargs}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def runner(smoke: bool, env: dict[str, str] | None) -> Runner:
    """How a bench calls one measurement: in a fresh process, or (smoke) in this one."""

    def run(measurement: Measurement, /, **kwargs: Any) -> dict[str, Any]:
        if not smoke:
            return in_subprocess(measurement, env=env, **kwargs)
        threads_before = torch.get_num_threads()
        try:  # through JSON, as from a subprocess
            return json.loads(json.dumps(measurement(**kwargs)))
        finally:
            torch.set_num_threads(threads_before)  # the measurement set its own

    return run


def measure(
    run: Runner,
    started: float,
    what: str,
    measurement: Measurement,
    figures: Callable[[dict[str, Any]], str],
    /,
    **kwargs: Any,
) -> dict[str, Any]:
    """One measurement of a bench, said as it runs: `[elapsed s] what ... figures`."""
    announce(started, what)
    result = run(measurement, **kwargs)
    print(figures(result), flush=True)
    return result


# -------------------------------------------------------------------- the process


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


# glibc returns freed blocks above its mmap threshold to the kernel, so every training step
# re-faults its activations page by page (≈3,500 minor faults per CNN2 step, a quarter of its
# time, and the main source of process-to-process spread). A 1 GiB threshold keeps them.
MALLOC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def malloc_env() -> dict[str, str | None]:
    """The glibc malloc settings of MALLOC_TUNED_ENV as this process has them (None: unset)."""
    return {name: os.environ.get(name) for name in MALLOC_TUNED_ENV}


def minor_faults() -> int:
    """Minor page faults of this process so far (a page first touched after an mmap)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def set_threads(threads: int | None) -> None:
    """torch's thread count for a measurement (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def start_measurement(threads: int | None) -> dict[str, Any]:
    """Set torch's thread count for a measurement (None: leave torch's default); what it runs
    under, for its result: that thread count and the load average as it starts."""
    set_threads(threads)
    return {"threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# -------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_bytes() -> int:
    """The machine's memory (0 where /proc/meminfo cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load() -> dict[str, Any]:
    """The machine's load right now: other jobs on a 2-core machine move every timing."""
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        uptime = ""
    return {"uptime": uptime, "loadavg": list(os.getloadavg())}


# torch's own thread count in a fresh process here (read before any measurement sets its own).
DEFAULT_THREADS = torch.get_num_threads()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": memory_total_bytes(),
        "threads": torch.get_num_threads(),
        "default_threads": DEFAULT_THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mapnet": mapnet.__version__,
    }


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------ thread counts


def thread_counts(threads: int | Sequence[int | None] | None) -> list[int | None]:
    """`threads` as a list of thread counts (None: torch's default), each once, in order."""
    counts = list(threads) if isinstance(threads, (list, tuple)) else [threads]
    for count in counts:
        if count is not None and count <= 0:
            raise ValueError(f"thread counts must be > 0, got {count}")
    return list(dict.fromkeys(counts)) or [None]


def resolved_threads(counts: list[int | None]) -> list[int]:
    """Each count with None replaced by torch's default here."""
    return [DEFAULT_THREADS if c is None else c for c in counts]


def threads_label(counts: list[int | None]) -> int | list[int]:
    """What `machine()["threads"]` records: the one count, or the list side by side."""
    resolved = resolved_threads(counts)
    return resolved[0] if len(resolved) == 1 else resolved


def threads_text(count: int | None) -> str:
    count = DEFAULT_THREADS if count is None else count
    return f"{count} thread{'s' if count != 1 else ''}"


def row_threads(data: dict[str, Any], row: dict[str, Any]) -> int | None:
    """The thread count a results row was measured at (older runs: the machine's, if one)."""
    threads = row.get("threads", data["machine"].get("threads"))
    return threads if isinstance(threads, int) else None


# ------------------------------------------------------------------------- rounds


def in_round_order(items: Sequence[T], round_index: int) -> list[T]:
    """`items` in the order of round `round_index`: ABC CBA ABC …, so that slow drift of a shared
    machine hits every item alike."""
    return list(items[::-1] if round_index % 2 else items)


def compared_to_plain(
    done: list[dict[str, Any]], plain: list[dict[str, Any]], seconds: str, name: str
) -> dict[str, Any]:
    """One variant's processes against the plain ones of the same run, from each process's
    list of measured times `seconds`: the pooled median (`name`_ms_median), each process's
    (`name`_ms_round_medians), their ratio to plain's pooled median, and each process's ratio
    to the plain process of its round (the rounds share the machine's state)."""
    plain_median = median([s for r in plain for s in r[seconds]])
    plain_by_round = {r["round"]: median(r[seconds]) for r in plain}
    pooled = median([s for r in done for s in r[seconds]])
    return {
        f"{name}_ms_median": pooled * 1e3,
        f"{name}_ms_round_medians": [median(r[seconds]) * 1e3 for r in done],
        "ratio_to_plain": pooled / plain_median,
        "ratio_per_round": [
            median(r[seconds]) / plain_by_round[r["round"]]
            for r in done
            if r["round"] in plain_by_round
        ],
    }


# ------------------------------------------------------------------ results files


def results_header(
    what: str, command: str, smoke: bool, counts: list[int | None]
) -> dict[str, Any]:
    """The fields every results file of this bench starts with: what, how and where it ran."""
    return {
        "what": what,
        "smoke": smoke,
        "fresh_process_per_measurement": not smoke,
        "command": command,
        "argv": sys.argv,
        "date": now(),
        "machine": machine() | {"threads": threads_label(counts)},
        "load": {"start": load()},
    }


def announce(started: float, what: str) -> None:
    """`[ elapsed s] what ...`, left open for the measurement's figures."""
    print(f"[{time.perf_counter() - started:6.0f} s] {what} ...", end=" ", flush=True)


def finish(data: dict[str, Any], out: Path, started: float) -> dict[str, Any]:
    """Close a results file: the load at the end, the wall time; write it and say so."""
    data["load"]["end"] = load()
    data["wall_seconds"] = time.perf_counter() - started
    write_json(out, data)  # atomic: an interrupted bench leaves the previous file
    print(f"wrote {out} ({data['wall_seconds']:.0f} s)")
    return data
