"""Progress on long work: a live bar on a terminal, and nothing between the lines a run prints
itself (one per epoch) anywhere else. A log file, CI or nohup would otherwise collect thousands
of carriage-return updates."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    """True when the bar's stream (stderr) is a terminal."""
    return sys.stderr.isatty()


def bar(iterable: Iterable[T] | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """tqdm over `iterable` (or a manual bar given `total=`), shown only when `enabled` and on a
    terminal; elsewhere it counts silently."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), **options)


def say(line: str, enabled: bool = True) -> None:
    """One line of progress on stderr (an epoch's figures, a stage starting)."""
    if enabled:
        print(line, file=sys.stderr, flush=True)
