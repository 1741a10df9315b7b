"""Numerics of encoder propagation on tiny seeded pipelines (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import distfd

from . import tiny
from .reference import check_against_reference

STEPS = 10
KEYS = [0, 1, 3, 6]


def apply(pipe, **kw):
    return distfd.apply(pipe, distfd.FasterDiffusionConfig(**kw))


@pytest.mark.parametrize("mode", ["propagate", "parallel"])
@pytest.mark.parametrize(("make", "sched"), [(tiny.sd, s) for s in tiny.SCHEDULERS] + [(tiny.sdxl, "ddim")])
def test_all_key_steps_reproduce_vanilla(make, sched, mode):
    pipe = make(sched)
    ref = tiny.run(pipe, negative_prompt="blue", steps=STEPS)
    loop = len(pipe.scheduler.timesteps)  # PNDM runs one more step than asked for
    handle = apply(pipe, key_steps=list(range(loop)), mode=mode, noise_alpha=0)
    got = tiny.run(pipe, negative_prompt="blue", steps=STEPS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert handle.stats()["encoder_passes"] == loop


@pytest.mark.parametrize("sched", list(tiny.SCHEDULERS))
def test_parallel_equals_propagate(sched):
    pipe = tiny.sd(sched)
    call = dict(negative_prompt="blue", num_images_per_prompt=2)
    handle = apply(pipe, key_steps=KEYS, mode="propagate")
    prop = tiny.run(pipe, **call)
    handle.remove()
    handle = apply(pipe, key_steps=KEYS, mode="parallel")
    par = tiny.run(pipe, **call)
    tiny.assert_close(par, prop)
    # and propagation really changed the result (the test would pass vacuously otherwise)
    handle.remove()
    assert not torch.allclose(tiny.run(pipe, **call), prop, atol=1e-3)


def test_max_parallel_steps_splits_batches_without_changing_results():
    pipe = tiny.sd()
    handle = apply(pipe, key_steps=KEYS, mode="parallel")
    whole = tiny.run(pipe)
    handle.remove()
    handle = apply(pipe, key_steps=KEYS, mode="parallel", max_parallel_steps=2)
    tiny.assert_close(tiny.run(pipe), whole)
    assert handle.stats()["decoder_passes"] == 1 + 1 + 2 + 2  # groups of 1, 2, 3, 4 steps in twos


@torch.no_grad()
def reference_propagation(pipe, key_steps, guidance=5.0, alpha=0.003, below=0.5, seed=0):
    """Encoder propagation written out step by step: a plain sampling loop, encoder outputs replaced
    through torch forward hooks, CFG and prior noise injection by hand."""
    unet, sched = pipe.unet, pipe.scheduler
    cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="blue")
    text = torch.cat([uncond, cond])
    sched.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((1, 4, 16, 16), generator=generator) * sched.init_noise_sigma
    z_T = latents.clone()
    encoder = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    cache: dict[int, object] = {}
    for i, t in enumerate(sched.timesteps):
        key = i in key_steps

        def hook(module, args, output, n=None, key=key):
            if key:
                cache[n] = output
                return None
            return cache[n]

        handles = [
            m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in enumerate(encoder)
        ]
        x = sched.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(x, t, encoder_hidden_states=text).sample
        for h in handles:
            h.remove()
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        if t < below * sched.config.num_train_timesteps:
            latents = latents + alpha * z_T
        latents = sched.step(eps, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("sched", ["ddim", "euler", "dpm"])
def test_propagate_matches_independent_reference(sched):
    ref = reference_propagation(tiny.sd(sched), KEYS)
    pipe = tiny.sd(sched)
    apply(pipe, key_steps=KEYS, mode="propagate")
    tiny.assert_close(tiny.run(pipe, negative_prompt="blue"), ref, rtol=1e-5)


@pytest.mark.parametrize("mode", ["propagate", "parallel"])
def test_encoder_runs_once_per_key_step_and_decoder_once_per_step(mode):
    pipe = tiny.sd()
    seen = {"mid": 0, "out_calls": 0, "out_rows": 0}

    def count_mid(*_):
        seen["mid"] += 1

    def count_out(_m, _a, out):
        seen["out_calls"] += 1
        seen["out_rows"] += out.shape[0]

    pipe.unet.mid_block.resnets[0].register_forward_hook(count_mid)  # runs only when the encoder computes
    pipe.unet.conv_out.register_forward_hook(count_out)  # the decoder's last layer
    apply(pipe, key_steps=KEYS, mode=mode)
    tiny.run(pipe, num_images_per_prompt=2)
    rows = 2 * 2  # CFG halves x images
    assert seen["mid"] == len(KEYS)
    assert seen["out_rows"] == STEPS * rows
    assert seen["out_calls"] == (STEPS if mode == "propagate" else len(KEYS))


def test_remove_restores_vanilla_exactly():
    pipe = tiny.sd()
    before = tiny.run(pipe)
    modules = [pipe.unet, pipe.unet.conv_in, *pipe.unet.down_blocks, pipe.unet.mid_block]
    handle = apply(pipe, key_steps=KEYS)
    with pytest.raises(RuntimeError, match="already applied"):
        apply(pipe, key_steps=KEYS)
    assert not torch.equal(tiny.run(pipe), before)
    handle.remove()
    assert torch.equal(tiny.run(pipe), before)
    for m in modules:
        assert "forward" not in m.__dict__ and not hasattr(m, "_diffusers_hook")
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    apply(pipe, key_steps=KEYS).remove()  # can be applied again after removal


def test_outside_a_sampling_loop_the_applied_modules_act_as_vanilla():
    """An encoder module called (by position or by keyword), or ``scheduler.step``, by user code
    between pipeline calls (``set_timesteps`` ends a loop) is no loop step: computed as without
    distfd, no feature replayed, no noise injected."""
    pipe = tiny.sd()
    unet, sched = pipe.unet, pipe.scheduler
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    eps = torch.randn(x.shape, generator=gen)

    def outside() -> tuple[torch.Tensor, ...]:
        sched.set_timesteps(STEPS)
        return unet.conv_in(x), unet.conv_in(input=x), sched.step(eps, sched.timesteps[-1], x).prev_sample

    vanilla = outside()
    handle = apply(pipe, key_steps=KEYS, noise_alpha=0.5)
    try:
        tiny.run(pipe)  # a loop first: its features and z_T exist
        got = outside()
    finally:
        handle.remove()
    for a, b in zip(got, vanilla, strict=True):
        assert torch.equal(a, b)


def test_a_loop_of_other_than_one_call_per_update_is_refused():
    """A hand-written loop that calls the UNet twice per scheduler update, or skips a timestep, gets
    an error naming the loop step and what it expected (no silently wrong replay)."""
    pipe = tiny.sd()
    unet, sched = pipe.unet, pipe.scheduler
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    handle = apply(pipe, key_steps=KEYS)
    try:
        sched.set_timesteps(STEPS)
        t = sched.timesteps
        unet(x, t[0], encoder_hidden_states=text)
        with pytest.raises(
            RuntimeError, match=r"called for loop step 1 after 0 scheduler updates: this pipeline"
        ):
            unet(x, t[0], encoder_hidden_states=text)
        sched.set_timesteps(STEPS)  # a new loop
        eps = unet(x, t[0], encoder_hidden_states=text).sample
        x = sched.step(eps, t[0], x).prev_sample
        expected = (
            rf"loop step 1 \(timestep {float(t[1])}\) but got timestep {float(t[2])}: this pipeline calls the "
            r"denoiser in a pattern distfd does not support \(one call per scheduler timestep\)\.$"
        )
        with pytest.raises(RuntimeError, match=expected):
            unet(x, t[2], encoder_hidden_states=text)
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["propagate", "parallel"])
def test_each_run_is_logged_with_its_loop_length_and_key_steps(caplog, mode):
    """PNDM's loop makes one call more than the steps asked for: the log gives the loop's length.
    One rank never idles, so no warning says so."""
    pipe = tiny.sd("pndm")
    with caplog.at_level("INFO", logger="distfd"), apply(pipe, key_steps=KEYS, mode=mode):
        tiny.run(pipe, steps=STEPS)
    messages = [r.getMessage() for r in caplog.records]
    assert f"distfd {mode}: {STEPS + 1} steps, key steps {KEYS}, 1 rank(s)" in messages
    assert not any("some ranks will idle" in m for m in messages), messages


def test_remove_leaves_what_was_there_before():
    """Hooks and wrappers of someone else's on the encoder modules and the scheduler (a diffusers
    hook, a replaced ``forward``, a wrapped ``step``) work during the run and are what remains after
    ``remove()``; distfd's own are gone."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = tiny.sd()
    before = tiny.run(pipe)
    calls = {"hook": 0, "forward": 0, "step": 0}

    class Counting(ModelHook):
        def post_forward(self, module, output):
            calls["hook"] += 1
            return output

    conv_in, mid = pipe.unet.conv_in, pipe.unet.mid_block
    HookRegistry.check_if_exists_or_initialize(conv_in).register_hook(Counting(), "theirs")
    plain_mid = mid.forward

    def their_forward(*args, **kwargs):
        calls["forward"] += 1
        return plain_mid(*args, **kwargs)

    mid.forward = their_forward
    plain_step = pipe.scheduler.step

    def their_step(*args, **kwargs):
        calls["step"] += 1
        return plain_step(*args, **kwargs)

    pipe.scheduler.step = their_step
    empty = HookRegistry.check_if_exists_or_initialize(pipe.unet.down_blocks[0])  # someone's, no hook yet
    handle = apply(pipe, key_steps=KEYS)
    tiny.run(pipe)
    assert calls == {"hook": len(KEYS), "forward": len(KEYS), "step": STEPS}  # the encoder at key steps
    handle.remove()
    assert list(conv_in._diffusers_hook.hooks) == ["theirs"]
    assert pipe.unet.down_blocks[0]._diffusers_hook is empty and not empty.hooks
    assert mid.__dict__["forward"] is their_forward and pipe.scheduler.__dict__["step"] is their_step
    assert not hasattr(mid, "_diffusers_hook") and "set_timesteps" not in pipe.scheduler.__dict__
    calls.update(hook=0, forward=0, step=0)
    assert torch.equal(tiny.run(pipe), before)
    assert calls == {"hook": STEPS, "forward": STEPS, "step": STEPS}


