"""One image request, validated the same way whichever way it arrives (CLI, JSON line, HTTP body).

:class:`ImageRequest` holds every per-image value that changes the image. Its checks are the ones
that need no model; :func:`check_for_model` adds those that need the model's facts
(:class:`ModelFacts`, read from the pipeline folder's JSON configs without loading weights, or from a
loaded pipeline), so every check runs before the expensive part. Errors are ``ValueError`` (or
``TypeError`` for a wrong type) naming the field and the fix. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import PRESETS
from .validate import is_int, shown

if TYPE_CHECKING:
    from .keysteps import KeySteps

MODES = ("propagate", "parallel", "off")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_unicode(name: str, text: str | None) -> None:
    """Text a tokenizer can read: no lone surrogate (JSON's ``"\\ud800"`` decodes to one)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} holds a character that is not valid Unicode (a lone surrogate at position {e.start}); "
            "send UTF-8 text."
        ) from None


def _check_key_steps(value: Any) -> str | tuple[int, ...] | KeySteps | None:
    """The request's key steps, checked by :meth:`distfd.keysteps.KeySteps.parse` (the rules every
    way of giving them meets): None (the default for the model, scheduler and steps), a preset name or
    'uniform-K' (kept as given), loop indices (sorted), or a preset file read here, once, and kept
    as its parsed :class:`~distfd.keysteps.KeySteps` (a later run does not read the file again)."""
    if value is None:
        return None
    from .keysteps import KeySteps

    if isinstance(value, KeySteps):
        return value
    if isinstance(value, str):  # a list written '0,1,5' ends as indices, like a JSON list
        parsed = KeySteps.parse(value)
        if parsed.source == "list":
            return tuple(parsed.indices)
        return parsed if parsed.built_for is not None and value.strip() not in PRESETS else value.strip()
    if isinstance(value, list | tuple):
        parsed = KeySteps.parse(list(value))
        return tuple(parsed.indices)
    raise TypeError(
        f"key_steps must be a preset name, a .json path or a list of integers; got {_type_name(value)}."
    )


