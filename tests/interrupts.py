"""Cutting a run short in a test: the n-th call of a function raises KeyboardInterrupt, as a
kill would, and the body must be stopped by it; or a forked child dies at the n-th call, a real
kill that runs no cleanup."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
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


KILLED = 87  # the exit status of a child killed by `killed_at_call`


def killed_at_call(
    action: Callable[[], object], calls: list[tuple[Any, str]], n: int, *, after: bool = False
) -> bool:
    """Run `action` in a forked child that dies (os._exit: no finally, no cleanup, as a kill)
    at the n-th call, counted across the functions `calls` names as (owner, attribute): before
    it runs, or with `after` once it has returned. Returns whether the child was killed (False:
    it finished, the calls ran out before n). The parent's functions are untouched."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            count = 0
            for owner, name in calls:
                real = getattr(owner, name)

                def cut(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                    nonlocal count
                    count += 1
                    mine = count  # calls inside this one count on
                    if mine == n and not after:
                        os._exit(KILLED)
                    result = _real(*args, **kwargs)
                    if mine == n:
                        os._exit(KILLED)
                    return result

                setattr(owner, name, cut)
            action()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, KILLED), f"the child failed with exit code {code}"
    return code == KILLED
