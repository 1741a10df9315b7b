"""Compiled denoisers: find the user's compile options, warm a planned run up, compile from the CLI.

``distfd.apply`` accepts a denoiser compiled either way::

    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")   # an OptimizedModule
    pipe.unet.compile(mode="reduce-overhead")                       # in place

In both cases distfd applies its hooks to the model inside, keeps the pipeline's call of the
denoiser eager (while applied, the user's whole-model compiled call is set aside and restored by
``remove()``), and compiles its encoder and decoder passes separately with the user's own dynamo
context (see ``passes.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a function runs: the CLI builds its parser from this module
    import torch
    from torch import nn

logger = logging.getLogger("distfd")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _dynamo_context_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return _TorchDynamoContext


def _optimized_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover
        return None
    return OptimizedModule


def context_of(compiled_fn: Any) -> Any | None:
    """The dynamo context a ``torch.compile``-d function was made by (its closure holds it)."""
    ctx_type = _dynamo_context_type()
    seen: set[int] = set()
    todo = [compiled_fn]
    while todo:  # the wrapper, and the functions it wraps, e.g. get_compiler_config
        fn = todo.pop()
        if id(fn) in seen or fn is None:
            continue
        seen.add(id(fn))
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if ctx_type is not None and isinstance(value, ctx_type):
                return value
        todo.append(getattr(fn, "get_compiler_config", None))
    return None


@dataclass
class Denoiser:
    """What ``apply`` hooks: ``outer`` is what the pipeline calls, ``model`` the module inside.

    ``context``: the user's dynamo context when the denoiser is compiled, else None; ``style``:
    ``"eager"``, ``"module"`` (``torch.compile(model)``) or ``"inplace"`` (``model.compile()``).
    """

    outer: nn.Module
    model: nn.Module
    context: Any = None
    style: str = "eager"
    _saved_call: Any = field(default=None, repr=False)

    @property
    def compiled(self) -> bool:
        return self.context is not None

    def suspend(self) -> None:
        """Keep the pipeline's call of the denoiser eager while distfd is applied."""
        if self.style == "inplace":
            self._saved_call = self.model._compiled_call_impl
            self.model._compiled_call_impl = None

    def restore(self) -> None:
        if self.style == "inplace" and self._saved_call is not None:
            self.model._compiled_call_impl = self._saved_call
            self._saved_call = None


def unwrap(module: nn.Module) -> Denoiser:
    """The model inside a compiled denoiser and the user's compile options, or the module as is."""
    opt_type = _optimized_module_type()
    if opt_type is not None and isinstance(module, opt_type):
        inner = module._orig_mod
        if getattr(inner, "_compiled_call_impl", None) is not None or isinstance(inner, opt_type):
            raise ValueError(
                "the denoiser is compiled twice (torch.compile of a module already compiled); compile it once."
            )
        ctx = module.dynamo_ctx
        if getattr(ctx, "callback", None) in (None, False):  # torch.compile(disable=True)-like contexts
            return Denoiser(module, inner)
        return Denoiser(module, inner, ctx, "module")
    compiled_call = getattr(module, "_compiled_call_impl", None)
    if compiled_call is not None:
        ctx = context_of(compiled_call)
        if ctx is None:
            raise ValueError(
                f"{type(module).__name__} was compiled in place (module.compile()) but distfd cannot read its "
                "compile options from this torch version; compile it as pipe.<denoiser> = torch.compile(...) "
                "instead."
            )
        return Denoiser(module, module, ctx, "inplace")
    return Denoiser(module, module)


def graphs_compiled() -> int:
    """Dynamo graphs compiled so far in this process (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def cuda_graphs_recorded(device: torch.device | int | None = None) -> int | None:
    """CUDA graphs recorded by inductor's CUDA-graph trees on ``device`` (None where not available)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from torch._inductor import cudagraph_trees
    except ImportError:  # pragma: no cover
        return None
    index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    try:  # inductor internals: a reading, never a reason to fail
        manager = cudagraph_trees.get_manager(index.index or 0, create_if_none_exists=False)
        if manager is None:
            return 0
        count, todo = 0, [n for nodes in manager.roots.values() for n in nodes]
        while todo:
            node = todo.pop()
            count += 1
            todo.extend(n for nodes in node.children.values() for n in nodes)
    except Exception:  # noqa: BLE001
        return None
    return count