@dataclass(frozen=True)
class ImageRequest:
    """Everything about one image that changes its pixels (the pipeline and scheduler aside).

    Args:
        prompt: The text prompt (non-empty).
        negative_prompt: Text to steer away from; needs classifier-free guidance (guidance_scale > 1).
        seed: Seed of the CPU generator for the starting noise, 0 .. 2**64-1.
        steps: Sampling steps (``num_inference_steps``), >= 1.
        guidance_scale: Classifier-free guidance scale. Values > 1 enable guidance; 0 and 1 both mean
            "no guidance" (the pipeline uses the conditional prediction alone). Negative values and
            values strictly between 0 and 1 are refused: the pipeline would silently treat them as 1.
        height, width: Image size in pixels; None takes the model's default for that side only.
        key_steps: Key steps for FasterDiffusion; None is the default for the model, scheduler and
            step count. Refused with ``mode='off'``, which ignores them.
        mode: 'propagate', 'parallel' (FasterDiffusion), or 'off' (the vanilla pipeline).
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    key_steps: str | tuple[int, ...] | KeySteps | None = None
    mode: str = "parallel"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a string; got {_type_name(self.prompt)}.")
        if not self.prompt.strip():
            raise ValueError("prompt is empty; give the text of the image to generate.")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(
                f"negative_prompt must be a string or null; got {_type_name(self.negative_prompt)}."
            )
        for name in ("prompt", "negative_prompt"):
            _check_unicode(name, getattr(self, name))
        if not is_int(self.seed):
            raise TypeError(f"seed must be an integer; got {shown(self.seed)} ({_type_name(self.seed)}).")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0 .. 2**64-1; got {shown(self.seed)}.")
        if not is_int(self.steps):
            raise TypeError(f"steps must be an integer; got {shown(self.steps)} ({_type_name(self.steps)}).")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {shown(self.steps)}.")
        self._check_guidance()
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is None:
                continue
            if not is_int(v):
                raise TypeError(
                    f"{side} must be an integer number of pixels; got {shown(v)} ({_type_name(v)})."
                )
            if v < 8:
                raise ValueError(f"{side} must be at least 8 pixels; got {shown(v)}.")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {shown(self.mode)}.")
        object.__setattr__(self, "key_steps", _check_key_steps(self.key_steps))
        if self.mode == "off" and self.key_steps is not None:
            raise ValueError(
                "key_steps were given with mode 'off' (the vanilla pipeline), which ignores them; "
                "drop key_steps or use mode 'parallel' or 'propagate'."
            )

    def _check_guidance(self) -> None:
        g = self.guidance_scale
        if not _is_number(g):
            raise TypeError(f"guidance_scale must be a number; got {shown(g)} ({_type_name(g)}).")
        try:
            g = float(g)  # a JSON integer may be too large for a float
        except OverflowError:
            raise ValueError(f"guidance_scale must be finite; got {shown(self.guidance_scale)}.") from None
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite; got {g}.")
        if g < 0:
            raise ValueError(
                f"guidance_scale {g} is negative; the pipeline would silently run without guidance "
                "(as with 1). Use a value > 1 for classifier-free guidance, or 1 for none."
            )
        if 0 < g < 1:
            raise ValueError(
                f"guidance_scale {g} is between 0 and 1; the pipeline turns classifier-free guidance off "
                "at <= 1 and would give exactly the image of guidance_scale 1. Use 1 (or 0) for no "
                "guidance, or a value > 1."
            )
        object.__setattr__(self, "guidance_scale", float(g))
        if g <= 1 and self.negative_prompt:
            raise ValueError(
                f"negative_prompt needs classifier-free guidance, which guidance_scale {g:g} turns off "
                "(the pipeline would ignore it); use guidance_scale > 1 or drop negative_prompt."
            )

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Any, defaults: ImageRequest | None = None) -> ImageRequest:
        """A request from a JSON object (a batch line or an HTTP body); missing fields take ``defaults``.

        ``prompt`` is required; unknown fields are refused by name. A request that sets ``mode`` to 'off' without its own
        ``key_steps`` drops the defaults' key steps (vanilla has none).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a request must be a JSON object; got {_type_name(data)}.")
        known = cls.fields()
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(repr(k) for k in unknown)}; known fields: {', '.join(known)}."
            )
        values = dict(data)
        if values.get("mode") == "off" and "key_steps" not in values:
            values["key_steps"] = None
        if isinstance(values.get("key_steps"), list):
            values["key_steps"] = tuple(values["key_steps"])
        if "prompt" not in values:
            raise ValueError("prompt is missing; every request needs one.")
        if defaults is None:
            return cls(**values)
        return dataclasses.replace(defaults, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (key steps as a list)."""
        d = dataclasses.asdict(self)
        if isinstance(self.key_steps, tuple):
            d["key_steps"] = list(self.key_steps)
        elif self.key_steps is not None and not isinstance(self.key_steps, str):  # a preset file, read
            d["key_steps"] = self.key_steps.describe()
        return d

    def digest(self, *context: Any) -> str:
        """A stable hex digest of this request (and any JSON-able context, e.g. model and scheduler)."""
        blob = json.dumps([self.to_dict(), *context], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ModelFacts:
    """What the request checks need to know about a pipeline, read without loading weights.

    Args:
        pipeline_class: The pipeline's class name (``model_index.json``'s ``_class_name``).
        vae_scale_factor: Pixels per latent cell (``2 ** (len(vae block_out_channels) - 1)``).
        sample_size: The denoiser's default latent (height, width), or None if it has none.
        num_train_timesteps: The scheduler's training horizon (bounds ``steps``).
        scheduler_config: The scheduler's config (to count the sampling loop's steps), or None.
        call_params: The pipeline's ``__call__`` parameter names, or None if unknown.
        patch_size: Latent cells per transformer token side (DiT, SD3: the config's ``patch_size``;
            FLUX: 2, its 2x2 latent packing); 1 for a UNet.
    """

    pipeline_class: str
    vae_scale_factor: int = 8
    sample_size: tuple[int, int] | None = None
    num_train_timesteps: int = 1000
    scheduler_config: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    call_params: frozenset[str] | None = dataclasses.field(default=None, compare=False, repr=False)
    patch_size: int = 1

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: diffusers' SD pipelines check multiples of 8,
        the VAE needs whole latent cells and a transformer whole patches (FLUX, SD3: 16)."""
        return math.lcm(8, self.vae_scale_factor * self.patch_size)

    def default_size(self) -> tuple[int, int] | None:
        if self.sample_size is None:
            return None
        h, w = self.sample_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelFacts:
        """Read a saved pipeline folder's ``model_index.json`` and component configs (no weights)."""
        path = Path(path)
        index = _read_json(path / "model_index.json")

        def component(name: str, file: str = "config.json") -> dict[str, Any] | None:
            f = path / name / file
            return _read_json(f) if name in index and f.is_file() else None

        vae = component("vae")
        denoiser = component("unet") or component("transformer")
        sched = component("scheduler", "scheduler_config.json")
        return cls(
            pipeline_class=str(index.get("_class_name", "?")),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1) if vae else 8,
            sample_size=_pair(denoiser.get("sample_size") or _flux_size(index)) if denoiser else None,
            num_train_timesteps=int((sched or {}).get("num_train_timesteps", 1000)),
            scheduler_config=sched,
            call_params=_call_params(str(index.get("_class_name", ""))),
            patch_size=_patch_size(denoiser),
        )

    @classmethod
    def from_pipeline(cls, pipe: Any) -> ModelFacts:
        """The same facts from a loaded pipeline."""
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sched = getattr(pipe, "scheduler", None)
        return cls(
            pipeline_class=type(pipe).__name__,
            # DiT has no vae_scale_factor: read it from the VAE's config, as from_folder does
            vae_scale_factor=int(
                getattr(pipe, "vae_scale_factor", None) or _vae_factor(getattr(pipe, "vae", None))
            ),
            sample_size=_pair(
                getattr(getattr(denoiser, "config", None), "sample_size", None)
                or getattr(pipe, "default_sample_size", None)  # FLUX: 128 latent cells, not in the config
            ),
            num_train_timesteps=int(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000)),
            scheduler_config=dict(sched.config) if sched is not None else None,
            call_params=_signature_names(type(pipe)),
            patch_size=_patch_size(getattr(denoiser, "config", None), type(denoiser).__name__),
        )


