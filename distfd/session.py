"""A pipeline loaded once on every rank, then any number of images: what `distfd generate` (one image
or a batch) and `distfd serve` run on.

Contract:

- ``Session(ctx, model, scheduler, dtype, ...)`` is built on every rank of ``ctx`` (collective: the
  ranks first check they were given the same settings, then each loads the pipeline on
  ``ctx.device``).
- ``session.check(req)`` is local and cheap: the model-dependent checks of
  :func:`distfd.request.check_for_model` (size multiple, key steps within the loop, steps within the
  horizon). It raises ``ValueError``/``TypeError`` with the message to show the user, and returns the
  request with both sides of the size filled in. Call it before handing a request to the ranks.
- ``session.run(req)`` is collective: every rank calls it with the same request, in the same order
  (a request that differs on one rank raises :class:`DistributedError` naming the field and ranks on
  every rank). It runs exactly what ``distfd generate`` runs and returns a :class:`Result`; every
  rank gets the same image. A peer that dies or hangs ends it with ``DistributedError`` within
  ``ctx.timeout_s``.
- ``session.run_many(reqs)`` makes several images in one pipeline call (a list of prompts, one
  generator per request), so each decoder batch holds more rows; the requests must share a
  :func:`batch_key` (every field but the prompts and the seed). ``run(req)`` is ``run_many([req])``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import samplers
from .request import ImageRequest, ModelFacts, check_for_model
from .runtime import DistContext, DistributedError

logger = logging.getLogger("distfd")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ENCODER_PLACEMENTS = ("rank0", "replicated")


@dataclass
class Result:
    """One generated image.

    Args:
        image: The image (``PIL.Image.Image``), the same on every rank.
        seconds: Wall time of the pipeline call on this rank (GPU work synchronised).
        key_steps: The key steps that ran (0-based loop indices); None for mode 'off'.
        stats: Passes, collectives and this rank's bytes sent in the call (``handle.stats()``).
        request: The request as run (both sides of the size filled in).
    """

    image: Any
    seconds: float
    key_steps: list[int] | None
    stats: dict[str, Any] = field(default_factory=dict)
    request: ImageRequest | None = None


def check_same_on_all_ranks(ctx: DistContext, values: dict[str, Any], what: str) -> None:
    """All-gather ``values``; on every rank, raise naming each field and the ranks that differ."""
    if ctx.world_size == 1:
        return
    gathered = ctx.all_gather_object(values)
    problems = []
    for key, ref in gathered[0].items():
        others = {r: g.get(key) for r, g in enumerate(gathered) if g.get(key) != ref}
        if others:
            listed = ", ".join(f"rank {r} has {v!r}" for r, v in others.items())
            problems.append(f"{key}: rank 0 has {ref!r}, {listed}")
    if problems:
        raise DistributedError(
            f"the ranks were given different {what} ({'; '.join(problems)}). Start every rank with the "
            "same arguments."
        )


def resolve_model(model: str | None) -> str:
    """The path or hub id to load: ``model``, or the embedded model's folder when None or an embedded
    model's name (``embedded-mmdit``)."""
    from .embedded import model_path

    path = model_path(model)
    return model if path is None else str(path)


