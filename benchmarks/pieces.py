"""Measure the single-device pieces used by ``projection``: UNet encoder/decoder split timings and
the bytes a key step has to broadcast.

Encoder = time embedding, conv_in, down blocks, mid block; decoder = up blocks, norm, conv_out
(the split used by FasterDiffusion, whose decoder consumes the skip tensors and mid output).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from .measure import sync
from .projection import Pieces

log = logging.getLogger(__name__)


class _SplitProbe:
    """Hooks that time encoder/decoder segments and record skip/mid tensor sizes of one forward."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.device = device
        # Process CPU time on CPU (robust to other jobs on a shared host); synchronised wall time on GPU.
        self.clock = time.process_time if device.type == "cpu" else time.perf_counter
        self.skip_bytes = 0
        self.payload_bytes = 0  # as distfd flattens block outputs: (hidden, skips) per down block
        self.out_bytes = 0
        self.t = [0.0, 0.0, 0.0]
        self._h = [
            unet.register_forward_pre_hook(self._start),
            unet.conv_in.register_forward_hook(self._skip),
            unet.mid_block.register_forward_hook(self._mid),
            unet.register_forward_hook(self._end),
        ]
        self._h += [b.register_forward_hook(self._down) for b in unet.down_blocks]

    def _start(self, *_: Any) -> None:
        self.skip_bytes = self.payload_bytes = 0
        sync(self.device)
        self.t[0] = self.clock()

    @staticmethod
    def _nbytes(x: torch.Tensor) -> int:
        return x.numel() * x.element_size()

    def _skip(self, _m: Any, _i: Any, out: torch.Tensor) -> None:
        self.skip_bytes += self._nbytes(out)
        self.payload_bytes += self._nbytes(out)

    def _down(self, _m: Any, _i: Any, out: Any) -> None:
        skips = sum(self._nbytes(r) for r in out[1])
        self.skip_bytes += skips
        self.payload_bytes += skips + self._nbytes(out[0])  # out[0] is also the last skip tensor

    def _mid(self, _m: Any, _i: Any, out: torch.Tensor) -> None:
        self.skip_bytes += self._nbytes(out)
        self.payload_bytes += self._nbytes(out)
        sync(self.device)
        self.t[1] = self.clock()

    def _end(self, _m: Any, _i: Any, out: Any) -> None:
        sync(self.device)
        self.t[2] = self.clock()
        sample = out[0] if isinstance(out, tuple) else out.sample
        self.out_bytes = self._nbytes(sample)

    def remove(self) -> None:
        for h in self._h:
            h.remove()


def _unet_inputs(
    unet: torch.nn.Module, rows: int, latent: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    cfg = unet.config
    kw: dict[str, Any] = {
        "sample": torch.randn(rows, cfg.in_channels, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(rows, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
        "return_dict": False,
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(rows, 6, device=device, dtype=dtype),
        }
    return kw


@torch.no_grad()
def measure_pieces(
    unet: torch.nn.Module,
    latent: int,
    batch_rows: int,
    decoder_rows: list[int],
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 3,
) -> tuple[Pieces, dict[str, Any]]:
    """Median encoder time at ``batch_rows`` and decoder time for each of ``decoder_rows``."""
    probe = _SplitProbe(unet, device)
    enc: list[float] = []
    dec: dict[int, float] = {}
    skip_bytes = out_bytes = payload_bytes = 0
    try:
        for rows in sorted({batch_rows, *decoder_rows}):
            kw = _unet_inputs(unet, rows, latent, device, dtype)
            unet(**kw)  # warm-up for this shape
            e_s, d_s = [], []
            for _ in range(reps):
                unet(**kw)
                e_s.append(probe.t[1] - probe.t[0])
                d_s.append(probe.t[2] - probe.t[1])
            dec[rows] = statistics.median(d_s)
            log.info("rows=%d encoder %.4f s decoder %.4f s", rows, statistics.median(e_s), dec[rows])
            if rows == batch_rows:
                enc = e_s
                skip_bytes, out_bytes, payload_bytes = probe.skip_bytes, probe.out_bytes, probe.payload_bytes
    finally:
        probe.remove()
    pieces = Pieces(
        encoder_s=statistics.median(enc),
        decoder_points=tuple(sorted(dec.items())),
        broadcast_bytes=skip_bytes,
        gather_bytes_per_row=out_bytes // batch_rows,
        batch_rows=batch_rows,
    )
    raw = {
        "encoder_s_samples": enc,
        "decoder_s_by_rows": {str(k): v for k, v in sorted(dec.items())},
        "broadcast_bytes_per_key_step": skip_bytes,
        "distfd_feature_payload_bytes": payload_bytes,
        "gather_bytes_per_row": out_bytes // batch_rows,
        "batch_rows": batch_rows,
        "latent_size": latent,
        "dtype": str(dtype),
        "reps": reps,
        "clock": "process_time" if device.type == "cpu" else "perf_counter (synchronised)",
    }
    return pieces, raw
