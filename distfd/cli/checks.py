"""Checks that run before the ranks load anything: output paths, model folder, device, vocabulary.

Each raises :class:`UsageError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from pathlib import Path

from .options import UsageError

logger = logging.getLogger("distfd")

# "owner/name" as the Hugging Face hub spells a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def image_format(path: Path) -> str:
    """The PIL format for ``path``'s extension, or a UsageError listing the usual ones."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(
            f"cannot write images as {path.suffix or 'files without an extension'!s} ({path}); "
            "use .png, .jpg, .webp, .bmp or .tiff."
        )
    return fmt


def writable_dir(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and prove a file can be written in it."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{what} {directory} exists and is not a directory; choose another path.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".distfd-check-"):
            pass
    except OSError as e:
        raise UsageError(
            f"cannot write in {what} {directory} ({e.strerror or e}); choose a writable location."
        ) from e


def check_output_file(path: Path) -> str:
    """``--out``: a known image format in a directory that exists or can be created, writable."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name such as {path / 'out.png'}.")
    fmt = image_format(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--out {path} exists and is not writable; choose another path.")
    writable_dir(path.parent if str(path.parent) else Path("."), "the directory of --out")
    return fmt


def check_model(model: str | None) -> Path | None:
    """A local pipeline folder (returned) or a hub id (None); anything else is refused."""
    # An embedded model's name wins over a folder of that name here, as in Session (use ./NAME).
    if model is None or ("/" not in model and model.startswith("embedded")):
        try:
            from ..embedded import MODELS, model_path
        except ImportError as e:  # a trimmed install
            raise UsageError(f"the embedded models are not installed ({e}); give --model PATH.") from e
        path = model_path(model)
        if path is None:
            raise UsageError(
                f"--model {model} is not an embedded model; use one of {', '.join(MODELS)} "
                f"(a folder of that name: --model ./{model})."
            )
        if not (path / "model_index.json").is_file():
            raise UsageError(
                f"--model {model}: the embedded model's folder {path} is missing; reinstall distfd."
            )
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(
                f"--model {model} has no model_index.json, so it is not a diffusers pipeline folder; "
                "give a folder written by save_pretrained() or a hub id such as owner/name."
            )
        return path
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return None
    raise UsageError(f"--model {model}: no such folder, and not a hub id (owner/name); check the path.")


def check_device(device: str) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:N', 'mps' that exist on this machine."""
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available here; use --device cpu.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(
                f"--device {device}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda.")


def unknown_words(text: str | None) -> list[str]:
    """Words of ``text`` outside the embedded model's caption vocabulary, in order, once each."""
    if not text:
        return []
    from ..embedded.scenes import VOCABULARY

    known = set(VOCABULARY)
    seen: list[str] = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if word not in known and word not in seen:
            seen.append(word)
    return seen


def caption_problem(text: str) -> str | None:
    """Why ``text`` is not a caption of the kind the embedded model was trained on (None if it is)."""
    from ..embedded import scenes

    def alt(names) -> str:
        return "(" + "|".join(re.escape(n) for n in names) + ")"

    where = f"(at the {alt(p for p in scenes.POSITION_NAMES if p != 'centre')}|in the centre)"
    obj = f"a {alt(scenes.SIZE_NAMES)} {alt(scenes.COLOUR_NAMES)} {alt(scenes.SHAPES)} {where}"
    pattern = f"{obj}( and {obj})? on a {alt(scenes.BACKGROUND_NAMES)} background"
    normal = " ".join(re.findall(r"[a-z]+", text.lower()))
    if re.fullmatch(pattern, normal):
        return None
    words = normal.split()
    colour = next((w for w, n in zip(words, words[1:], strict=False) if n == "background"), None)
    if colour is not None and colour not in scenes.BACKGROUND_NAMES:
        return f"{colour!r} is not one of its background colours ({', '.join(scenes.BACKGROUND_NAMES)})"
    return "it is not in the form of its training captions"


def vocabulary_warning(prompt: str, negative: str | None = None) -> str | None:
    """On the embedded model: a warning naming the words it never saw in training, or saying how a
    prompt of known words differs from its captions; None for a prompt it can read."""
    words = unknown_words(prompt) + [w for w in unknown_words(negative) if w not in unknown_words(prompt)]
    example = "'a small red circle at the top left on a blue background'"
    if words:
        listed = ", ".join(repr(w) for w in words[:10]) + (
            f" and {len(words) - 10} more" if len(words) > 10 else ""
        )
        return (
            f"the embedded model does not know {listed}; it knows only the words of its training captions "
            f"(docs/embedded-model.md), e.g. {example}. Expect an image unrelated to the prompt."
        )
    problem = caption_problem(prompt)
    if problem:
        shown = prompt if len(prompt) <= 80 else prompt[:80] + "..."
        return (
            f"the prompt {shown!r} is made of words the embedded model knows, but {problem}; it was "
            f"trained only on captions such as {example} (docs/embedded-model.md). Expect an image "
            "unrelated to the prompt."
        )
    return None


def request_warning(model: str | None):
    """What earns a request from someone else a warning (for :class:`distfd.intake.Intake`): on an
    embedded model (``model`` None or a name), a prompt it cannot read; None for any other model."""
    from ..embedded import is_embedded

    if not is_embedded(model):
        return None
    return lambda req: vocabulary_warning(req.prompt, req.negative_prompt)


def warn_vocabulary(prompt: str, negative: str | None = None, where: str = "") -> str | None:
    """Log :func:`vocabulary_warning` (prefixed with ``where``) if there is one; return it."""
    warning = vocabulary_warning(prompt, negative)
    if warning:
        logger.warning("%s%s", where, warning)
    return warning


# FasterDiffusionConfig fields set from the command line, and their options.
ENGINE_OPTIONS = {
    "noise_alpha": "--noise-alpha",
    "max_parallel_steps": "--max-parallel-steps",
    "encoder": "--encoder",
}


def check_engine_options(args) -> None:
    """The FasterDiffusionConfig values given on the command line, checked before anything loads."""
    from ..config import FasterDiffusionConfig

    try:
        FasterDiffusionConfig(key_steps=(0,), **{field: getattr(args, field) for field in ENGINE_OPTIONS})
    except (ValueError, TypeError) as e:
        text = str(e)
        flag = next((f for field, f in ENGINE_OPTIONS.items() if text.startswith(field)), None)
        raise UsageError(f"{flag}: {text}" if flag else text) from e
    timeout = getattr(args, "timeout", None)
    if timeout is not None:
        check_seconds("--timeout", timeout)


def check_seconds(flag: str, value: float, allow_zero: bool = False) -> None:
    """A duration option: a finite number of seconds, > 0 (or >= 0 with ``allow_zero``)."""
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        kind = "non-negative" if allow_zero else "positive"
        raise UsageError(f"{flag} must be a {kind} number of seconds; got {value}.")
