"""Whether the suite runs in CI ($CI set and not false): there the package registries are
reachable, so a real asset that cannot be fetched is a failure, not a skip."""

from __future__ import annotations

import os


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
