"""Key steps, their grouping into parallel batches, and the split of decoder rows over ranks (pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """A key-step set built for a fixed number of sampling steps."""

    num_steps: int
    key_steps: tuple[int, ...]
    source: str


def _from_paper(num_steps: int, timesteps: Sequence[int]) -> tuple[int, ...]:
    """The paper lists key *timesteps* counted down from T; loop index = T - t."""
    return tuple(sorted(num_steps - t for t in timesteps))


PRESETS: dict[str, Preset] = {
    # Sec. 3.3 / Supp. C: t_key = {50, 49, 48, 47, 45, 40, 35, 25, 15} for SD with DDIM-50.
    "sd-ddim-50": Preset(50, _from_paper(50, [50, 49, 48, 47, 45, 40, 35, 25, 15]), "paper, SD DDIM-50"),
    # Supp. C: {20, 19, 18, 17, 15, 10, 5} for SD with DPM-Solver(++)-20.
    "sd-dpm-20": Preset(20, _from_paper(20, [20, 19, 18, 17, 15, 10, 5]), "paper, SD DPM-Solver-20"),
    # Supp. C: DreamBooth / Custom Diffusion add t=10 to the DDIM-50 set.
    "sd-personalized-50": Preset(
        50, _from_paper(50, [50, 49, 48, 47, 45, 40, 35, 25, 15, 10]), "paper, personalized DDIM-50"
    ),
}


def register_preset(name: str, preset: Preset) -> None:
    """Add a named preset (used by model adapters for their paper sets)."""
    if name in PRESETS and PRESETS[name] != preset:
        raise ValueError(f"preset {name!r} is already registered with other key steps.")
    PRESETS[name] = preset


def preset_names() -> list[str]:
    return sorted(PRESETS) + ["uniform-K (every K-th step)"]


def load_preset_file(path: str | Path) -> Preset:
    """Read a preset saved as JSON: ``{"num_steps": N, "key_steps": [...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Preset(int(data["num_steps"]), tuple(int(k) for k in data["key_steps"]), str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read key-step preset file {path}: {e}") from e


def save_preset_file(path: str | Path, num_steps: int, key_steps: Sequence[int], **meta) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"num_steps": num_steps, "key_steps": list(key_steps), **meta}, indent=2))
    return path


def rescale(key_steps: Sequence[int], from_steps: int, to_steps: int) -> tuple[int, ...]:
    """Map key steps built for ``from_steps`` onto ``to_steps`` by relative position in the loop."""
    scaled = {min(to_steps - 1, round(k * to_steps / from_steps)) for k in key_steps}
    return tuple(sorted(scaled | {0}))


def resolve_key_steps(
    spec: str | Sequence[int], num_steps: int, loop_length: int | None = None, allow_rescale: bool = False
) -> tuple[int, ...]:
    """Turn a preset name, preset file or index list into sorted loop indices, checked against the loop.

    ``num_steps`` is the step count the user asked for (``scheduler.num_inference_steps``);
    ``loop_length`` is the number of denoiser calls the pipeline makes (``len(scheduler.timesteps)``,
    which PNDM makes one longer); indices must be below it.
    """
    loop_length = num_steps if loop_length is None else loop_length
    if isinstance(spec, str):
        if spec.startswith("uniform-"):
            try:
                k = int(spec.removeprefix("uniform-"))
            except ValueError:
                k = 0
            if k < 1:
                raise ValueError(f"bad uniform preset {spec!r}: use 'uniform-K' with an integer K >= 1.")
            steps = tuple(range(0, loop_length, k))
        elif spec in PRESETS or spec.endswith(".json"):
            preset = PRESETS[spec] if spec in PRESETS else load_preset_file(spec)
            steps = preset.key_steps
            if preset.num_steps != num_steps:
                if not allow_rescale:
                    raise ValueError(
                        f"key-step preset {spec!r} is built for {preset.num_steps} steps but the pipeline runs "
                        f"{num_steps}; use num_inference_steps={preset.num_steps}, pick another preset, or set "
                        "rescale_key_steps=True to rescale it."
                    )
                steps = rescale(steps, preset.num_steps, num_steps)
        else:
            raise ValueError(f"unknown key-step preset {spec!r}; known: {', '.join(preset_names())}.")
    else:
        steps = tuple(sorted(spec))
    bad = [k for k in steps if k >= loop_length]
    if bad:
        raise ValueError(
            f"key steps {bad} are out of range for a sampling loop of {loop_length} steps (valid: 0..{loop_length - 1})."
        )
    if not steps or steps[0] != 0:
        raise ValueError(f"key steps {list(steps)} must include index 0.")
    return steps


def chunk_after(step: int, key_steps: Sequence[int], loop_length: int, max_steps: int | None) -> range:
    """Steps decoded together starting at ``step``: up to the next key step, at most ``max_steps``."""
    next_key = next((k for k in key_steps if k > step), loop_length)
    stop = next_key if max_steps is None else min(next_key, step + max_steps)
    return range(step, stop)


def groups(key_steps: Sequence[int], loop_length: int) -> list[range]:
    """Each key step with the non-key steps that follow it (the paper's parallel batches, Fig. 4f)."""
    return [chunk_after(k, key_steps, loop_length, None) for k in key_steps]


def shard(rows: int, world_size: int) -> list[range]:
    """Split ``rows`` decoder rows into contiguous shares, as even as possible.

    The larger shares go to the highest ranks, so rank 0 (which also runs the encoder under the
    ``rank0`` placement) carries the smaller one.
    """
    base, extra = divmod(rows, world_size)
    sizes = [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def check_spec(spec: str | Sequence[int]) -> None:
    """Reject an unknown preset name early (before any pipeline call)."""
    if not isinstance(spec, str):
        return
    if spec == "auto":
        raise ValueError(
            "key_steps='auto' needs a calibration run: cal = distfd.calibrate(pipe, num_inference_steps, "
            "budget=K), then FasterDiffusionConfig(key_steps=cal.key_steps) (or cal.save('keys.json') and "
            "key_steps='keys.json')."
        )
    if spec.startswith("uniform-"):
        resolve_key_steps(spec, 1)
    elif spec.endswith(".json"):
        load_preset_file(spec)
    elif spec not in PRESETS:
        raise ValueError(f"unknown key-step preset {spec!r}; known: {', '.join(preset_names())}.")
