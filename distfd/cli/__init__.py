"""The `distfd` command line.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which sets ``run``) and
``run(args) -> int``; registering one here is one import and one call. Nothing at module level
imports torch or diffusers, so ``distfd --help`` answers at once.

Exit codes: 0 done; 1 a failure while running (a lost rank, an error inside the pipeline); 2 bad
arguments or a request that cannot run, reported in one line before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .options import HelpFormatter, UsageError, configure_logging, rank_from_env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distfd",
        description="FasterDiffusion on stock diffusers pipelines, on one process or many ranks.",
        formatter_class=HelpFormatter,
    )
    # The deepspeed launcher (and torch.distributed.launch) put --local_rank=N before the subcommand;
    # distfd reads LOCAL_RANK from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .. import serve  # the package: only its options are imported here
    from . import calibrate, generate

    generate.add_parser(sub)
    calibrate.add_parser(sub)
    serve.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or getattr(args, "verbose", False)
    configure_logging(args)
    prefix = f"distfd {args.command}: error"
    rank = rank_from_env()
    if rank:
        prefix = f"[rank {rank}] {prefix}"
    try:
        return args.run(args)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, the traceback behind --debug
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        if not debug:
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        logging.shutdown()


__all__ = ["build_parser", "main"]
