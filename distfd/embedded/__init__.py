"""The embedded models: tiny text-to-image pipelines shipped in the package.

Two, trained on the same procedural scenes (32x32 images of coloured shapes, prompts such as
``"a small red circle at the top left on a blue background"``), each loading offline by path:
``tiny-shapes`` (the default: a ``StableDiffusionPipeline``, UNet, DDIM) and ``tiny-shapes-mmdit``
(a ``StableDiffusion3Pipeline``: MMDiT transformer, flow matching), named on the command line as
:data:`MODELS` gives (``--model embedded-mmdit``). ``model_path()`` resolves a name;
``load_judge()`` returns the attribute classifier used to score samples from either;
``calibrated_key_steps()`` the key-step sets calibrated for each; ``calibration_captions()`` the
prompts they were calibrated on, apart from the evaluation captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .judge import Judge

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The quality harness evaluates on the caption draw EVALUATION_CAPTION_SEED (never used for training);
# calibration draws from CALIBRATION_CAPTION_SEED and skips every caption among the first
# EVALUATION_CAPTIONS_APART of the evaluation draw.
EVALUATION_CAPTION_SEED = 424242
CALIBRATION_CAPTION_SEED = 424243
EVALUATION_CAPTIONS_APART = 200


# --model names of the embedded models -> their folders under WEIGHTS_DIR; no --model is "embedded".
MODELS = {"embedded": "tiny-shapes", "embedded-mmdit": "tiny-shapes-mmdit"}


def default_model_path() -> Path:
    """Directory of the shipped tiny-shapes pipeline (``StableDiffusionPipeline.from_pretrained`` it)."""
    return WEIGHTS_DIR / "tiny-shapes"


def model_path(model: str | None) -> Path | None:
    """The folder of the embedded model ``model`` names (None: the default, tiny-shapes), or None
    when ``model`` is not one of :data:`MODELS` (a folder or hub id of the user's)."""
    if model is None:
        return default_model_path()
    folder = MODELS.get(model)
    return WEIGHTS_DIR / folder if folder else None


def is_embedded(model: str | None) -> bool:
    """Whether ``model`` (a ``--model`` value, None for none) names an embedded model."""
    return model is None or model in MODELS


def calibrated_key_steps(scheduler: str, steps: int, model: str | None = None) -> Path | None:
    """The shipped key-step preset calibrated for the embedded ``model`` (None: tiny-shapes) with
    ``scheduler`` and ``steps``, if any.

    Shipped for tiny-shapes: ``ddim-50`` with the paper's budget (9 key steps) and ``dpm-20`` (DPM-Solver++) with 9
    (the paper's budget is 7; no set of 7 keeps the image on this model), chosen by ``distfd
    calibrate`` on the final image (the file records the command; the tests re-run it). On this
    model the paper's sets lose prompt adherence (they end early in the loop); see
    docs/quality.md. Shipped for tiny-shapes-mmdit: ``flow-euler-28`` with 11. The CLI uses these by
    default.
    """
    folder = model_path(model)
    path = folder / "key_steps" / f"{scheduler}-{steps}.json" if folder else None
    return path if path is not None and path.is_file() else None


def calibration_captions(
    n: int, seed: int = CALIBRATION_CAPTION_SEED, evaluation_seed: int = EVALUATION_CAPTION_SEED
) -> list[str]:
    """``n`` scene captions to calibrate key steps on: the draw of ``seed`` in order, skipping every
    caption among the first ``EVALUATION_CAPTIONS_APART`` (200) of the evaluation draw
    ``evaluation_seed``, so calibration and evaluation share no prompt (the model's caption space is
    small: 3 of the first 32 captions of seed 424243 are among the first 128 of seed 424242)."""
    from .scenes import sample_captions

    apart = set(sample_captions(EVALUATION_CAPTIONS_APART, evaluation_seed)[0])
    drawn = n
    while True:
        kept = [c for c in sample_captions(drawn, seed)[0] if c not in apart]
        if len(kept) >= n:
            return kept[:n]
        drawn *= 2


def judge_path() -> Path:
    """Directory of the shipped judge weights."""
    return WEIGHTS_DIR / "judge"


def load_judge() -> Judge:
    """Load the shipped scene judge (CPU, eval mode)."""
    from .judge import load_judge as _load

    return _load(judge_path())


__all__ = [
    "MODELS",
    "calibrated_key_steps",
    "calibration_captions",
    "default_model_path",
    "is_embedded",
    "judge_path",
    "load_judge",
    "model_path",
]