def _vae_factor(vae: Any) -> int:
    """Pixels per latent cell of a loaded VAE (``2 ** (len(block_out_channels) - 1)``), 8 without one."""
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def _flux_size(index: Mapping[str, Any]) -> int | None:
    """FluxPipeline's ``default_sample_size`` (its transformer config has no sample size)."""
    return 128 if str(index.get("_class_name", "")).startswith("Flux") else None


def _patch_size(config: Mapping[str, Any] | None, class_name: str | None = None) -> int:
    """Latent cells per token side of a transformer denoiser (1 for a UNet); FLUX packs 2x2 cells."""
    if not config:
        return 1
    name = class_name or str(config.get("_class_name", ""))
    return int(config.get("patch_size") or 1) * (2 if name.startswith("Flux") else 1)


def _signature_names(cls: type) -> frozenset[str] | None:
    import inspect

    try:
        return frozenset(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return None


def _call_params(class_name: str) -> frozenset[str] | None:
    """The ``__call__`` parameters of the diffusers pipeline class called ``class_name`` (no weights)."""
    try:
        import diffusers

        return _signature_names(getattr(diffusers, class_name))
    except (ImportError, AttributeError):
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return data


def _pair(v: Any) -> tuple[int, int] | None:
    if is_int(v):
        return (v, v)
    if isinstance(v, list | tuple) and len(v) == 2 and all(is_int(x) for x in v):
        return (v[0], v[1])
    return None


def check_for_model(
    req: ImageRequest,
    facts: ModelFacts,
    loop_length: int | Callable[[int], int] | None = None,
    key_steps: Any = None,
) -> ImageRequest:
    """The model-dependent checks; returns the request with both sides of the size filled in.

    ``loop_length`` is the number of denoiser calls the sampling loop makes for ``req.steps``, or a
    function of the step count giving it (:func:`distfd.samplers.loop_length`); ``key_steps`` the key
    steps that will run (``req.key_steps`` or the default); they are checked only when both are given.
    """
    params = facts.call_params
    if params is not None:
        name = facts.pipeline_class
        if "prompt" not in params:
            raise ValueError(f"{name} does not take a text prompt; use a text-to-image pipeline.")
        if req.negative_prompt and "negative_prompt" not in params:
            raise ValueError(f"{name} does not take negative_prompt; drop it.")
        if req.uses_guidance and "guidance_scale" not in params:
            raise ValueError(
                f"{name} does not take guidance_scale, so {req.guidance_scale:g} would be ignored; use 1."
            )
    if req.steps > facts.num_train_timesteps:
        raise ValueError(
            f"steps {req.steps} exceeds the scheduler's {facts.num_train_timesteps} training timesteps; "
            f"use at most {facts.num_train_timesteps}."
        )
    default = facts.default_size()
    height, width = req.height, req.width
    if (height is None or width is None) and default is None:
        raise ValueError(f"{facts.pipeline_class} has no default image size; give both height and width.")
    if height is None:
        height = default[0]
    if width is None:
        width = default[1]
    m = facts.size_multiple
    for side, v in (("height", height), ("width", width)):
        if v % m:
            lo, hi = v // m * m, (v // m + 1) * m
            raise ValueError(
                f"{side} {v} is not a multiple of {m} (this model's VAE factor {facts.vae_scale_factor}"
                f"{f' x patch {facts.patch_size}' if facts.patch_size > 1 else ''}, and the pipeline's check "
                f"of 8); use {lo if lo >= m else hi} or {hi}."
            )
    spec = req.key_steps if key_steps is None else key_steps
    if callable(loop_length):
        loop_length = loop_length(req.steps)  # also refuses a step count the scheduler cannot run
    if loop_length is not None and req.mode != "off" and spec is not None:
        from .keysteps import resolve_key_steps

        resolve_key_steps(spec, req.steps, loop_length, allow_rescale=req.key_steps is None)
    if (height, width) == (req.height, req.width):
        return req
    return dataclasses.replace(req, height=height, width=width)


__all__ = ["MODES", "ImageRequest", "ModelFacts", "check_for_model"]
