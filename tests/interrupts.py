"""Cutting a run short in a test: the n-th call of a function raises KeyboardInterrupt, as a
kill would, and the body must be stopped by it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def interrupted_at_call(owner: Any, name: str, n: int, *, after: bool = False) -> Iterator[None]:
    """Within the block, owner.name raises KeyboardInterrupt at its n-th call: before running
    it, or with `after` once it has run (killed right after it returned). The block must end
    in that interrupt; owner.name is restored afterwards."""
    real = getattr(owner, name)
    calls = 0

    def cut(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n and not after:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if calls == n:
            raise KeyboardInterrupt
        return result

    setattr(owner, name, cut)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        setattr(owner, name, real)
