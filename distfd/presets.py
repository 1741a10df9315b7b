"""Every named key-step preset, declared in one place (paper sets and the authors' code; pure data).

The paper lists key *timesteps* counted down from T; distfd uses 0-based loop indices (T - t).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Preset:
    """A key-step set built for a fixed number of sampling steps."""

    num_steps: int
    key_steps: tuple[int, ...]
    source: str


def from_paper(num_steps: int, timesteps: Iterable[int]) -> tuple[int, ...]:
    """The paper's key timesteps ``t`` (counted down from ``num_steps``) as loop indices ``T - t``."""
    return tuple(sorted(num_steps - t for t in timesteps))


# DeepFloyd-IF with DDPM, Supp. C.1 (and Sec. 3.3 of the journal version): stage I (100 steps),
# stage II (50) and stage III, the x4 upscaler (75). The journal's footnote 6 reads an ellipsis as
# "every timestep in between", so stage I skips the encoder only at 89-86, 84-81, 24-21 and 19-16.
IF_STAGE1 = (*range(100, 89, -1), 85, *range(80, 24, -1), 20, *range(15, 0, -1))
IF_STAGE3 = (75, 73, 70, 66, 61, 55, 48, 40, 31, 21, 10)

# The 250-step key steps of the authors' DiT code (github.com/sen-mao/FasterDiffusion-DiT,
# sample_fasterdiffusion.py; 0-based loop indices, its end marker 250 dropped). The journal text gives
# the DiT results for 250 DDPM steps (Tab. 3) but lists no key steps.
DIT_250 = (
    *range(0, 7), 10, 12, 13, 14, *range(16, 21), 22, 25, 27, *range(29, 38), 45, 49, *range(51, 55),
    58, 59, 60, 62, 64, 67, 68, 70, 72, 73, 75, 77, 78, *range(81, 89), 90, 91, 92, 95, 97, 99,
    *range(101, 105), 106, 107, *range(109, 113), *range(115, 122), 123, 125, 128, 130, 131, 132, 134,
    137, 138, 139, *range(141, 146), 147, 150, 152, 155, 157, 158, *range(160, 165), 166, 168, 169, 170,
    172, 173, 174, 175, 178, 180, 181, 182, 184, *range(187, 192), *range(193, 197), 198,
    *range(200, 211), 212, 213, 214, *range(216, 220), 221, *range(223, 230), *range(231, 235), 237,
    239, 241, 242, 243, 245, 246, 247, 249,
)  # fmt: skip

PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        # Sec. 3.3 / Supp. C: t_key = {50, 49, 48, 47, 45, 40, 35, 25, 15} for SD with DDIM-50.
        "sd-ddim-50": Preset(50, from_paper(50, [50, 49, 48, 47, 45, 40, 35, 25, 15]), "paper, SD DDIM-50"),
        # Supp. C: {20, 19, 18, 17, 15, 10, 5} for SD with DPM-Solver(++)-20.
        "sd-dpm-20": Preset(20, from_paper(20, [20, 19, 18, 17, 15, 10, 5]), "paper, SD DPM-Solver-20"),
        # Supp. C: DreamBooth / Custom Diffusion add t=10 to the DDIM-50 set.
        "sd-personalized-50": Preset(
            50, from_paper(50, [50, 49, 48, 47, 45, 40, 35, 25, 15, 10]), "paper, personalized DDIM-50"
        ),
        "if-stage1-100": Preset(100, from_paper(100, IF_STAGE1), "paper, DeepFloyd-IF stage I DDPM-100"),
        "if-stage2-50": Preset(
            50, from_paper(50, range(50, 0, -1)), "paper, DeepFloyd-IF stage II DDPM-50 (every step)"
        ),
        "if-stage3-75": Preset(
            75, from_paper(75, IF_STAGE3), "paper, DeepFloyd-IF stage III (x4 upscaler) 75"
        ),
        "dit-250": Preset(250, DIT_250, "authors' DiT code, 250 DDPM/DDIM steps"),
    }
)


def preset_names() -> list[str]:
    """The names ``key_steps`` accepts besides lists and files, for error messages."""
    return sorted(PRESETS) + ["uniform-K (every K-th step)"]
