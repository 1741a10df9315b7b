"""Options shared by the subcommands that make images (generate, and serve's request defaults).

``add_request_options`` / ``request_from_args`` build an :class:`~distfd.request.ImageRequest`;
``add_session_options`` / ``session_from_args`` build a :class:`~distfd.session.Session`. Light
imports only: torch and diffusers load when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .. import compiling, samplers
from ..request import MODES, ImageRequest

DEFAULT_PROMPT = "a small red circle at the top left on a blue background"


class UsageError(ValueError):
    """Bad arguments or a request that cannot run: one line on stderr, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help already says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {default})"


def rank_from_env() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def world_from_env() -> int:
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_request_options(p: argparse.ArgumentParser) -> None:
    """The per-image options (the fields of ImageRequest)."""
    g = p.add_argument_group("image")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    g.add_argument("--negative-prompt", default=None, help="needs --guidance-scale > 1")
    g.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance; > 1 enables it, 0 or 1 means none (values in between and "
        "negative ones are refused: the pipeline would treat them as 1)",
    )
    g.add_argument("--height", type=int, default=None, help="pixels; default: the model's")
    g.add_argument("--width", type=int, default=None, help="pixels; default: the model's")
    g.add_argument(
        "--key-steps",
        default=None,
        help="preset name (sd-ddim-50, sd-dpm-20, uniform-K, ...), a preset .json file, or indices "
        "such as 0,1,2,5; default: the paper's preset for the scheduler rescaled to --steps (on the "
        "embedded model, its calibrated set where one ships for --scheduler and --steps)",
    )
    g.add_argument("--mode", choices=MODES, default="parallel", help="'off' runs the vanilla pipeline only")


def request_from_args(args: argparse.Namespace) -> ImageRequest:
    try:
        return ImageRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            key_steps=args.key_steps,
            mode=args.mode,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e


def add_session_options(p: argparse.ArgumentParser) -> None:
    """The options fixed for a loaded pipeline (Session)."""
    g = p.add_argument_group("model and ranks")
    g.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline folder or hub id, or embedded-mmdit (the embedded MMDiT); default: the embedded tiny-shapes model",
    )
    g.add_argument(
        "--scheduler",
        choices=list(samplers.SCHEDULERS),
        default=None,
        help=f"{samplers.describe()}; default: flow-euler for flow-matching models (FLUX, SD3), else ddim",
    )
    g.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on GPU, fp32 on CPU"
    )
    g.add_argument("--device", default="auto", help="auto (LOCAL_RANK's GPU, else CPU), cpu, cuda, cuda:N")
    g.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before a silent peer rank, or a rendezvous that does not complete, is an error",
    )
    g.add_argument(
        "--encoder",
        choices=["rank0", "replicated"],
        default="rank0",
        help="where the encoder runs when several ranks share the image",
    )
    g.add_argument("--noise-alpha", type=float, default=0.003, help="prior noise injection; 0 disables")
    g.add_argument("--max-parallel-steps", type=int, default=None, help="cap on steps decoded per batch")
    compiling.add_arguments(g)  # --compile, --compile-mode, --compile-backend, --backend


def add_limit_options(p: argparse.ArgumentParser, what: str) -> None:
    """Bounds on each request from someone else (``what``: the lines of a prompts file, or requests)."""
    from ..limits import DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_STEPS

    g = p.add_argument_group(f"limits on {what}")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="height x width at most; default: 4x the model's default image area",
    )
    g.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="sampling steps at most")
    g.add_argument(
        "--max-prompt-chars",
        type=int,
        default=DEFAULT_MAX_PROMPT_CHARS,
        help="characters of prompt (and of negative_prompt) at most",
    )


def limits_from_args(args: argparse.Namespace, key_step_files: bool = False):
    from ..limits import RequestLimits

    try:
        return RequestLimits(args.max_pixels, args.max_steps, args.max_prompt_chars, key_step_files)
    except ValueError as e:
        raise UsageError(str(e)) from e


def add_ranks_per_image_option(g) -> None:
    g.add_argument(
        "--ranks-per-image",
        default=None,
        metavar="K|auto",
        help="ranks that share each image: K (dividing the number of ranks) makes W/K images at once; "
        "'auto' picks per image from the queue (all ranks while at most one waits); default: all ranks",
    )


def add_max_batch_option(g) -> None:
    g.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="make up to N waiting images in one pipeline call when they share every field but prompt, "
        "negative prompt and seed (more rows per decoder batch); default: 1, each image alone",
    )


def max_batch_from_args(args: argparse.Namespace) -> int:
    """``--max-batch`` (None: 1); :class:`UsageError` below 1."""
    value = 1 if args.max_batch is None else args.max_batch
    if value < 1:
        raise UsageError(f"--max-batch must be >= 1; got {value}.")
    return value


def session_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        scheduler=args.scheduler,
        dtype=args.dtype,
        noise_alpha=args.noise_alpha,
        encoder=args.encoder,
        max_parallel_steps=args.max_parallel_steps,
    )


def context_from_args(args: argparse.Namespace):
    from ..runtime import DistContext

    device = None if args.device == "auto" else args.device
    return DistContext.from_env(timeout_s=args.timeout, device=device, backend=getattr(args, "backend", None))


def session_from_args(
    args: argparse.Namespace, ctx, step_progress: bool = False, bound_parallel: bool = False
):
    """The loaded pipeline; ``bound_parallel`` for requests from others (see ``Session``)."""
    from ..session import Session

    if not getattr(args, "verbose", False):
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components"
        transformers.utils.logging.disable_progress_bar()  # "Loading weights"

    session = Session(ctx, step_progress=step_progress, bound_parallel=bound_parallel, **session_kwargs(args))
    compiling.compile_denoiser(session.pipe, args)
    return session


def configure_logging(args: argparse.Namespace) -> None:
    """distfd's log on rank 0 (warnings and errors on the others); third-party noise quieted."""
    rank = rank_from_env()
    verbose = getattr(args, "verbose", False)
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if world_from_env() > 1 else ""
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RepeatedRunNotice())
        quiet_third_party()


class _RepeatedRunNotice(logging.Filter):
    """The engine logs its plan at every run; in a batch or a --compare say each plan once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.module != "engine":
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def quiet_third_party() -> None:
    """Silence what is not the user's concern in a plain run: library loading bars and notices
    (e.g. transformers' torchvision fallback), deprecation chatter from dependencies."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(transformers|diffusers|torch|accelerate)\b"
        )
