"""SD variants: img2img and inpainting (a suffix of the timesteps), ToMe, and LoRA-personalised weights."""

from __future__ import annotations

import pytest
import tomesd
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from torch.testing import assert_close

import distfd

from . import tiny
from .equivalence import apply_run, check_equivalences
from .reference import check_against_reference

STEPS, KEYS = 6, [0, 1, 3]


def variant(cls):
    base = tiny.sd()
    comps = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = cls(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(seed: int = 4) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def img2img_call(steps: int = 2 * STEPS, strength: float = 0.5):
    return lambda p: tiny.run(p, steps=steps, image=image(), strength=strength)


def inpaint_call(p):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return tiny.run(p, steps=2 * STEPS, image=image(), mask_image=mask, strength=0.5)


def test_img2img_equivalences():
    # 12 scheduler steps at strength 0.5: the loop runs the last 6.
    check_equivalences(variant(StableDiffusionImg2ImgPipeline), img2img_call(), STEPS, KEYS)


def test_inpaint_equivalences():
    check_equivalences(variant(StableDiffusionInpaintPipeline), inpaint_call, STEPS, KEYS)


def test_img2img_key_steps_index_the_loop_that_runs():
    """Key step k is the k-th denoiser call of this pipeline call: index 0 is the first step img2img runs
    (timestep ``scheduler.timesteps[offset]``), not the first step of the full schedule."""
    pipe = variant(StableDiffusionImg2ImgPipeline)
    seen, now = [], []
    # time_proj runs in every forward; a down block's inner resnet only when the encoder computes.
    pipe.unet.time_proj.register_forward_hook(lambda m, a, o: now.append(int(a[0].reshape(-1)[0])))
    pipe.unet.down_blocks[0].resnets[0].register_forward_hook(lambda *_: seen.append(now[-1]))
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, mode="propagate"))
    img2img_call()(pipe)
    handle.remove()
    loop = pipe.scheduler.timesteps[-STEPS:]
    assert seen == [int(loop[k]) for k in KEYS]
    with pytest.raises(ValueError, match="out of range for a sampling loop of 6 steps"):
        apply_run(pipe, img2img_call(), key_steps=[0, 7])


def test_tome_composes():
    pipe = tiny.sd()
    call = lambda p: tiny.run(p, steps=STEPS)  # noqa: E731
    vanilla = call(pipe)
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False, max_downsample=2)
    tome = call(pipe)
    assert not torch.allclose(tome, vanilla, atol=1e-4)  # ToMe is active
    all_key, _ = apply_run(pipe, call, key_steps=list(range(STEPS)), noise_alpha=0.0)
    assert_close(all_key, tome, atol=1e-6, rtol=1e-6)
    prop, _ = apply_run(pipe, call, key_steps=KEYS, mode="propagate")
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, mode="parallel"))
    par = call(pipe)
    assert_close(par, prop, rtol=1e-4, atol=1e-5)
    tomesd.remove_patch(pipe)  # removing in either order restores vanilla
    handle.remove()
    assert_close(call(pipe), vanilla, atol=0, rtol=0)


def add_random_lora(pipe, tmp_path, rank: int = 4):
    """A random LoRA for the tiny UNet's attention, saved and loaded the way a user loads one."""
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraModel  # noqa: F401 - registers the tuner

    torch.manual_seed(7)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.unet.add_adapter(config)
    layers = get_peft_model_state_dict(pipe.unet)
    pipe.unet.delete_adapters("default")
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True)
    pipe.load_lora_weights(tmp_path, adapter_name="subject")


def test_lora_personalized_preset(tmp_path):
    """DreamBooth-style LoRA weights (loaded with ``load_lora_weights``) with the personalised preset."""
    pipe = tiny.sd()
    base = tiny.run(pipe, steps=4)
    add_random_lora(pipe, tmp_path)
    assert not torch.allclose(tiny.run(pipe, steps=4), base, atol=1e-4)  # the LoRA is active
    # The 50-step preset rescaled to 10 steps (keeps the test fast on CPU).
    keys = distfd.resolve_key_steps("sd-personalized-50", 10, allow_rescale=True)
    assert 0 < len(keys) < 10
    check_equivalences(pipe, lambda p: tiny.run(p, steps=10), 10, keys)
    _, stats = apply_run(
        pipe, lambda p: tiny.run(p, steps=10), key_steps="sd-personalized-50", rescale_key_steps=True
    )
    assert stats["encoder_passes"] == len(keys)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_variants_match_reference(kind):
    """A suffix of the timesteps: z_T is the first latents the loop updates (the noised image)."""
    if kind == "img2img":
        check_against_reference(variant(StableDiffusionImg2ImgPipeline), img2img_call(), KEYS)
    else:
        check_against_reference(variant(StableDiffusionInpaintPipeline), inpaint_call, KEYS)


def test_tome_matches_reference():
    pipe = tiny.sd()
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False, max_downsample=2)
    check_against_reference(pipe, lambda p: tiny.run(p, steps=STEPS), KEYS)
