"""``python -m tests.faulty_rank ARGS``: ``python -m distfd ARGS`` on a rank whose denoiser runs out of
memory for one image width, for the tests of a service that must survive it.

``DISTFD_TEST_OOM=WIDTH:RANK[,WIDTH:RANK...]``: on world rank RANK, every denoiser call on latents of
WIDTH/2 columns (the tiny test VAE halves the width) first tries a real allocation of 2**60 bytes,
which the CPU allocator refuses ("DefaultCPUAllocator: can't allocate memory"). On rank 0 under
distfd's default placement that is the encoder pass; on another rank, its share of a decoder pass.
``DISTFD_TEST_FAIL=WIDTH:RANK[,...]`` the same way raises a plain RuntimeError (a failure that is not
memory: the service's 500).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from diffusers import UNet2DConditionModel


def _widths(variable: str, rank: int) -> set[int]:
    widths = set()
    for part in os.environ.get(variable, "").split(","):
        if part:
            width, on = part.split(":")
            if int(on) == rank:
                widths.add(int(width) // 2)
    return widths


def _install() -> None:
    rank = int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)
    widths, failing = _widths("DISTFD_TEST_OOM", rank), _widths("DISTFD_TEST_FAIL", rank)
    original = UNet2DConditionModel.forward

    @functools.wraps(original)  # the same signature: distfd binds the denoiser's arguments by name
    def forward(self, sample, *args, **kwargs):
        if sample.shape[-1] in widths:
            torch.empty(2**60, dtype=torch.uint8)  # raises: the allocation fails
        if sample.shape[-1] in failing:
            raise RuntimeError("a failure injected by tests/faulty_rank.py")
        return original(self, sample, *args, **kwargs)

    UNet2DConditionModel.forward = forward


if __name__ == "__main__":
    _install()
    from distfd.cli import main

    sys.exit(main(sys.argv[1:]))
