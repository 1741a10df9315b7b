"""How the engine runs its two passes: eagerly, or as separately compiled functions.

An *encoder pass* is the denoiser's own forward, stopped by :class:`EncoderDone` once the last encoder
module has run (its outputs recorded by the module hooks); a *decoder pass* is the same forward on
the decoder rows, the encoder modules replaying the recorded features (FasterDiffusion, Sec. 3.3).

With a compiled denoiser, distfd keeps its bookkeeping eager (which loop step, which rows, the
scheduler hooks, the collectives) and compiles only the two passes, each as its own function with
the user's own dynamo context (the backend, mode, options and ``dynamic`` given to
``torch.compile``). The stop at the last encoder module is a raise caught inside the compiled
encoder function, which dynamo traces without a graph break. Every compiled function gets a code
object of its own, so its dynamo cache (and recompile limit) holds distfd's graphs alone.

Shapes: the encoder always sees the pipeline's rows; a decoder pass sees ``n`` rows, ``n`` fixed by
the key-step group. By default every pass shape gets its own compiled function (own code object),
so each compiles one static graph once and dynamo's recompile limit is never approached; the
shapes, hence the graphs, follow from the key steps before sampling (:func:`planned_graphs`). With
the user's ``dynamic=True`` one decoder function serves every group size instead. CUDA graphs
(``mode="reduce-overhead"``) replay outputs from a shared memory pool that the next replay reuses,
so every output the engine keeps is cloned out of it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from .schedule import chunk_after, shard


class EncoderDone(Exception):
    """Raised after the last encoder module of an encoder pass, to skip the decoder."""


def _encoder_pass(forward: Callable, args: tuple, kwargs: dict) -> bool:
    """The denoiser's forward up to its last encoder module; True if that module was reached."""
    try:
        forward(*args, **kwargs)
    except EncoderDone:
        return True
    return False


def _decoder_pass(forward: Callable, args: tuple, kwargs: dict, fresh: Sequence[torch.Tensor] = ()) -> Any:
    """The denoiser's forward on a decoder batch. ``fresh``: the tensors built for the batch, all with
    the same number of rows, which the checks tell dynamo (one size symbol for the batch, not one per
    tensor, so it need not guard on how they relate)."""
    for t in fresh[1:]:
        torch._check(t.shape[0] == fresh[0].shape[0])
    return forward(*args, **kwargs)


