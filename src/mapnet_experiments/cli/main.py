"""The `mapnet` command line: one subcommand a module (train, data, bench, repro, export)."""

from __future__ import annotations

import argparse
import errno
import sys

import mapnet
from mapnet import files
from mapnet_experiments.cli import bench, data, export, repro, train
from mapnet_experiments.cli.train import EXAMPLES
from mapnet_experiments.data.fetch import DataUnavailableError
from mapnet_experiments.recipe.loop import DivergedError

# Exit codes besides 0: 2 a bad setting or input (named), 3 training diverged, 4 the system
# refused a read or write (a full disk), 130 interrupted.
DIVERGED_EXIT = 3
SYSTEM_EXIT = 4


def keep_freed_memory() -> None:
    """Stop glibc returning freed activations to the kernel after every step (each step then
    re-faults them page by page: ~3,000 faults per CNN2 step; plain steps 17–33 % faster without,
    see docs/results/bench.md). No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def system_error_text(error: OSError) -> str:
    """One line for a refused read or write. Every file mapnet writes is committed whole (a
    temporary beside it, then one rename), so a failed write leaves the previous version."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device{where}. Nothing was corrupted: every file is written "
            "whole or not at all. Free some space and run the same command again (a training "
            "run continues with --resume from its last finished epoch)"
        )
    return f"{error.strerror or error}{where}"


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(
        prog="mapnet",
        description="Mapping Networks: train any network through a small latent vector.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mapnet {mapnet.__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for command in (train, data, bench, repro, export):
        command.add_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    try:
        if args.run is train.run:
            return train.run(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args)
    except (ValueError, TypeError, DataUnavailableError, FileNotFoundError) as error:
        print(f"mapnet: error: {error}", file=sys.stderr)
        return 2
    except files.InUseError as error:
        print(f"mapnet: error: {error}; wait for it to finish or stop it", file=sys.stderr)
        return 2
    except DivergedError as error:
        print(f"mapnet: error: {error}", file=sys.stderr)
        return DIVERGED_EXIT
    except OSError as error:
        print(f"mapnet: error: {system_error_text(error)}", file=sys.stderr)
        return SYSTEM_EXIT
    except KeyboardInterrupt:
        print("mapnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
