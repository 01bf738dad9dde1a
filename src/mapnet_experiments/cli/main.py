"""The `mapnet` command line: one subcommand a module (train, data, bench, repro, export)."""

from __future__ import annotations

import argparse
import sys

from mapnet_experiments.cli import bench, data, export, repro, train
from mapnet_experiments.cli.train import EXAMPLES
from mapnet_experiments.data.fetch import DataUnavailableError


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


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(
        prog="mapnet",
        description="Mapping Networks: train any network through a small latent vector.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    except KeyboardInterrupt:
        print("mapnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