def _fresh(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo keeps its cache per code object."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Passes(Protocol):
    """How the engine runs its passes (see :class:`EagerPasses`, :class:`CompiledPasses`)."""

    compiled: bool

    def encode(self, forward: Callable, args: tuple, kwargs: dict) -> bool: ...

    def decode(
        self, forward: Callable, args: tuple, kwargs: dict, fresh: Sequence[torch.Tensor] = ()
    ) -> Any: ...

    def keep(self, tree: Any) -> Any: ...


class EagerPasses:
    """Both passes as plain calls of the denoiser's forward."""

    compiled = False

    def encode(self, forward: Callable, args: tuple, kwargs: dict) -> bool:
        return _encoder_pass(forward, args, kwargs)

    def decode(self, forward: Callable, args: tuple, kwargs: dict, fresh: Sequence[torch.Tensor] = ()) -> Any:
        return _decoder_pass(forward, args, kwargs)

    def keep(self, tree: Any) -> Any:
        return tree


class CompiledPasses:
    """Both passes compiled with a dynamo context taken from the user's compiled denoiser.

    Static shapes (the user's ``dynamic`` is None or False): one compiled function, with its own
    code object, per pass shape, so each holds exactly one graph and never recompiles, however many
    batch sizes the key steps make. ``dynamic=True``: one decoder function for every batch size,
    its row dimension marked dynamic (dynamo may still specialise a size, e.g. a single row).

    The functions belong to one ``apply``: applying distfd again after ``remove()`` compiles again,
    since dynamo's guards check the hooks, which are new objects then.

    Args:
        context: the ``torch._dynamo`` optimize context of the user's ``torch.compile`` call.
        clone_outputs: clone what the engine keeps (needed when CUDA graphs replay from a pool).
    """

    compiled = True

    def __init__(self, context: Any, clone_outputs: bool) -> None:
        self.context = context
        self.dynamic = getattr(context, "_dynamic", None) is True
        self.clone_outputs = clone_outputs
        self._functions: dict[tuple, Callable] = {}

    def _function(self, key: tuple, fn: Callable) -> Callable:
        if key not in self._functions:
            self._functions[key] = self.context(_fresh(fn))
        return self._functions[key]

    @property
    def functions(self) -> int:
        """Compiled functions made so far (each holds one graph under static shapes)."""
        return len(self._functions)

    def encode(self, forward: Callable, args: tuple, kwargs: dict) -> bool:
        return self._function(("encoder", *_shapes(args, kwargs)), _encoder_pass)(forward, args, kwargs)

    def decode(self, forward: Callable, args: tuple, kwargs: dict, fresh: Sequence[torch.Tensor] = ()) -> Any:
        """``fresh``: the tensors built for this decoder batch (row dimension first), empty when the
        batch is one step's rows in order (the pipeline's own tensors)."""
        path = "gather" if fresh else "direct"
        if not self.dynamic:
            return self._function((path, *_shapes(args, kwargs)), _decoder_pass)(forward, args, kwargs)
        fn = self._function((path, "dynamic"), _decoder_pass)
        for t in fresh:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        # The hooks read the row index through a module attribute (the hook objects live on the
        # modules), whose shapes dynamo would otherwise hold static, ignoring the mark.
        with torch._dynamo.config.patch(force_nn_module_property_static_shapes=False):
            return fn(forward, args, kwargs, fresh)

    def keep(self, tree: Any) -> Any:
        if not self.clone_outputs:
            return tree
        return pytree.tree_map_only(torch.Tensor, torch.clone, tree)


def _shapes(args: tuple, kwargs: dict) -> tuple:
    """Shapes and dtypes of a call's tensors: one compiled function per distinct value."""
    leaves = pytree.tree_leaves((args, kwargs))
    return tuple((tuple(x.shape), x.dtype) for x in leaves if isinstance(x, torch.Tensor))


@dataclass(frozen=True)
class GraphPlan:
    """The compiled graphs (and CUDA-graph captures) one rank needs for a run, known before sampling.

    ``decoder_shapes``: (path, rows) of every distinct decoder batch, path ``"direct"`` for a batch
    that is one step's rows in order (the pipeline's own tensors) and ``"gather"`` otherwise.
    """

    encoder_graphs: int
    decoder_shapes: tuple[tuple[str, int], ...]
    dynamic: bool = False

    @property
    def decoder_graphs(self) -> int:
        if not self.dynamic:
            return len(self.decoder_shapes)
        # Dynamic rows: one graph per path, plus dynamo's specialisation of a single-row batch
        # (a lower bound: a backend may specialise more, e.g. CPU convolutions at 16 rows).
        return len({(path, rows == 1) for path, rows in self.decoder_shapes})

    @property
    def graphs(self) -> int:
        return self.encoder_graphs + self.decoder_graphs

    @property
    def captures(self) -> int:
        """CUDA graphs recorded with ``mode="reduce-overhead"``: one per distinct pass shape."""
        return self.encoder_graphs + len(self.decoder_shapes)


def planned_graphs(
    key_steps: Sequence[int],
    loop_length: int,
    rows_per_step: int,
    *,
    mode: str = "parallel",
    max_parallel_steps: int | None = None,
    world_size: int = 1,
    rank: int = 0,
    encodes: bool = True,
    dynamic: bool = False,
) -> GraphPlan:
    """The graphs the engine compiles on ``rank`` for one run (mirrors ``Engine._decode``'s batches).

    ``encodes``: whether this rank runs the encoder (rank 0, or every rank with replicated placement).
    """
    width = 1 if mode == "propagate" else max_parallel_steps
    shapes: set[tuple[str, int]] = set()
    step = 0
    while step < loop_length:
        steps = chunk_after(step, key_steps, loop_length, width)
        mine = shard(len(steps) * rows_per_step, world_size)[rank]
        if len(mine):
            direct = len(mine) == rows_per_step and mine.start % rows_per_step == 0
            shapes.add(("direct" if direct else "gather", len(mine)))
        step = steps.stop
    return GraphPlan(int(encodes), tuple(sorted(shapes)), dynamic)
