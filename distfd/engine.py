"""Encoder propagation and parallel decoding for one denoiser (FasterDiffusion, Sec. 3.3).

The pipeline's loop calls the denoiser once per step. At a key step the engine runs an *encoder
pass* (the denoiser's own forward, stopped once the last encoder module has run, its outputs
recorded), then a *decoder pass*: the same forward again on the rows of every step it decodes now,
its encoder modules replaying the recorded features. Each row of that batch is one (step, input row)
pair with the step's own timestep; the rows are shared out over the ranks and the predictions
gathered, then served to the pipeline one step at a time, in loop order.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .adapters import Adapter
from .config import FasterDiffusionConfig
from .consistency import check_agreement, fingerprint
from .passes import EagerPasses, EncoderDone
from .runtime import DistContext
from .schedule import chunk_after, resolve_key_steps, shard

logger = logging.getLogger("distfd")


def _timestep_value(t) -> float:
    """The timestep of a denoiser call as a number (pipelines pass a scalar, a 0-d or a (B,) tensor)."""
    return float(torch.as_tensor(t).reshape(-1)[0])


@dataclass
class Counters:
    """What ran, for tests and summaries."""

    encoder_passes: int = 0
    decoder_passes: int = 0
    decoder_rows: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Run:
    """State of one pipeline call's sampling loop."""

    timesteps: torch.Tensor  # the loop's timesteps, (L,)
    key_steps: tuple[int, ...]
    step: int = 0  # next loop index the denoiser will be called for
    updates: int = 0  # scheduler updates done
    served: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, ...) prediction
    z_T: torch.Tensor | None = None
    feature_spec: Any = None  # layout of the broadcast encoder features (rank0 placement)

    @property
    def length(self) -> int:
        return len(self.timesteps)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        config: FasterDiffusionConfig,
        ctx: DistContext,
        get_scheduler: Callable[[], Any],
        passes: Any = None,
    ) -> None:
        self.model, self.adapter, self.config, self.ctx = model, adapter, config, ctx
        self.get_scheduler = get_scheduler
        self.modules = adapter.encoder_modules(model)
        self.signature = inspect.signature(model.forward)
        self.phase = "idle"  # "record" (encoder pass) | "replay" (decoder pass) | "idle"
        self.features: list[Any] = []
        self.rows: torch.Tensor | None = None  # input row served by each decoder row, (n,)
        self.batch_rows = 1  # rows per step in the pipeline's denoiser call
        self.run: Run | None = None
        self.runs = 0  # runs started, numbering them for side models' caches
        self.counters = Counters()
        self._pending = None  # async broadcast of features still in flight
        self.passes = passes or EagerPasses()  # how the encoder and decoder passes run (passes.py)

    # Called by the encoder module hooks.

    def module_forward(self, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        if self.phase == "record":
            out = original(*args, **kwargs)
            self.features[index] = out if self.modules[index].keep or index == len(self.modules) - 1 else None
            if index == len(self.modules) - 1:
                raise EncoderDone
            return out
        if self.phase == "replay":
            cached = self.features[index] if self.modules[index].keep else self.features[-1]
            return pytree.tree_map_only(torch.Tensor, self._select_rows, cached)
        return original(*args, **kwargs)

    def _select_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a cached feature for the decoder batch; a feature of B*k rows (video frames) keeps
        each input row's k consecutive rows together."""
        if self.rows is None:  # the decoder rows are the input rows, in order
            # A clone keeps the memory layout a vanilla call would see, and keeps the cache safe
            # from in-place ops in the decoder (FreeU, T2I adapters) that later steps would inherit.
            return t.clone()
        per = t.shape[0] // self.batch_rows
        if per * self.batch_rows != t.shape[0]:
            raise RuntimeError(
                f"distfd: cached feature of batch {t.shape[0]} does not divide into {self.batch_rows} rows."
            )
        if per == 1:
            return t.index_select(0, self.rows)
        idx = (self.rows[:, None] * per + torch.arange(per, device=self.rows.device)).reshape(-1)  # (n * k,)
        return t.index_select(0, idx)

    # Called by the scheduler hooks.

    def new_run(self) -> None:
        self._end_run()

    def before_update(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Prior noise injection (Sec. 3.3): ``z_t += alpha * z_T`` for timesteps below the threshold."""
        run = self.run
        if run is None:
            return sample
        if run.z_T is None:
            run.z_T = sample.clone()
        sched = self.get_scheduler()
        limit = self.config.noise_below * sched.config.num_train_timesteps
        if self.config.noise_alpha > 0 and float(timestep) < limit:
            sample = sample + self.config.noise_alpha * run.z_T
        return sample

    def after_update(self, prev_sample: torch.Tensor) -> None:
        """After the last update, make rank 0's latents everyone's (the ranks cannot drift apart)."""
        run = self.run
        if run is None:
            return
        run.updates += 1
        if run.updates >= run.length:
            self.ctx.stats.tag = None
            if prev_sample.is_contiguous():
                self.ctx.broadcast(prev_sample, src=0)
            else:  # collectives need contiguous memory
                buf = prev_sample.contiguous()
                self.ctx.broadcast(buf, src=0)
                prev_sample.copy_(buf)
            self._end_run()

    # Called by side-model hooks: a model the pipeline calls in each loop step before the denoiser.

    def upcoming_call(self, timestep) -> tuple[int, bool]:
        """(run number, is a key step) for the denoiser call that follows in this loop step.

        Before a run has started (or after the last one finished) the call opens a new run, at its
        step 0, always a key step. A timestep other than the expected one also counts as key (the
        side model then computes rather than reuse something stale).
        """
        run = self.run
        if run is None or run.step >= run.length:
            return self.runs + 1, True
        same = _timestep_value(timestep) == float(run.timesteps[run.step])
        return self.runs, run.step in run.key_steps or not same

    # Called by the denoiser hook once per loop step.

    def denoiser_forward(self, original: Callable, args: tuple, kwargs: dict) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        call = bound.arguments
        sample, t = call[self.adapter.sample_arg], call[self.adapter.timestep_arg]
        run = self.run if self.run is not None and self.run.step < self.run.length else self._start_run(call)
        i = run.step
        expected, got = float(run.timesteps[i]), _timestep_value(t)
        if got != expected:
            raise RuntimeError(
                f"distfd expected the denoiser call for loop step {i} (timestep {expected}) but got "
                f"timestep {got}: this pipeline calls the denoiser in a "
                "pattern distfd does not support (one call per scheduler timestep)."
            )
        if i not in run.served:
            if i in run.key_steps:
                self._encode(original, bound, i)
            width = 1 if self.config.mode == "propagate" else self.config.max_parallel_steps
            steps = chunk_after(i, run.key_steps, run.length, width)
            self._decode(original, bound, run, steps, sample)
        pred = run.served.pop(i)
        run.step += 1
        self.counters.steps += 1
        return self.adapter.make_output(pred, bool(call.get("return_dict", True)))

    # Internals.

    def _start_run(self, call: dict) -> Run:
        self._end_run()
        sched = self.get_scheduler()
        sample, t = call[self.adapter.sample_arg], call[self.adapter.timestep_arg]
        all_t = sched.timesteps
        t0 = _timestep_value(t)
        hits = (all_t.float() == t0).nonzero()
        if len(hits) == 0:
            raise RuntimeError(
                f"distfd: the denoiser was called with timestep {t0}, which is not in scheduler.timesteps; "
                "call it through the pipeline (which sets the scheduler's timesteps first)."
            )
        offset = int(hits[0])
        timesteps = all_t[offset:]
        num_steps = getattr(sched, "num_inference_steps", None) or len(timesteps)
        key_steps = resolve_key_steps(
            self.config.key_steps, num_steps, len(timesteps), allow_rescale=self.config.rescale_key_steps
        )
        self.run = Run(timesteps=timesteps, key_steps=key_steps)
        self.runs += 1
        self.ctx.stats.reset()
        cond = self.adapter.condition_tensor(call)
        check_agreement(self.ctx, fingerprint(self.config, key_steps, timesteps, sample, cond))
        if self.ctx.is_main:
            most = max(len(chunk_after(k, key_steps, len(timesteps), None)) for k in key_steps)
            logger.info(
                "distfd %s: %d steps, key steps %s, %d rank(s)",
                self.config.mode,
                len(timesteps),
                list(key_steps),
                self.ctx.world_size,
            )
            if self.config.mode == "parallel" and self.ctx.world_size > most * sample.shape[0]:
                logger.info(
                    "world size %d exceeds the largest decoder batch (%d rows): some ranks will idle",
                    self.ctx.world_size,
                    most * sample.shape[0],
                )
        return self.run

    def _end_run(self) -> None:
        self.run = None
        self.features = []
        self.rows = None
        self._pending = None

    def _encode(self, original: Callable, bound: inspect.BoundArguments, i: int) -> None:
        ctx, placement = self.ctx, self.config.encoder
        ctx.stats.tag = i
        encodes_here = ctx.is_main or placement == "replicated"
        if placement == "replicated" and ctx.world_size > 1:
            sample = bound.arguments[self.adapter.sample_arg].contiguous()
            ctx.broadcast(sample, src=0)  # rank 0's latents are the authority
            bound.arguments[self.adapter.sample_arg] = sample
        if encodes_here:
            self.features = [None] * len(self.modules)
            self.phase = "record"
            try:
                reached = self.passes.encode(original, bound.args, bound.kwargs)
            finally:
                self.phase = "idle"
            if not reached:
                raise RuntimeError("distfd: the encoder pass never reached its last encoder module.")
            self.features = self.passes.keep(self.features)
            self.counters.encoder_passes += 1
        if placement == "rank0" and ctx.world_size > 1:
            self._share_features()

    def _share_features(self) -> None:
        """Broadcast rank 0's encoder features; rank 0 does not wait (it decodes meanwhile).

        Each distinct tensor is sent once: a UNet down block's last skip tensor is its output too.
        """
        run, ctx = self.run, self.ctx
        distinct: list[torch.Tensor] = []
        if ctx.is_main:
            leaves, tree = pytree.tree_flatten(self.features)
            distinct = list({id(x): x for x in leaves if x is not None}.values())
        if run.feature_spec is None:
            spec = None
            if ctx.is_main:
                # Leaf -> index of a distinct tensor; None for the outputs not kept (DiT blocks).
                first: dict[int, int] = {}
                refs = [None if x is None else first.setdefault(id(x), len(first)) for x in leaves]
                spec = (tree, refs, [(tuple(x.shape), x.dtype) for x in distinct])
            run.feature_spec = ctx.broadcast_object(spec, src=0)
        tree, refs, layout = run.feature_spec
        dtype = layout[0][1]
        if any(d != dtype for _, d in layout):
            raise RuntimeError("distfd: encoder features of mixed dtypes are not supported across ranks.")
        if ctx.is_main:
            flat = torch.cat([x.reshape(-1) for x in distinct])
            self._pending = ctx.broadcast(flat, src=0, async_op=True)
            self._pending_flat = flat  # keep alive until the broadcast completes
            return
        sizes = [int(torch.Size(shape).numel()) for shape, _ in layout]
        flat = torch.empty(sum(sizes), dtype=dtype, device=ctx.device)
        ctx.wait(ctx.broadcast(flat, src=0, async_op=True))
        distinct = [part.view(shape) for part, (shape, _) in zip(flat.split(sizes), layout, strict=True)]
        self.features = pytree.tree_unflatten([None if r is None else distinct[r] for r in refs], tree)

    def _decode(
        self, original: Callable, bound: inspect.BoundArguments, run: Run, steps: range, sample: torch.Tensor
    ) -> None:
        ctx, rows_per_step = self.ctx, sample.shape[0]
        shares = shard(len(steps) * rows_per_step, ctx.world_size)
        mine = shares[ctx.rank]
        if len(mine):
            idx = torch.arange(mine.start, mine.stop, device=sample.device)
            src = idx % rows_per_step  # which input row (CFG half, image) each decoder row serves
            t_rows = run.timesteps.to(sample.device)[steps.start + idx // rows_per_step]  # (n,)
            # One step's rows in order (propagation, all-key steps): no copies, so the decoder sees
            # the very tensors (and memory layouts) a vanilla call would.
            same = len(mine) == rows_per_step and mine.start % rows_per_step == 0
            # The tensors built for this batch (row dimension first): a compiled decoder pass marks
            # their rows dynamic, so one graph serves every group size.
            fresh: list[torch.Tensor] = [] if same else [src, t_rows]

            def select(x: torch.Tensor) -> torch.Tensor:
                if x.dim() == 0 or x.shape[0] != rows_per_step:
                    return x
                fresh.append(x.index_select(0, src.to(x.device)))
                return fresh[-1]

            args = dict(bound.arguments)
            for name, value in args.items():
                if not same and name not in (self.adapter.sample_arg, self.adapter.timestep_arg):
                    args[name] = pytree.tree_map_only(torch.Tensor, select, value)
            args[self.adapter.sample_arg] = sample if same else select(sample)
            args[self.adapter.timestep_arg] = t_rows
            call = inspect.BoundArguments(bound.signature, args)
            self.phase, self.rows, self.batch_rows = "replay", None if same else src, rows_per_step
            try:
                out = self.passes.decode(original, call.args, call.kwargs, fresh)
                local = self.passes.keep(self.adapter.get_sample(out))
            finally:
                self.phase, self.rows = "idle", None
            self.counters.decoder_passes += 1
            self.counters.decoder_rows += len(mine)
        else:
            dtype = next(self.model.parameters()).dtype
            local = sample.new_empty((0, *self.adapter.output_row_shape(self.model, sample)), dtype=dtype)
        if self._pending is not None:
            ctx.wait(self._pending)
            self._pending = self._pending_flat = None
        preds = ctx.all_gather_rows(local, shares)  # (len(steps) * B, ...)
        for j, step in enumerate(steps):
            run.served[step] = preds[j * rows_per_step : (j + 1) * rows_per_step]
