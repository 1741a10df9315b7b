"""Encoder propagation and parallel decoding for one denoiser (FasterDiffusion, Sec. 3.3).

The pipeline's loop calls the denoiser once per step. At a key step the engine runs an *encoder
pass* (the denoiser's own forward, stopped once the last encoder module has run, its outputs
recorded), then a *decoder pass*: the same forward again on the rows of every step it decodes now,
its encoder modules replaying the recorded features. Each row of that batch is one (step, input row)
pair with the step's own timestep; the rows are shared out over the ranks and the predictions
gathered, then served to the pipeline one step at a time, in loop order.

All state of one sampling loop lives on a :class:`Run`, created at the loop's first denoiser call and
dropped after its last scheduler update (or when the scheduler's timesteps are set again). Step
bookkeeping reads a host copy of the timesteps taken once per run, so a step adds no device sync.

A pass that fails on one rank of several (out of memory, say) must not leave the others waiting in a
collective. The failing rank keeps the run's collectives going with zeros in place of its share and
computes nothing more; after the last scheduler update the ranks agree (one host all-reduce) and
every rank raises :class:`StoppedTogether`. A caller may stop them sooner at any step boundary with
the same agreement (``run.failure`` is what this rank brings to it).
"""

from __future__ import annotations

import enum
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
from .passes import EagerPasses, EncoderDone, Passes
from .runtime import DistContext, StoppedTogether, failure_code, peer_failed
from .schedule import chunk_after, shard

logger = logging.getLogger("distfd")


def host_timestep(t) -> float | None:
    """A denoiser call's timestep as a number when that costs no device sync (else ``None``)."""
    if isinstance(t, int | float):
        return float(t)
    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
        return float(t.reshape(-1)[0])
    return None