class Session:
    """A diffusers pipeline loaded once on each rank of ``ctx``; ``run(request)`` makes one image.

    Args:
        ctx: The ranks that share each image (``DistContext.from_env()``; world size 1 is fine).
        model: A saved pipeline folder or hub id, or an embedded model's name; None is the default
            embedded model.
        scheduler: A name from :data:`distfd.samplers.SCHEDULERS`; None: flow-euler for a flow-matching
            model (FLUX, SD3), else ddim.
        dtype: 'fp32', 'fp16' or 'bf16'; None is fp16 on GPU, fp32 on CPU.
        noise_alpha, encoder, max_parallel_steps: :class:`distfd.FasterDiffusionConfig` fields used
            for every request.
        bound_parallel: For requests from others (the service, batch lines): without an operator's
            ``max_parallel_steps``, a request that gives its own key steps decodes at most as many
            steps per batch as the default key steps would for its step count, so no choice of key
            steps (``[0]``: the whole loop in one batch) needs more memory than the default does.
        step_progress: Show the pipeline's per-step progress bar on rank 0.
    """

    def __init__(
        self,
        ctx: DistContext,
        model: str | None = None,
        scheduler: str | None = None,
        dtype: str | None = None,
        *,
        noise_alpha: float = 0.003,
        encoder: str = "rank0",
        max_parallel_steps: int | None = None,
        bound_parallel: bool = False,
        step_progress: bool = False,
    ) -> None:
        if scheduler is not None and scheduler not in samplers.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; use one of {', '.join(samplers.SCHEDULERS)}.")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        self.ctx, self.model, self.scheduler, self.dtype = ctx, model, scheduler, dtype
        self.engine_options = dict(
            noise_alpha=noise_alpha, encoder=encoder, max_parallel_steps=max_parallel_steps
        )
        self.bound_parallel = bound_parallel
        # Fails fast on a bad option, before the ranks load anything.
        from .config import FasterDiffusionConfig

        FasterDiffusionConfig(key_steps=(0,), **self.engine_options)
        check_same_on_all_ranks(ctx, self.settings(), "session settings")
        self._kept = None  # distfd's handle kept applied across requests (compiled denoiser)
        self._defaults: dict[int, tuple[Any, bool]] = {}  # steps -> (parsed default key steps, rescale)
        self.pipe = self._load(step_progress)
        self.facts = ModelFacts.from_pipeline(self.pipe)
        from .adapters import call_defaults

        self.call_defaults = call_defaults(self.pipe)  # the embedded MMDiT: its T5 sequence length

    def settings(self) -> dict[str, Any]:
        """What, besides the request, changes the image (in the manifest and the rank check)."""
        return settings_of(self.model, self.scheduler, self.dtype, **self.engine_options)

    def _load(self, step_progress: bool) -> Any:
        import diffusers
        import torch

        dtype = (
            getattr(torch, DTYPES[self.dtype])
            if self.dtype
            else (torch.float16 if self.ctx.device.type == "cuda" else torch.float32)
        )
        start = time.perf_counter()
        pipe = diffusers.DiffusionPipeline.from_pretrained(resolve_model(self.model), dtype=dtype)
        self.scheduler = samplers.resolve(self.scheduler, pipe.scheduler.config)  # None: the model's kind
        samplers.set_scheduler(pipe, self.scheduler)
        pipe.set_progress_bar_config(disable=not (step_progress and self.ctx.is_main))
        pipe = pipe.to(self.ctx.device)
        logger.debug("pipeline loaded in %.1fs", time.perf_counter() - start)
        return pipe

    def default_key_steps(self, steps: int) -> tuple[str, bool]:
        """(key steps, rescale) for a request that gives none; see :func:`default_key_steps`."""
        return default_key_steps(self.model, self.scheduler, steps)

    def key_steps_spec(self, req: ImageRequest) -> tuple[Any, bool]:
        """(parsed key steps, rescale) of ``req``; a default (a shipped preset file, say) is read once
        per step count, not at every request."""
        from .keysteps import KeySteps

        if req.key_steps is not None:
            return KeySteps.parse(req.key_steps), False
        if req.steps not in self._defaults:
            spec, rescale = self.default_key_steps(req.steps)
            self._defaults[req.steps] = (KeySteps.parse(spec), rescale)
        return self._defaults[req.steps]

    def check(self, req: ImageRequest) -> ImageRequest:
        """The model-dependent checks (local, no collective); returns the request as it will run."""
        if not isinstance(req, ImageRequest):
            raise TypeError(f"expected an ImageRequest; got {type(req).__name__}.")
        spec, _ = self.key_steps_spec(req)
        return check_for_model(req, self.facts, loop_length=self._loop_length, key_steps=spec)

    def _loop_length(self, steps: int) -> int:
        return samplers.loop_length(self.scheduler, self.pipe.scheduler.config, steps)

    def _config(self, req: ImageRequest):
        from .config import FasterDiffusionConfig

        spec, rescale = self.key_steps_spec(req)
        options = dict(self.engine_options)
        if self.bound_parallel and options["max_parallel_steps"] is None and req.key_steps is not None:
            options["max_parallel_steps"] = self.default_parallel_steps(req.steps)
        return FasterDiffusionConfig(key_steps=spec, mode=req.mode, rescale_key_steps=rescale, **options)

    def default_parallel_steps(self, steps: int) -> int:
        """The most steps one decoder batch of the default key steps holds for ``steps`` steps."""
        from .schedule import groups

        spec, rescale = self.key_steps_spec(ImageRequest("x", steps=steps))
        loop = self._loop_length(steps)
        return max(len(g) for g in groups(spec.resolve(steps, loop, rescale), loop))

    def _resolved(self, req: ImageRequest, config) -> list[int]:
        return list(
            config.key_steps.resolve(req.steps, self._loop_length(req.steps), config.rescale_key_steps)
        )

    def key_steps_for(self, req: ImageRequest) -> list[int] | None:
        """The key steps ``req`` runs with (None for mode 'off')."""
        return None if req.mode == "off" else self._resolved(req, self._config(req))

    def warmup(self) -> None:
        """One short vanilla call (2 steps, or the scheduler's minimum): first-call costs out of the
        way before timing."""
        config = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(**{**config, "disable": True})
        try:
            steps = max(2, samplers.min_steps(self.scheduler, self.pipe.scheduler.config))
            self._call([self.check(ImageRequest("warm-up", steps=steps, mode="off"))])
        finally:
            self.pipe._progress_bar_config = config

    def run(
        self,
        req: ImageRequest,
        *,
        ctx: DistContext | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """One image on all ranks of ``ctx`` (collective; every rank passes the same request).

        ``ctx``: the ranks sharing this image, the session's own by default (a service or a batch runs
        images on groups of its ranks). ``cancelled``: read at every step boundary; once it is true on
        any rank, every rank stops the image there with :class:`~distfd.runtime.StoppedTogether`
        (CANCELLED), as they do when a rank's pass fails (FAILED, OUT_OF_MEMORY). Without it a
        failure is raised on every rank at the end of the loop (:mod:`distfd.gate`).
        """
        return self.run_many([req], ctx=ctx, cancelled=cancelled)[0]

    def run_many(
        self,
        reqs: list[ImageRequest],
        *,
        ctx: DistContext | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Result]:
        """The images of ``reqs`` in one pipeline call, in order (collective, as :meth:`run`).

        The requests must share a :func:`batch_key`; each image is the one its request makes alone
        (its own seed's noise; rows do not mix) up to float rounding: kernels may round a larger
        batch differently."""
        ctx = self.ctx if ctx is None else ctx
        if not reqs:
            raise ValueError("run_many needs at least one request.")
        reqs = [self.check(r) for r in reqs]
        keys = {batch_key(r) for r in reqs}
        if len(keys) > 1:
            raise ValueError(
                "requests in one call must share every field but prompt, negative prompt and seed; "
                f"got {len(keys)} different combinations."
            )
        if len(reqs) == 1:
            check_same_on_all_ranks(ctx, reqs[0].to_dict(), "requests")
        else:
            flat = {f"requests[{i}].{k}": v for i, r in enumerate(reqs) for k, v in r.to_dict().items()}
            check_same_on_all_ranks(ctx, flat, "requests")
        req = reqs[0]
        if req.mode == "off":
            self._drop_kept()
            images, seconds = self._call_together(reqs, ctx, cancelled, None)
            stats = {"collectives": 0, "bytes_sent": 0}
            return [Result(im, seconds, None, stats, r) for im, r in zip(images, reqs, strict=True)]
        config = self._config(req)  # the key steps parsed once for this call
        key_steps = self._resolved(req, config)
        handle = self._apply(config, ctx)
        counted = handle.engine.counters.as_dict()  # cumulative on a kept handle: this call's share
        try:
            images, seconds = self._call_together(reqs, ctx, cancelled, handle.engine)
            stats = {k: v - counted.get(k, 0) if k in counted else v for k, v in handle.stats().items()}
        finally:
            if handle is not self._kept:
                handle.remove()
        return [Result(im, seconds, key_steps, stats, r) for im, r in zip(images, reqs, strict=True)]

    def _call_together(
        self, reqs: list[ImageRequest], ctx: DistContext, cancelled, engine
    ) -> tuple[list[Any], float]:
        """The pipeline call, stopped together on every rank (:mod:`distfd.gate`)."""
        from .gate import StepGate, call_together

        params = self.facts.call_params
        gate = None
        if cancelled is not None and (params is None or "callback_on_step_end" in params):
            gate = StepGate(ctx, cancelled, engine)
        steps = self._loop_length(reqs[0].steps)
        return call_together(ctx, lambda: self._call(reqs, gate), engine, gate, steps)

    def _apply(self, config, ctx: DistContext) -> Any:
        """distfd on the pipeline for one request. With a compiled denoiser the handle stays applied
        while requests share a config and ranks: applying again would make distfd compile its passes
        again."""
        import distfd

        if self._kept is not None and self._kept.config == config and self._kept.context is ctx:
            return self._kept
        self._drop_kept()
        handle = distfd.apply(self.pipe, config, context=ctx)
        if handle.engine.passes.compiled:
            self._kept = handle
        return handle

    def _drop_kept(self) -> None:
        if self._kept is not None:
            self._kept.remove()
            self._kept = None

    def _call(self, reqs: list[ImageRequest], gate: Any = None) -> tuple[list[Any], float]:
        """One pipeline call for ``reqs`` (sharing a batch key): one prompt and generator each, or
        for one request the plain values, as ``distfd generate`` passes them."""
        import torch

        req, many = reqs[0], len(reqs) > 1
        prompts = [r.prompt for r in reqs] if many else req.prompt
        kw: dict[str, Any] = dict(
            self.call_defaults,
            prompt=prompts,
            num_inference_steps=req.steps,
            height=req.height,
            width=req.width,
        )
        params = self.facts.call_params
        if params is None or "guidance_scale" in params:
            kw["guidance_scale"] = req.guidance_scale
        if req.negative_prompt is not None:  # the batch key: all or none of them have one
            kw["negative_prompt"] = [r.negative_prompt for r in reqs] if many else req.negative_prompt
        if gate is not None:
            kw["callback_on_step_end"] = gate
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
        cuda = self.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.ctx.device)
        start = time.perf_counter()
        images = self.pipe(generator=generators if many else generators[0], **kw).images
        if cuda:
            torch.cuda.synchronize(self.ctx.device)
        return list(images[: len(reqs)]), time.perf_counter() - start


