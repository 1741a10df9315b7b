"""Registry of supported denoisers and pipelines."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from .base import Adapter, EncoderModule
from .unet import UNET_PIPELINES, UNetAdapter

# Denoiser class -> adapter. Looked up by exact class first, then by isinstance.
REGISTRY: dict[type, Adapter] = {
    UNet2DConditionModel: UNetAdapter("unet", "unet", pipelines=UNET_PIPELINES),
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
    for adapter in REGISTRY.values():
        model = getattr(pipe, adapter.denoiser_attr, None)
        if model is None:
            continue
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


__all__ = ["Adapter", "EncoderModule", "REGISTRY", "find_adapter", "register", "supported"]
