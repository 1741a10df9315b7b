"""The paper's feature analysis (Sec. 3.2, Fig. 2a-c) for any supported pipeline.

Forward hooks on every down block, the mid block and every up block of a UNet (on every transformer
block of a DiT, PixArt or MMDiT: their image stream) record, at every sampling step, (a) the change
from the previous step, ``Delta = |F_t - F_{t-1}|^2 / (d s^2)`` (Eq. 2, the mean squared difference
per element) and the same relative to the feature's own mean square (transformer blocks' scale
grows with depth, so only the relative change compares blocks), and (b) the Frobenius norm of the
channel-averaged feature (Fig. 2b); (c) is the standard deviation of (b) across steps.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import call_defaults, find_adapter
from .apply import is_applied


@dataclass
class BlockTrace:
    """One block's statistics over the sampling loop.

    Args:
        name: ``down<i>``, ``mid`` or ``up<i>`` (UNet); ``block<i>`` (transformers).
        part: ``encoder``, ``bottleneck`` or ``decoder`` (the paper's E, B, D).
        size: Spatial size of the block's output (the paper's ``s``; tokens for a transformer).
        change: Eq. 2 between steps ``t-1`` and ``t``, for ``t = 1 .. L-1``.
        relative_change: Eq. 2 divided by the mean square of ``F_t``.
        norms: Frobenius norm of the channel-averaged output at every step.
        pick: Which item of a tuple output is the feature (UNet down blocks: 0, ``(hidden, skips)``;
            MMDiT joint blocks: 1, ``(text, image)``).
    """

    name: str
    part: str
    size: int = 0
    change: list[float] = field(default_factory=list)
    relative_change: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    pick: int = 0
    _previous: torch.Tensor | None = field(default=None, repr=False)

    def observe(self, output: Any) -> None:
        h = output[self.pick] if isinstance(output, tuple) else output
        h = h.detach().float()  # (B, C, s, s), or tokens (B, T, D)
        tokens = h.dim() == 3
        self.size = int(h.shape[1] if tokens else h.shape[-1])
        if self._previous is not None:
            change = (h - self._previous).pow(2).mean()
            self.change.append(float(change))
            self.relative_change.append(float(change / h.pow(2).mean().clamp_min(1e-30)))
        mean = h.mean(-1) if tokens else h.mean(1)  # channel mean: (B, T) or (B, s, s)
        norm = mean.norm(dim=-1) if tokens else torch.linalg.matrix_norm(mean)
        self.norms.append(float(norm.mean()))
        self._previous = h

    @property
    def norm_std(self) -> float:
        return statistics.pstdev(self.norms) if self.norms else 0.0


@dataclass
class FeatureAnalysis:
    """All blocks' traces from one sampling run, encoder to decoder order."""

    blocks: list[BlockTrace]
    num_steps: int
    prompts: list[str]

    def part(self, name: str) -> list[BlockTrace]:
        return [b for b in self.blocks if b.part == name]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per part: the mean and max of Eq. 2 over blocks and steps, the mean norm box height
        (inter-quartile range) and the mean norm standard deviation."""
        out = {}
        for part in ("encoder", "bottleneck", "decoder"):
            blocks = self.part(part)
            if not blocks:
                continue
            changes = [c for b in blocks for c in b.change]
            relative = [c for b in blocks for c in b.relative_change]
            iqr = [_iqr(b.norms) for b in blocks]
            out[part] = {
                "mean_change": statistics.fmean(changes) if changes else 0.0,
                "mean_relative_change": statistics.fmean(relative) if relative else 0.0,
                "max_change": max(changes, default=0.0),
                "mean_norm_iqr": statistics.fmean(iqr),
                "mean_norm_std": statistics.fmean(b.norm_std for b in blocks),
            }
        return out

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        blocks = [{k: v for k, v in asdict(b).items() if not k.startswith("_")} for b in self.blocks]
        data = {
            "num_steps": self.num_steps,
            "prompts": self.prompts,
            "summary": self.summary(),
            "blocks": blocks,
        }
        path.write_text(json.dumps(data, indent=2))
        return path


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def transformer_blocks(adapter: Any, model: nn.Module) -> list[tuple[BlockTrace, nn.Module]]:
    """Every transformer block in call order (MMDiT: the image stream), labelled encoder or decoder
    by the adapter's current split."""
    from .adapters.mmdit import IMAGE, MMDiTAdapter, blocks

    encoder = {m.name for m in adapter.encoder_modules(model)}
    pick = IMAGE if isinstance(adapter, MMDiTAdapter) else 0  # joint blocks hand on (text, image)
    return [
        (BlockTrace(f"block{i}", "encoder" if name in encoder else "decoder", pick=pick), b)
        for i, (name, b) in enumerate(blocks(model))
    ]


def unet_blocks(model: nn.Module) -> list[tuple[BlockTrace, nn.Module]]:
    """The blocks the paper analyses, in call order, with an empty trace each."""
    if not all(hasattr(model, a) for a in ("down_blocks", "up_blocks")):
        raise ValueError(f"{type(model).__name__} has no down_blocks/up_blocks; the analysis needs a UNet.")
    blocks = [(BlockTrace(f"down{i}", "encoder"), b) for i, b in enumerate(model.down_blocks)]
    if getattr(model, "mid_block", None) is not None:
        blocks.append((BlockTrace("mid", "bottleneck"), model.mid_block))
    blocks += [(BlockTrace(f"up{i}", "decoder"), b) for i, b in enumerate(model.up_blocks)]
    return blocks


@torch.no_grad()
def analyse_features(
    pipe: Any,
    prompts: str | Sequence[str],
    num_inference_steps: int = 50,
    seed: int = 0,
    **call_kwargs,
) -> FeatureAnalysis:
    """Run the vanilla pipeline once and trace every block's output (Sec. 3.2, Eq. 2, Fig. 2)."""
    if is_applied(pipe):
        raise RuntimeError("analyse_features() needs the vanilla pipeline; call handle.remove() first.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    adapter, model = find_adapter(pipe)
    blocks = unet_blocks(model) if hasattr(model, "up_blocks") else transformer_blocks(adapter, model)
    handles = [m.register_forward_hook(lambda _m, _a, out, t=t: t.observe(out)) for t, m in blocks]
    try:
        pipe(
            prompt=prompts,
            num_inference_steps=num_inference_steps,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
            output_type="latent",
            **{**call_defaults(pipe), **call_kwargs},
        )
    finally:
        for h in handles:
            h.remove()
    traces = [t for t, _ in blocks]
    for t in traces:
        t._previous = None
    return FeatureAnalysis(traces, num_inference_steps, prompts)