def test_pipeline_features_keep_working():
    pipe = tiny.sd()
    pipe.set_progress_bar_config(disable=False)
    apply(pipe, key_steps=KEYS)
    seen = []

    def on_step(p, i, t, kw):
        seen.append((i, int(t)))
        return kw

    gen = torch.Generator().manual_seed(0)
    out = pipe(
        "a red circle",
        negative_prompt="blue",
        num_inference_steps=STEPS,
        generator=gen,
        height=32,
        width=32,
        num_images_per_prompt=2,
        callback_on_step_end=on_step,
    )
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert [i for i, _ in seen] == list(range(STEPS))
    for kind, check in [
        ("np", lambda x: isinstance(x, np.ndarray) and x.shape == (1, 32, 32, 3)),
        ("pt", lambda x: torch.is_tensor(x) and x.shape == (1, 3, 32, 32)),
        ("latent", lambda x: x.shape == (1, 4, 16, 16)),
    ]:
        images = pipe("a red circle", num_inference_steps=STEPS, height=32, width=32, output_type=kind).images
        assert check(images), kind


def test_scheduler_swapped_after_apply_is_followed():
    pipe = tiny.sd()
    apply(pipe, key_steps=KEYS, mode="parallel")
    pipe.scheduler = tiny.scheduler("euler")
    swapped = tiny.run(pipe)
    fresh = tiny.sd("euler")
    apply(fresh, key_steps=KEYS, mode="parallel")
    torch.testing.assert_close(swapped, tiny.run(fresh), rtol=0, atol=0)