def by_name(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """``bound``'s arguments as a pipeline passes them: by name wherever the signature allows.
    ``BoundArguments.args`` would hand positional-or-keyword parameters on by position, and a
    forward wrapped by diffusers' ``apply_lora_scale`` (FLUX's) reads the LoRA scale only from its
    keyword arguments: by position it is never seen, and the scale is lost."""
    params = bound.signature.parameters
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        return bound.args, bound.kwargs
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


class Phase(enum.Enum):
    """What the encoder module hooks do: run as usual, record their outputs, or replay them."""

    IDLE = "idle"
    RECORD = "record"  # encoder pass
    REPLAY = "replay"  # decoder pass


@dataclass
class Counters:
    """What ran, for tests and summaries (cumulative over runs)."""

    encoder_passes: int = 0
    decoder_passes: int = 0
    decoder_rows: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Run:
    """State of one pipeline call's sampling loop; nothing of it outlives the loop."""

    number: int  # runs started by this engine, numbering them for side models' caches
    timesteps: torch.Tensor  # the loop's timesteps on the model's device, (L,)
    t_host: tuple[float, ...]  # the same on the host: step bookkeeping without device syncs
    key_steps: tuple[int, ...]
    inject: tuple[bool, ...]  # per loop step: prior noise injection before its scheduler update
    step: int = 0  # next loop index the denoiser will be called for
    updates: int = 0  # scheduler updates done
    served: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, ...) prediction
    z_T: torch.Tensor | None = None
    phase: Phase = Phase.IDLE
    features: list[Any] = field(default_factory=list)  # the encoder modules' outputs of the last key step
    feature_layout: Any = None  # how rank 0's features travel (rank0 placement), fixed for the run
    rows: torch.Tensor | None = None  # in a decoder pass: the input row each decoder row serves, (n,)
    batch_rows: int = 1  # rows per step in the pipeline's denoiser call
    pending: tuple[Any, torch.Tensor] | None = None  # async broadcast of features and its buffer
    device_t: list[torch.Tensor] = field(default_factory=list)  # call timesteps checked at the end
    failure: BaseException | None = None  # a pass that failed on this rank (several ranks only)
    failure_shared: bool = False  # every rank knows of ``failure`` (it came through a collective)

    @property
    def length(self) -> int:
        return len(self.t_host)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        config: FasterDiffusionConfig,
        ctx: DistContext,
        passes: Passes | None = None,
    ) -> None:
        self.model, self.adapter, self.config, self.ctx = model, adapter, config, ctx
        # How the encoder and decoder passes run: eagerly, or compiled (a compiled denoiser; passes.py).
        self.passes = passes or EagerPasses()
        self.modules = adapter.encoder_modules(model)
        self.signature = inspect.signature(model.forward)
        self.run: Run | None = None
        self.runs = 0
        self.counters = Counters()

    # Called by the encoder module hooks.

    def module_forward(self, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        run = self.run
        phase = Phase.IDLE if run is None else run.phase
        if phase is Phase.RECORD:
            out = original(*args, **kwargs)
            last = index == len(self.modules) - 1
            run.features[index] = out if self.modules[index].keep or last else None
            if last:
                raise EncoderDone
            return out
        if phase is Phase.REPLAY:
            mod = self.modules[index]
            cached = run.features[index] if mod.keep else run.features[-1]
            if not mod.keep and mod.part is not None:
                cached = cached[mod.part]
            return pytree.tree_map_only(torch.Tensor, self._select_rows, cached)
        return original(*args, **kwargs)

    def _select_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a cached feature for the decoder batch; a feature of B*k rows (video frames) keeps
        each input row's k consecutive rows together."""
        run = self.run
        if run.rows is None:  # the decoder rows are the input rows, in order
            # A clone keeps the memory layout a vanilla call would see, and keeps the cache safe
            # from in-place ops in the decoder (FreeU, T2I adapters) that later steps would inherit.
            return t.clone()
        per = t.shape[0] // run.batch_rows
        if per * run.batch_rows != t.shape[0]:
            raise RuntimeError(
                f"distfd: cached feature of batch {t.shape[0]} does not divide into {run.batch_rows} rows."
            )
        if per == 1:
            return t.index_select(0, run.rows)
        idx = (run.rows[:, None] * per + torch.arange(per, device=run.rows.device)).reshape(-1)  # (n * k,)
        return t.index_select(0, idx)

    def failure_code(self) -> int:
        """What this rank brings to an agreement about the current run (GO_ON when none runs)."""
        return failure_code(self.run.failure) if self.run is not None else failure_code(None)

    # Called by the scheduler hooks.

    def end_run(self) -> None:
        """Drop the current run (its timesteps were set anew, or the pipeline was unhooked)."""
        self.run = None

    def before_update(self, sample: torch.Tensor) -> torch.Tensor:
        """Prior noise injection (Sec. 3.3): ``z_t += alpha * z_T`` for timesteps below the threshold."""
        run = self.run
        if run is None or run.updates >= run.length:
            return sample
        if run.z_T is None:
            run.z_T = sample.clone()
        if self.config.noise_alpha > 0 and run.inject[run.updates]:
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
            self._check_call_timesteps(run)
            self.end_run()
            if self.ctx.world_size > 1:
                code = self.ctx.agree(failure_code(run.failure))
                if code:
                    raise stopped(run.failure, code)

    # Called by side-model hooks: a model the pipeline calls in each loop step before the denoiser.

    def upcoming_call(self, timestep) -> tuple[int, bool]:
        """(run number, is a key step) for the denoiser call that follows in this loop step.

        Before a run has started (or after the last one finished) the call opens a new run, at its
        step 0, always a key step. A timestep other than the expected one (where it can be read
        without a device sync) also counts as key: the side model then computes rather than reuse
        something stale.
        """
        run = self.run
        if run is None or run.step >= run.length:
            return self.runs + 1, True
        got = host_timestep(timestep)
        same = got is None or got == run.t_host[run.step]
        return run.number, run.step in run.key_steps or not same

    # Called by the denoiser hook once per loop step.

    def denoiser_forward(self, original: Callable, args: tuple, kwargs: dict, scheduler: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        call = bound.arguments
        self.adapter.check_call(call)
        t = call[self.adapter.timestep_arg]
        run = self.run
        if run is None or run.step >= run.length:
            run = self._start_run(call, scheduler)
        i = run.step
        self._check_call(run, i, t)
        if i not in run.served:
            if i in run.key_steps:
                self._encode(original, bound, run, i)
            self._decode(
                original, bound, run, chunk_after(i, run.key_steps, run.length, self.config.decode_width)
            )
        pred = run.served.pop(i)
        run.step += 1
        self.counters.steps += 1
        return self.adapter.make_output(pred, bool(call.get("return_dict", True)))

    # Internals.

    def _check_call(self, run: Run, i: int, t) -> None:
        """The call must be loop step ``i``'s: one denoiser call per scheduler update, at its timestep."""
        if run.updates != i:
            raise RuntimeError(
                f"distfd: the denoiser was called for loop step {i} after {run.updates} scheduler updates: "
                "this pipeline calls the denoiser in a pattern distfd does not support (one call per "
                f"scheduler timestep){self.adapter.repeat_call_hint}."
            )
        got = host_timestep(t)
        if got is None:  # on a GPU: compared at the end of the run, without a sync per step
            run.device_t.append(torch.as_tensor(t).reshape(-1)[:1])
        elif got != run.t_host[i]:
            raise RuntimeError(
                f"distfd expected the denoiser call for loop step {i} (timestep {run.t_host[i]}) but got "
                f"timestep {got}: this pipeline calls the denoiser in a pattern distfd does not support "
                "(one call per scheduler timestep)."
            )

    def _check_call_timesteps(self, run: Run) -> None:
        if not run.device_t:
            return
        got = torch.cat(run.device_t).double().cpu()  # one sync per run
        want = torch.tensor(run.t_host[: len(got)], dtype=torch.float64)
        if not torch.equal(got, want):
            bad = int((got != want).nonzero()[0])
            raise RuntimeError(
                f"distfd: the denoiser call for loop step {bad} had timestep {float(got[bad])}, expected "
                f"{want[bad].item()}: this pipeline calls the denoiser in a pattern distfd does not support."
            )

    def _start_run(self, call: dict, scheduler: Any) -> Run:
        self.end_run()
        sample, t = call[self.adapter.sample_arg], call[self.adapter.timestep_arg]
        sched_t = scheduler.timesteps
        sched_host = [float(x) for x in sched_t.tolist()]  # one sync per run
        all_t = self.adapter.call_timesteps(sched_t, sample)  # as the pipeline passes them (FLUX: t/1000)
        t_host = sched_host if all_t is sched_t else [float(x) for x in all_t.tolist()]
        t0 = float(torch.as_tensor(t).reshape(-1)[0])
        if t0 not in t_host:
            raise RuntimeError(
                f"distfd: the denoiser was called with timestep {t0}, which is not in scheduler.timesteps; "
                "call it through the pipeline (which sets the scheduler's timesteps first)."
            )
        offset = t_host.index(t0)  # img2img and inpainting start part-way
        timesteps, t_host = all_t[offset:].to(sample.device), tuple(t_host[offset:])
        num_steps = getattr(scheduler, "num_inference_steps", None) or len(t_host)
        key_steps = self.config.key_steps.resolve(num_steps, len(t_host), self.config.rescale_key_steps)
        self.runs += 1
        self.run = Run(self.runs, timesteps, t_host, key_steps, self._inject(scheduler, sched_host[offset:]))
        self.ctx.stats.reset()
        if self.ctx.world_size > 1:
            cond = self.adapter.condition_tensor(call)
            check_agreement(self.ctx, fingerprint(self.config, key_steps, t_host, sample, cond))
        self._log_run(key_steps, len(t_host), sample.shape[0])
        return self.run

    def _inject(self, scheduler: Any, sched_host: list[float]) -> tuple[bool, ...]:
        """Which loop steps get prior noise injection: timestep below ``noise_below`` of the horizon.

        Flow matching (``FlowMatchEulerDiscreteScheduler``) sets ``timesteps = sigmas * horizon``, so
        this is ``sigma < noise_below``: with ``x_t = (1 - sigma) x_0 + sigma * noise`` the second half
        of the path, nearer the image than the noise, as "t < T/2" is for DDPM schedules. The shift
        (FLUX's resolution-dependent one too) moves which loop steps those are, not the definition.
        """
        limit = self.config.noise_below * scheduler.config.num_train_timesteps
        return tuple(x < limit for x in sched_host)

    def _log_run(self, key_steps: tuple[int, ...], length: int, batch: int) -> None:
        if not self.ctx.is_main:
            return
        logger.info(
            "distfd %s: %d steps, key steps %s, %d rank(s)",
            self.config.mode,
            length,
            list(key_steps),
            self.ctx.world_size,
        )
        most = max(len(chunk_after(k, key_steps, length, None)) for k in key_steps) * batch
        if self.config.mode == "parallel" and self.ctx.world_size > most:
            logger.info(
                "world size %d exceeds the largest decoder batch (%d rows): some ranks will idle",
                self.ctx.world_size,
                most,
            )

    def _encode(self, original: Callable, bound: inspect.BoundArguments, run: Run, i: int) -> None:
        ctx, placement = self.ctx, self.config.encoder
        ctx.stats.tag = i
        if placement == "replicated" and ctx.world_size > 1:
            sample = bound.arguments[self.adapter.sample_arg].contiguous()
            ctx.broadcast(sample, src=0)  # rank 0's latents are the authority, for the decoder too
            bound.arguments[self.adapter.sample_arg] = sample
        if (ctx.is_main or placement == "replicated") and run.failure is None:
            self._guarded(run, lambda: self._encoder_pass(original, bound, run))
        if placement == "rank0" and ctx.world_size > 1:
            self._share_features(run)

    def _encoder_pass(self, original: Callable, bound: inspect.BoundArguments, run: Run) -> None:
        run.features = [None] * len(self.modules)
        run.phase = Phase.RECORD
        try:
            reached = self.passes.encode(original, *by_name(bound))
        finally:
            run.phase = Phase.IDLE
        if not reached:
            raise RuntimeError("distfd: the encoder pass never reached its last encoder module.")
        run.features = self.passes.keep(run.features)
        self.counters.encoder_passes += 1

    def _guarded(self, run: Run, work: Callable[[], Any]) -> Any:
        """Run one pass; with several ranks a failure is kept on the run (see the module docstring)
        and None returned, so that this rank still joins the collectives that follow."""
        if self.ctx.world_size == 1:
            return work()
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - raised on every rank at the next agreement
            logger.warning(
                "rank %d: a pass failed (%s: %s); stopping with the other ranks",
                self.ctx.rank,
                type(e).__name__,
                e,
            )
            run.failure = e
            return None

    def _share_features(self, run: Run) -> None:
        """Broadcast rank 0's encoder features; rank 0 does not wait (it decodes meanwhile).

        Each distinct tensor is sent once (a UNet down block's last skip tensor is its output too), as
        one flat buffer. The layout (a copy of the features' nesting with each tensor replaced by the
        index of its distinct tensor, and their shapes) is sent once per run, as plain Python objects.
        """
        ctx = self.ctx
        if run.failure_shared:  # every rank knows the image is lost: nothing left to send
            return
        if run.feature_layout is None and ctx.is_main and run.failure is not None:
            # No layout yet, so the others could not size a buffer of zeros: tell them instead.
            ctx.broadcast_object(("stopped", failure_code(run.failure)), src=0)
            run.failure_shared = True
            return
        if ctx.is_main and run.failure is not None:  # the others wait for features: zeros, same size
            skeleton, shapes = run.feature_layout
            total = sum(int(torch.Size(shape).numel()) for shape, _ in shapes)
            flat = torch.zeros(total, dtype=shapes[0][1], device=ctx.device)
            ctx.wait(ctx.broadcast(flat, src=0, async_op=True))
            return
        if ctx.is_main:
            first: dict[int, torch.Tensor] = {}
            for x in pytree.tree_leaves(run.features):
                if isinstance(x, torch.Tensor):
                    first.setdefault(id(x), x)
            distinct = list(first.values())
        if run.feature_layout is None:
            layout = None
            if ctx.is_main:
                index = {key: n for n, key in enumerate(first)}
                skeleton = pytree.tree_map_only(torch.Tensor, lambda x: index[id(x)], run.features)
                layout = (skeleton, [(tuple(x.shape), x.dtype) for x in distinct])
            layout = ctx.broadcast_object(layout, src=0)
            if isinstance(layout, tuple) and layout[0] == "stopped":  # rank 0's first encoder pass failed
                run.failure, run.failure_shared = peer_failed(layout[1]), True
                return
            run.feature_layout = layout
        skeleton, shapes = run.feature_layout
        dtype = shapes[0][1]
        if any(d != dtype for _, d in shapes):
            raise RuntimeError("distfd: encoder features of mixed dtypes are not supported across ranks.")
        if ctx.is_main:
            flat = torch.cat([x.reshape(-1) for x in distinct])
            run.pending = (ctx.broadcast(flat, src=0, async_op=True), flat)  # flat kept alive until done
            return
        sizes = [int(torch.Size(shape).numel()) for shape, _ in shapes]
        flat = torch.empty(sum(sizes), dtype=dtype, device=ctx.device)
        ctx.wait(ctx.broadcast(flat, src=0, async_op=True))
        parts = [part.view(shape) for part, (shape, _) in zip(flat.split(sizes), shapes, strict=True)]
        run.features = pytree.tree_map(lambda r: None if r is None else parts[r], skeleton)

    def _decode(self, original: Callable, bound: inspect.BoundArguments, run: Run, steps: range) -> None:
        sample = bound.arguments[self.adapter.sample_arg]
        ctx, rows_per_step = self.ctx, sample.shape[0]
        shares = shard(len(steps) * rows_per_step, ctx.world_size)
        mine = shares[ctx.rank]
        local = None
        if len(mine) and run.failure is None:
            local = self._guarded(run, lambda: self._decode_rows(original, bound, run, steps, mine, sample))
        if local is None:  # no rows here, or the image is lost: zeros keep the gather's shapes
            dtype = next(self.model.parameters()).dtype
            shape = (len(mine), *self.adapter.output_row_shape(self.model, sample))
            local = sample.new_zeros(shape, dtype=dtype)
        if run.pending is not None:
            ctx.wait(run.pending[0])
            run.pending = None
        preds = ctx.all_gather_rows(local, shares)  # (len(steps) * B, ...)
        for j, step in enumerate(steps):
            run.served[step] = preds[j * rows_per_step : (j + 1) * rows_per_step]

    def _decode_rows(
        self, original: Callable, bound: inspect.BoundArguments, run: Run, steps: range, mine: range, sample
    ) -> torch.Tensor:
        """This rank's share ``mine`` of the decoder rows of ``steps``, as one decoder pass."""
        rows_per_step = sample.shape[0]
        idx = torch.arange(mine.start, mine.stop, device=sample.device)
        src = idx % rows_per_step  # which input row (CFG half, image) each decoder row serves
        t_rows = run.timesteps[steps.start + idx // rows_per_step]  # (n,)
        # One step's rows in order (propagation, all-key steps): no copies, so the decoder sees
        # the very tensors (and memory layouts) a vanilla call would.
        same = len(mine) == rows_per_step and mine.start % rows_per_step == 0
        # The tensors built for this batch (rows first): a compiled pass with dynamic shapes marks
        # their rows dynamic (passes.py).
        fresh: list[torch.Tensor] = [] if same else [src, t_rows]

        def select(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 0 or x.shape[0] != rows_per_step:
                return x
            fresh.append(x.index_select(0, src.to(x.device)))
            return fresh[-1]

        args = dict(bound.arguments)
        if not same:
            for name, value in args.items():
                if name not in (self.adapter.sample_arg, self.adapter.timestep_arg, *self.adapter.unbatched):
                    args[name] = pytree.tree_map_only(torch.Tensor, select, value)
        args[self.adapter.sample_arg] = sample if same else select(sample)
        args[self.adapter.timestep_arg] = t_rows
        call = inspect.BoundArguments(bound.signature, args)
        run.phase, run.rows, run.batch_rows = Phase.REPLAY, None if same else src, rows_per_step
        try:
            out = self.passes.decode(original, *by_name(call), fresh)
            local = self.passes.keep(self.adapter.get_sample(out))
        finally:
            run.phase, run.rows = Phase.IDLE, None
        self.counters.decoder_passes += 1
        self.counters.decoder_rows += len(mine)
        return local


def stopped(failure: BaseException | None, code: int) -> StoppedTogether:
    """The error a rank raises once the ranks agreed to stop: its own failure's text where it had one."""
    if failure is None or isinstance(failure, StoppedTogether):
        return peer_failed(code)
    err = StoppedTogether(code, f"{type(failure).__name__}: {failure}")
    err.__cause__ = failure
    return err
