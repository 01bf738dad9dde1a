"""The peak memory of a block of code, and of named phases inside it, seen by one of two trackers
(`PeakMemory`):

  allocator  the bytes torch's CPU allocator holds, followed through every allocation and free
             torch.profiler records (profile_memory=True), summed in time order and counted
             from zero at the start of the measured block: tensors only, exact, and blind to
             what the allocator (glibc) keeps of freed blocks, to Python objects and to memory
             that libraries (oneDNN's scratch buffers) take from malloc directly.
  rss        the process's peak resident set (VmHWM) over the block, reset at its start by
             writing 5 to /proc/self/clear_refs, minus the resident set at its start:
             everything the process touched, including freed blocks glibc has not returned.

The profiler records every op, so a figure of the allocator tracker belongs in its own process
and an RSS figure is never taken with the profiler on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mapnet_experiments.bench.harness import peak_rss_bytes

TRACKERS = ("allocator", "rss")


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`); False if
    the kernel refuses, and then a peak is only seen when it exceeds every earlier one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The peak memory of a block (one of TRACKERS), and of named phases inside it.

    >>> with PeakMemory("rss") as peak:
    ...     with peak.phase("wrap"):
    ...         mapped = wrap(MyNet(), config)
    >>> peak.result()  # {"peak_bytes": …, "end_bytes": …, "phases": {"wrap": {…}}}

    peak_bytes: the most the block held above what the process held when it began; end_bytes:
    what it still holds at its end; per phase: its own peak above its start, and where it
    started (`start_bytes`, above the block's start).
    """

    def __init__(self, tracker: str):
        if tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {TRACKERS}, got {tracker!r}")
        self.tracker = tracker
        self._phases: dict[str, dict[str, int]] = {}
        self._names: list[str] = []
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> PeakMemory:
        if self.tracker == "allocator":
            from torch.profiler import ProfilerActivity, profile

            # with_stack: the Python frames around the peak name where it happens.
            self._profile = profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True
            )
            self._profile.__enter__()
        else:
            self.rss_reset = reset_peak_rss()
            self._baseline = current_rss_bytes()
            self._highest = self._baseline
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._names.append(name)
        if self.tracker == "allocator":
            from torch.profiler import record_function

            with record_function(f"mapnet-bench:{name}"):
                yield
            return
        self._highest = max(self._highest, peak_rss_bytes())  # the peak before the phase
        reset_peak_rss()
        start = current_rss_bytes()
        yield
        peak = peak_rss_bytes()
        self._highest = max(self._highest, peak)
        self._phases[name] = {
            "peak_bytes": peak - start,
            "start_bytes": start - self._baseline,
        }

    def __exit__(self, *exc: Any) -> None:
        if self.tracker == "allocator":
            self._profile.__exit__(*exc)
            if exc[0] is None:
                self._result = self._allocator_result()
            return
        if exc[0] is None:
            peak = max(self._highest, peak_rss_bytes())
            self._result = {
                "peak_bytes": peak - self._baseline,
                "end_bytes": current_rss_bytes() - self._baseline,
                "phases": self._phases,
                "rss_before_bytes": self._baseline,
                "rss_peak_reset": self.rss_reset,
            }

    def _allocator_result(self) -> dict[str, Any]:
        events = self._profile.profiler.kineto_results.events()  # type: ignore[union-attr]
        changes = sorted(  # (time, +bytes allocated / −bytes freed), CPU memory only
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        )
        ranges = {
            e.name().removeprefix("mapnet-bench:"): (e.start_ns(), e.end_ns())
            for e in events
            if e.name().startswith("mapnet-bench:")
        }
        held, peak, peak_moment, timeline = 0, 0, None, []
        for moment, change in changes:
            held += change
            if held > peak:
                peak, peak_moment = held, moment
            timeline.append((moment, held))
        phases = {}
        for name in self._names:
            begin, end = ranges[name]
            before = [h for t, h in timeline if t < begin]
            start = before[-1] if before else 0
            inside = [h for t, h in timeline if begin <= t <= end]
            phases[name] = {
                "peak_bytes": max([start, *inside]) - start,
                "start_bytes": start,
            }
        return {
            "peak_bytes": peak,
            "end_bytes": held,
            "phases": phases,
            "allocation_events": len(changes),
            "peak_at": _frames_at(events, peak_moment),
        }

    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("PeakMemory.result() before the block ended")
        return self._result


def _frames_at(events: Any, moment: int | None, keep: int = 14) -> list[str]:
    """The profiled Python frames and ops running at `moment` (ns), outermost first: where an
    allocation peak happened. Frames outside this project's code are dropped except the
    innermost few (the op that allocated)."""
    if moment is None:
        return []
    around = sorted(
        (e for e in events if e.name() != "[memory]" and e.start_ns() <= moment <= e.end_ns()),
        key=lambda e: (e.start_ns(), -e.end_ns()),
    )
    names = [_short_frame(e.name()) for e in around]
    ours = [n for n in names[:-3] if "mapnet" in n]
    return [*ours, *names[-3:]][-keep:]


def _short_frame(name: str) -> str:
    """'/…/src/mapnet/module.py(123): __init__' -> 'mapnet/module.py(123): __init__'."""
    for marker in ("/src/", "/site-packages/"):
        if marker in name:
            return name.split(marker, 1)[1]
    return name