def test_noise_injection_only_below_threshold():
    pipe = tiny.sd()
    handle = apply(pipe, key_steps=list(range(STEPS)), noise_below=0.0)  # no timestep is below 0
    no_injection = tiny.run(pipe)
    handle.remove()
    assert torch.equal(no_injection, tiny.run(pipe))
    apply(pipe, key_steps=list(range(STEPS)), noise_alpha=0.003)
    assert not torch.equal(tiny.run(pipe), no_injection)


def test_scheduler_signatures_are_kept():
    import inspect

    pipe = tiny.sd("euler-a")
    before = {n: inspect.signature(getattr(pipe.scheduler, n)) for n in ("step", "set_timesteps")}
    apply(pipe, key_steps=KEYS)
    for name, sig in before.items():
        assert inspect.signature(getattr(pipe.scheduler, name)) == sig  # pipelines pass generator by it


@pytest.mark.parametrize(
    ("make", "sched"), [(tiny.sd, "ddim"), (tiny.sd, "euler-a"), (tiny.sd, "dpm"), (tiny.sdxl, "ddim")]
)
def test_matches_reference_hooks_with_noise_injection(make, sched):
    """Both modes against tests/reference.py (noise injection firing), the encoder computing at the
    key steps only."""
    call = lambda p: tiny.run(p, steps=STEPS, negative_prompt="blue", num_images_per_prompt=2)  # noqa: E731
    check_against_reference(make(sched), call, KEYS)