def settings_of(
    model: str | None, scheduler: str, dtype: str | None, **engine_options: Any
) -> dict[str, Any]:
    """:meth:`Session.settings` of a session with these options (known before it loads)."""
    return {
        "model": model or "embedded:tiny-shapes",
        "scheduler": scheduler,
        "dtype": dtype,
        **engine_options,
    }


# The fields of a request that may differ between the images of one pipeline call: each image brings
# its own text and generator. Every other field changes the whole call (size, steps, guidance, mode,
# key steps, and any field added later), so it is part of the batch key.
PER_IMAGE_FIELDS = ("prompt", "negative_prompt", "seed")


def batch_key(req: ImageRequest) -> tuple:
    """Requests with equal keys can share one pipeline call (:meth:`Session.run_many`): every field
    of :class:`ImageRequest` but the per-image ones (:data:`PER_IMAGE_FIELDS`) equal, and a negative
    prompt on all or none (the pipeline takes a list of them or none)."""
    shared = tuple(
        (f.name, _hashable(getattr(req, f.name)))
        for f in dataclasses.fields(req)
        if f.name not in PER_IMAGE_FIELDS
    )
    return (*shared, ("has_negative_prompt", req.negative_prompt is not None))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def default_key_steps(model: str | None, scheduler: str, steps: int) -> tuple[str, bool]:
    """(key steps, rescale) when a request gives none: on an embedded model (``model`` None or a
    name) its calibrated set for this scheduler and step count where one ships, else the paper's
    preset for the scheduler (``sd-dpm-20`` for DPM-Solver++, ``sd-ddim-50`` otherwise) rescaled to
    ``steps``."""
    from .embedded import calibrated_key_steps, is_embedded

    if is_embedded(model):
        path = calibrated_key_steps("dpm" if scheduler == "dpm++" else scheduler, steps, model)
        if path:
            return str(path), False
    return ("sd-dpm-20" if scheduler.startswith("dpm") else "sd-ddim-50"), True


def model_facts_from_path(model: str | None) -> ModelFacts | None:
    """Facts of a local pipeline folder (the embedded one for None); None for a hub id."""
    path = Path(resolve_model(model))
    if (path / "model_index.json").is_file():
        return ModelFacts.from_folder(path)
    return None


__all__ = [
    "Result",
    "Session",
    "batch_key",
    "check_same_on_all_ranks",
    "default_key_steps",
    "model_facts_from_path",
    "resolve_model",
    "settings_of",
]
