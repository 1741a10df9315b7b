"""Scorers of generated images against their prompts, behind one small interface.

``SceneEvaluator`` reads the embedded shapes model's scenes with its judge classifier (all
offline); ``ClipFidEvaluator`` computes CLIP score and FID for a real model, from weights the user
has locally; ``FeatureEvaluator`` is a Frechet distance over any feature function (tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import adherence_hits, frechet_distance

logger = logging.getLogger("distfd")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class Evaluator(Protocol):
    """Scores images ``(n, 3, H, W)`` in ``[0, 1]`` generated for ``prompts`` (same order).

    An evaluator may also have ``per_image(images, prompts) -> {metric: (n,) values}`` for the metrics
    of ``score`` that are means over images, and then takes those values as ``score``'s third argument
    (so they are computed once); the harness gives their paired intervals against vanilla.
    """

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]: ...


class FeatureEvaluator:
    """Frechet distance between ``features(images)`` and fixed reference features."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor) -> None:
        self.features, self.reference = features, reference

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        return {"fd": frechet_distance(self.features(images), self.reference)}


def pooled_pixels(images: torch.Tensor, size: int = 4) -> torch.Tensor:
    """A weights-free feature: the image average-pooled to ``size x size``, flattened ``(n, 3 size^2)``."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


class SceneEvaluator:
    """The embedded model's judge: prompt adherence (requested shape and colour read back) and the
    Frechet distance of judge features to real rendered scenes.

    Args:
        judge: An object with ``predict(images)`` (attribute -> class index) and ``features(images)``
            taking float images ``(n, 3, H, W)`` in ``[-1, 1]``.
        labels: The requested attributes of every prompt, attribute -> ``(n,)`` class indices.
        reference: Judge features of real scenes ``(m, d)``.
        keys: The attributes adherence checks.
    """

    def __init__(
        self,
        judge: Any,
        labels: Mapping[str, torch.Tensor],
        reference: torch.Tensor,
        keys: Sequence[str] = ("shape", "colour"),
    ) -> None:
        self.judge, self.labels, self.reference, self.keys = judge, labels, reference, tuple(keys)

    def per_image(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per image 1.0 where the judge reads the requested attribute back, else 0.0."""
        requested = {k: v[: len(images)] for k, v in self.labels.items()}
        hits = adherence_hits(self.judge.predict(images.float() * 2 - 1), requested, self.keys)
        return {f"adherence_{k}": h.float() for k, h in hits.items()}

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        values = self.per_image(images, prompts) if values is None else values
        out = {k: float(v.mean()) for k, v in values.items()}
        # the judge reads [-1, 1]
        out["fd_judge"] = frechet_distance(self.judge.features(images.float() * 2 - 1), self.reference)
        return out


class WeightsMissing(RuntimeError):
    """A metric's weights are not on this machine."""


def _local_dir(path: str | os.PathLike | None, what: str, hint: str) -> Path:
    if path is None:
        raise WeightsMissing(f"{what} needs local weights: {hint}")
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsMissing(f"{what}: {p} does not exist. {hint}")
    return p


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights: ``path``, else ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>`` (where
    torch-fidelity caches them; ``TORCH_HOME`` defaults to ``~/.cache/torch``)."""
    if path is None:
        home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
        path = home / "hub" / "checkpoints" / INCEPTION_FILE
    hint = (
        f"pass --inception-weights FILE, or put {INCEPTION_FILE} (torch-fidelity's release "
        "'weights-inception-2015-12-05') under $TORCH_HOME/hub/checkpoints/."
    )
    return _local_dir(path, "FID", hint)


def load_images(directory: str | os.PathLike, size: int, limit: int | None = None) -> torch.Tensor:
    """Reference images (``*.png``, ``*.jpg``) as ``(n, 3, size, size)`` in ``[0, 1]`` (centre crop, resize)."""
    from PIL import Image

    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no .png/.jpg images in {directory}.")
    out = []
    for f in files[:limit]:
        im = Image.open(f).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def _embedding(out: Any) -> torch.Tensor:
    # transformers < 5 returns the projected embedding; 5.x an output object holding it as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_score(model: Any, processor: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP score per image (Hessel et al. 2021, torchmetrics' definition): ``100 * max(cos(image, text), 0)``.

    Computed here rather than with torchmetrics' ``CLIPScore``, which (1.9.0) fails under transformers
    5.x: ``get_image_features`` there returns an output object, not a tensor.
    """
    pixels = [im.permute(1, 2, 0).mul(255).round().to(torch.uint8).cpu().numpy() for im in images]
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
    img = _embedding(model.get_image_features(pixel_values=inputs["pixel_values"]))  # (n, d)
    txt = _embedding(
        model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    )
    cos = F.cosine_similarity(img, txt, dim=-1)  # (n,)
    return 100 * cos.clamp(min=0)


class ClipFidEvaluator:
    """CLIP score (:func:`clip_score`) and FID (torchmetrics ``FrechetInceptionDistance``) for real
    models. Both need weights on disk; nothing is downloaded (construction fails with
    :class:`WeightsMissing` naming what to provide).

    Args:
        clip_model: A local Hugging Face CLIP directory (e.g. a copy of ``openai/clip-vit-large-patch14``);
            ``None`` skips CLIP score.
        reference_dir: Real images for FID (e.g. MS-COCO val images); ``None`` skips FID.
        inception_weights: The FID Inception file; default: torch-fidelity's cache location.
    """

    def __init__(
        self,
        clip_model: str | os.PathLike | None = None,
        reference_dir: str | os.PathLike | None = None,
        inception_weights: str | os.PathLike | None = None,
        reference_limit: int | None = None,
    ) -> None:
        self.clip = self.fid_reference = None
        if clip_model is None and reference_dir is None:
            raise WeightsMissing(
                "give --clip-model DIR and/or --reference-images DIR for a real model's metrics."
            )
        if clip_model is not None:
            self.clip = self._clip(
                _local_dir(clip_model, "CLIP score", "pass --clip-model DIR (a local CLIP model directory).")
            )
        if reference_dir is not None:
            if importlib.util.find_spec("torch_fidelity") is None:
                raise WeightsMissing(
                    "FID needs torch-fidelity's Inception network: pip install torch-fidelity."
                )
            ref = _local_dir(reference_dir, "FID", "pass --reference-images DIR (real images).")
            self.weights = find_inception_weights(inception_weights)
            self.fid_reference = load_images(ref, 299, reference_limit)

    @staticmethod
    def _clip(path: Path) -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)

    def per_image(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """CLIP score per image (nothing without a CLIP model)."""
        return {} if self.clip is None else {"clip_score": clip_score(*self.clip, images, prompts)}

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        values = self.per_image(images, prompts) if values is None else values
        out = {k: float(v.mean()) for k, v in values.items()}
        if self.fid_reference is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(normalize=True, feature_extractor_weights_path=str(self.weights))
            fid.update(self.fid_reference, real=True)
            fid.update(F.interpolate(images.float(), size=299, mode="bilinear"), real=False)
            out["fid"] = float(fid.compute())
        return out