@dataclass
class WarmUp:
    """What each warm-up call compiled and how long it took."""

    seconds: list[float] = field(default_factory=list)
    graphs: list[int] = field(default_factory=list)  # dynamo graphs compiled per call
    cuda_graphs: list[int | None] = field(default_factory=list)  # CUDA graphs recorded per call

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "graphs": self.graphs, "cuda_graphs": self.cuda_graphs}


def warm_up(pipe: Any, *args: Any, calls: int = 2, **kwargs: Any) -> WarmUp:
    """Call ``pipe(*args, **kwargs)`` ``calls`` times so a later identical call compiles nothing.

    The first call compiles every pass shape of the run (the key-step groups fix them); with CUDA
    graphs (``mode="reduce-overhead"``) inductor runs a new shape once before recording it, so the
    second call records them. ``kwargs`` should be the planned call's (same size, steps, batch);
    seeds and prompts may differ.
    """
    import torch

    report = WarmUp()
    device = getattr(pipe, "device", torch.device("cpu"))
    for _ in range(calls):
        g0, c0 = graphs_compiled(), cuda_graphs_recorded(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        pipe(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.seconds.append(time.perf_counter() - t0)
        report.graphs.append(graphs_compiled() - g0)
        c1 = cuda_graphs_recorded(device) if device.type == "cuda" else None
        report.cuda_graphs.append(None if c0 is None or c1 is None else c1 - c0)
    logger.info(
        "warm-up: %s s, graphs compiled %s, CUDA graphs recorded %s",
        [round(s, 2) for s in report.seconds],
        report.graphs,
        report.cuda_graphs,
    )
    return report


# Command line: ``distfd generate --compile [--compile-mode MODE] [--backend gloo|nccl]``.


def add_arguments(parser: Any) -> None:
    """The compile and process-group flags of ``distfd generate`` (vanilla and distfd runs alike).

    The caller compiles with :func:`compile_denoiser` after loading and, with ``--compile``, warms the
    planned call up with :func:`warm_up` before timing it; ``args.backend`` goes to
    ``DistContext.from_env(backend=...)``.
    """
    parser.add_argument(
        "--backend",
        choices=["nccl", "gloo"],
        default=None,
        help="process-group backend (default: nccl on GPUs, gloo on CPU); gloo lets several ranks "
        "share one GPU (NCCL refuses), for correctness checks",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser (vanilla and distfd alike); distfd compiles its encoder and "
        "decoder passes with the same options",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode; 'reduce-overhead' also captures CUDA graphs (GPU)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (e.g. inductor, aot_eager, eager)",
    )


def check_arguments(args: Any) -> str | None:
    """The problem with the compile flags of ``args``, if any (the CLI shows it as a usage error)."""
    if getattr(args, "compile", False) and getattr(args, "compare", False):
        return (
            "--compile with --compare is not supported: each vanilla call between distfd calls would make "
            "distfd compile its passes again. Compare compiled runs with benchmarks/latency.py --methods "
            "vanilla-compiled,distfd-parallel-compiled (or run generate --compile with --mode off, then "
            "with --mode parallel)."
        )
    if not getattr(args, "compile", False) and getattr(args, "compile_mode", "default") != "default":
        return "--compile-mode needs --compile."
    return None


def compile_denoiser(pipe: Any, args: Any) -> bool:
    """``torch.compile`` the pipeline's denoiser in place when ``args.compile``; True if it did."""
    if not getattr(args, "compile", False):
        return False
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    model = getattr(pipe, name)
    mode = None if args.compile_mode == "default" else args.compile_mode
    backend = getattr(args, "compile_backend", "inductor")
    model.compile(backend=backend, mode=mode if backend == "inductor" else None)
    logger.info("compiled pipe.%s (backend %s, mode %s)", name, backend, args.compile_mode)
    return True


def warm_compiled(session: Any, request: Any, args: Any) -> None:
    """With ``--compile``: run ``request`` twice, untimed, so the timed call compiles and records
    nothing (distfd's passes: every shape of the run; CUDA graphs record on a shape's second call)."""
    if not getattr(args, "compile", False) or getattr(request, "mode", "off") == "off":
        return  # vanilla: the session's warm-up call already compiled the whole-model graph
    for _ in range(2):
        session.run(request)
