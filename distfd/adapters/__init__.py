"""Registry of supported denoisers and pipelines."""

from __future__ import annotations

from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet3DConditionModel,
)

from .base import Adapter, EncoderModule
from .dit import DIT_PIPELINES, PIXART_PIPELINES, DiTAdapter
from .mmdit import flux_adapter, sd3_adapter
from .unet import UNET_PIPELINES, UNetAdapter
from .unet3d import UNET3D_PIPELINES, UNet3DAdapter

# Denoiser class -> adapter. Looked up by exact class first, then by isinstance.
REGISTRY: dict[type, Adapter] = {
    UNet2DConditionModel: UNetAdapter("unet", "unet", pipelines=UNET_PIPELINES),
    UNet3DConditionModel: UNet3DAdapter("unet3d", "unet", pipelines=UNET3D_PIPELINES),
    DiTTransformer2DModel: DiTAdapter("dit", pipelines=DIT_PIPELINES),
    PixArtTransformer2DModel: DiTAdapter("pixart", pipelines=PIXART_PIPELINES),
    FluxTransformer2DModel: flux_adapter(),
    SD3Transformer2DModel: sd3_adapter(),
}

# Pipelines whose denoiser is supported but whose sampling loop is not, and why.
UNSUPPORTED: dict[str, str] = {
    "TextToVideoZeroPipeline": (
        "its __call__ denoises the first frame down to T_1 and T_0, noises it forward again and then "
        "repeats the timesteps from T_1 on all frames (with a deep copy of the scheduler and no "
        "set_timesteps in between), so the UNet is called more than once per scheduler timestep and "
        "distfd cannot tell which loop step a call belongs to; its cross-frame attention also reads "
        "the video length from the batch size, which a parallel decoder batch (steps x frames rows) "
        "would break"
    ),
}


def register(model_cls: type, adapter: Adapter) -> None:
    REGISTRY[model_cls] = adapter


def supported() -> dict[str, list[str]]:
    """Denoiser class name -> the pipeline class names tested with it."""
    return {cls.__name__: list(a.pipelines) for cls, a in REGISTRY.items()}


def _pipeline_ok(pipe, adapter: Adapter) -> bool:
    names = {c.__name__ for c in type(pipe).__mro__}
    return bool(names & set(adapter.pipelines))


def find_adapter(pipe) -> tuple[Adapter, object]:
    """The adapter and denoiser for ``pipe``; a clear error for anything unsupported."""
    listing = "; ".join(f"{m}: {', '.join(p)}" for m, p in supported().items())
    reason = UNSUPPORTED.get(type(pipe).__name__)
    if reason is not None:
        raise ValueError(f"{type(pipe).__name__} is not supported by distfd: {reason}. Supported: {listing}.")
    for adapter in REGISTRY.values():
        model = getattr(pipe, adapter.denoiser_attr, None)
        if model is None:
            continue
        model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps it in an OptimizedModule
        match = REGISTRY.get(type(model)) or next(
            (a for cls, a in REGISTRY.items() if isinstance(model, cls)), None
        )
        if match is None:
            raise ValueError(
                f"{type(model).__name__} is not supported by distfd (pipeline {type(pipe).__name__}). "
                f"Supported: {listing}."
            )
        if not _pipeline_ok(pipe, match):
            raise ValueError(
                f"{type(pipe).__name__} is not supported by distfd (its {type(model).__name__} is, in: "
                f"{', '.join(match.pipelines)}). Supported: {listing}."
            )
        return match, model
    raise ValueError(
        f"{type(pipe).__name__} is not supported by distfd: it has no denoiser distfd knows. Supported: {listing}."
    )


def call_defaults(pipe) -> dict:
    """The arguments every distfd call of ``pipe`` passes besides the request's
    (:meth:`Adapter.call_defaults`: the embedded MMDiT's T5 sequence length)."""
    return find_adapter(pipe)[0].call_defaults(pipe)


__all__ = [
    "Adapter",
    "EncoderModule",
    "REGISTRY",
    "UNSUPPORTED",
    "call_defaults",
    "find_adapter",
    "register",
    "supported",
]
