"""A small CNN that reads a scene's attributes from a 32x32 image.

Used to score generated samples: ``predict`` returns, per attribute (shape,
colour, size, position, background), the predicted class index; ``features``
returns the penultimate activations, a vector suited to a Frechet distance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .scenes import ATTRIBUTES, IMAGE_SIZE, to_float

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class SceneJudge(nn.Module):
    """Conv feature extractor + one linear head per attribute."""

    def __init__(
        self, width: int = 16, feature_dim: int = 128, attributes: dict[str, int] | None = None
    ) -> None:
        super().__init__()
        attributes = attributes or {k: len(v) for k, v in ATTRIBUTES.items()}
        self.config = {"width": width, "feature_dim": feature_dim, "attributes": dict(attributes)}
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))  # 32 -> 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 4 * 4, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in attributes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(n, feature_dim)`` of float images in ``[-1, 1]``."""
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME)
        )

    @classmethod
    def load(cls, directory: str | Path) -> SceneJudge:
        """Load a judge written by :meth:`save`, in eval mode."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(**config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()


def to_judge_input(images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    """Convert images to the judge's float32 ``(n, 3, 32, 32)`` in ``[-1, 1]``.

    Accepts a uint8 tensor/array ``(n, 3, H, W)``; a float tensor ``(n, 3, H, W)``
    in ``[-1, 1]``; a float numpy array ``(n, H, W, 3)`` in ``[0, 1]`` (a
    diffusers pipeline's ``output_type="np"``); or a list of PIL images.
    Images of another size are resized to 32x32.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            images = torch.from_numpy(images)
        else:  # pipeline numpy output: NHWC in [0, 1]
            images = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x


class Judge:
    """Inference wrapper around :class:`SceneJudge` (CPU, no grad, batched)."""

    def __init__(self, model: SceneJudge, batch_size: int = 512) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.attributes = list(model.heads.keys())

    @torch.no_grad()
    def _run(self, images, fn) -> list:
        x = to_judge_input(images)
        device = next(self.model.parameters()).device
        return [fn(x[i : i + self.batch_size].to(device)) for i in range(0, len(x), self.batch_size)]

    def logits(self, images) -> dict[str, torch.Tensor]:
        """Per-attribute logits ``(n, n_classes)``."""
        outs = self._run(images, self.model)
        return {k: torch.cat([o[k].cpu() for o in outs]) for k in self.attributes}

    def predict(self, images) -> dict[str, torch.Tensor]:
        """Per-attribute predicted class indices (int64 ``(n,)``), see ``scenes.ATTRIBUTES``."""
        return {k: v.argmax(dim=1) for k, v in self.logits(images).items()}

    def features(self, images) -> torch.Tensor:
        """Feature vectors ``(n, feature_dim)`` for Frechet distance computations."""
        return torch.cat([f.cpu() for f in self._run(images, self.model.features)])


def accuracy(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of ``pred`` against ``labels`` (shared keys only)."""
    return {k: float((pred[k] == labels[k]).float().mean()) for k in pred if k in labels}


def load_judge(directory: str | Path) -> Judge:
    """Load a saved judge from ``directory`` into an inference :class:`Judge`."""
    return Judge(SceneJudge.load(directory))
