"""MMDiT transformers with flow matching: FLUX.1 (double + single blocks, guidance embedding, rotary
positions) and SD3 (joint blocks, CFG), on tiny seeded pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from torch.testing import assert_close

import distfd
from distfd.adapters import REGISTRY

from .equivalence import apply_run, check_equivalences
from .multirank import launch, load
from .reference import check_against_reference
from .tiny_mmdit import flux, run_flux, run_sd3, sd3

STEPS, KEYS = 6, [0, 1, 3]
FLUX_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


def test_flux_equivalences():
    check_equivalences(flux(), run_flux, STEPS, KEYS)


def test_sd3_equivalences():
    check_equivalences(sd3(), run_sd3, STEPS, KEYS)


def test_flux_img2img_starts_part_way():
    """strength 0.7 of 8 steps: a 6-step loop starting part-way; key step k is the k-th step that runs."""
    base = flux()
    pipe = FluxImg2ImgPipeline(**{k: v for k, v in base.components.items() if k in FLUX_PARTS})
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def call(p):
        return run_flux(p, image=image, strength=0.7, steps=8)

    check_equivalences(pipe, call, 6, KEYS)
    check_against_reference(pipe, call, KEYS, encoder_blocks=3)


def test_registry_and_sd3_split():
    listed = distfd.supported()
    assert listed["FluxTransformer2DModel"] == ["FluxPipeline", "FluxImg2ImgPipeline"]
    assert listed["SD3Transformer2DModel"] == ["StableDiffusion3Pipeline"]
    pipe = sd3()
    with distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS)) as handle:
        names = [(m.name, m.keep, m.part) for m in handle.engine.modules]
    assert names == [  # default: 5/6 of 4 joint blocks, 3; the last one (context-pre-only) decodes
        ("pos_embed", False, 1),
        ("context_embedder", False, 0),
        ("transformer_blocks.0", False, None),
        ("transformer_blocks.1", False, None),
        ("transformer_blocks.2", True, None),
    ]
    assert "_diffusers_hook" not in vars(pipe.transformer.pos_embed)  # removed on leaving the block
    # The families' defaults: SD3 the measured 5 of 6 (SD3.5-medium: 20 of 24), FLUX the paper's 18/28.
    sd3_default, flux_default = (
        REGISTRY[c].default_blocks for c in (SD3Transformer2DModel, FluxTransformer2DModel)
    )
    assert (sd3_default(6), sd3_default(24), sd3_default(2)) == (5, 20, 1)
    assert (flux_default(57), flux_default(28)) == (37, 18)


def test_flux_encoder_split_and_counts():
    """Default N scales the paper's 18/28 to 4 blocks (3): both double blocks and the first single
    block; with a key-step subset the encoder runs only at key steps, the decoder at every step."""
    pipe = flux()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, mode="propagate"))
    names = [(m.name, m.keep, m.part) for m in handle.engine.modules]
    calls = {"enc": 0, "dec": 0}

    def counter(key):
        return lambda *args: calls.__setitem__(key, calls[key] + 1)

    singles = pipe.transformer.single_transformer_blocks  # attention runs only where the block computes
    hooks = [
        singles[0].attn.register_forward_hook(counter("enc")),
        singles[1].attn.register_forward_hook(counter("dec")),
    ]
    out = run_flux(pipe)
    for h in hooks:
        h.remove()
    handle.remove()
    assert names == [
        ("x_embedder", False, 1),
        ("context_embedder", False, 0),
        ("transformer_blocks.0", False, None),
        ("transformer_blocks.1", False, None),
        ("single_transformer_blocks.0", True, None),
    ]
    assert calls == {"enc": len(KEYS), "dec": STEPS}
    vanilla = run_flux(pipe)
    # An accelerated image: close to vanilla, not equal to it.
    rel = (out - vanilla).norm() / vanilla.norm()
    assert 1e-4 < rel < 0.5, rel
    one, _ = apply_run(pipe, run_flux, key_steps=KEYS, encoder_blocks=1, mode="propagate")
    assert not torch.allclose(one, out, atol=1e-5)
    with pytest.raises(ValueError, match="encoder_blocks=4 does not fit"):
        distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, encoder_blocks=4))


def _sd3_reference(pipe, latents, keys, n, alpha, steps=STEPS, guidance=4.0):
    """FasterDiffusion on SD3 written out by hand from the pipeline's components (not distfd's hooks):
    the embeddings and the first ``n`` joint blocks run at key steps, their two streams reused until the
    next; CFG; ``z_t += alpha * z_T`` before each update with sigma < 0.5."""
    model = pipe.transformer
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt="a red cube", prompt_2=None, prompt_3=None, negative_prompt="blurry", max_sequence_length=8
    )
    ctx_in, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    z, z_T, cache = latents.clone(), latents.clone(), None
    p = model.config.patch_size
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([z, z])  # (2, C, H, W): uncond, text
        temb = model.time_text_embed(t.expand(2), pooled)
        if i in keys:
            h, ctx = model.pos_embed(x).contiguous(), model.context_embedder(ctx_in)
            for block in model.transformer_blocks[:n]:
                ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            cache = (ctx, h)
        ctx, h = cache
        for block in model.transformer_blocks[n:]:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
        h = model.proj_out(model.norm_out(h, temb))  # (2, tokens, p*p*C)
        hh, ww = x.shape[-2] // p, x.shape[-1] // p
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(2, hh, ww, p, p, model.out_channels))
        pred = h.reshape(2, model.out_channels, hh * p, ww * p)
        uncond, text = pred.chunk(2)
        pred = uncond + guidance * (text - uncond)
        if sched.sigmas[i] < 0.5:
            z = z + alpha * z_T
        z = sched.step(pred, t, z).prev_sample
    return z


@torch.no_grad()
def test_sd3_matches_hand_written_reference_with_noise_injection():
    pipe = sd3()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    keys, n, alpha = [0, 2, 3], 2, 0.05
    got, _ = apply_run(
        pipe,
        lambda p: run_sd3(p, latents=latents),
        key_steps=keys,
        mode="parallel",
        encoder_blocks=n,
        noise_alpha=alpha,
    )
    ref = _sd3_reference(pipe, latents, keys, n, alpha)
    assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # The injection mattered, and where it applies (sigma < 0.5) is what was compared.
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    assert 0 < int((sched.sigmas[:-1] < 0.5).sum()) < STEPS
    assert not torch.allclose(_sd3_reference(pipe, latents, keys, n, 0.0), ref, atol=1e-4)


def test_refusals_by_name():
    pipe = sd3()
    with distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS)):
        with pytest.raises(ValueError, match="skip-layer guidance"):
            run_sd3(pipe, skip_guidance_layers=[1], skip_layer_guidance_start=0.0)
    fpipe = flux()
    with distfd.apply(fpipe, distfd.FasterDiffusionConfig(key_steps=KEYS)):
        with pytest.raises(RuntimeError, match="true CFG"):
            run_flux(fpipe, negative_prompt="blurry", true_cfg_scale=2.0)
    for cls in (FluxFillPipeline, FluxKontextPipeline):
        other = cls(**{k: v for k, v in fpipe.components.items() if k in FLUX_PARTS})
        with pytest.raises(ValueError, match=f"{cls.__name__} is not supported"):
            distfd.apply(other)


MULTI = [
    {
        "pipe": "tiny_mmdit.flux",
        "run": "tiny_mmdit.run_flux",
        "sched": "flow-euler",
        "config": {"key_steps": KEYS},
    },
    {
        "pipe": "tiny_mmdit.sd3",
        "run": "tiny_mmdit.run_sd3",
        "sched": "flow-euler",
        "config": {"key_steps": KEYS, "encoder": "replicated"},
    },
    {  # both placements for FLUX; SD3 with rank0 placement runs 2 ranks in test_models_mmdit_cli's service
        "pipe": "tiny_mmdit.flux",
        "run": "tiny_mmdit.run_flux",
        "sched": "flow-euler",
        "config": {"key_steps": KEYS, "encoder": "replicated"},
    },
]


@pytest.mark.parametrize("world_size", [2, 3])
def test_n_ranks_equal_one_process(world_size, tmp_path):
    from .test_models_distributed import find

    cases = [{**c, "steps": STEPS} for c in MULTI]
    results = launch({"cases": cases, "timeout_s": 120}, world_size, tmp_path, wait_s=420)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.error or r.log[-3000:]}"
    for n, case in enumerate(MULTI):
        pipe = find(case["pipe"])()
        ref, _ = apply_run(pipe, find(case["run"]), **case["config"])
        ranks = [load(tmp_path, n, rank) for rank in range(world_size)]
        for rank, got in enumerate(ranks):
            assert_close(got["latents"], ref, rtol=1e-4, atol=1e-5, msg=f"case {n} rank {rank}")
        assert ranks[0]["stats"]["collectives"] > 0
        assert all(got["stats"]["decoder_rows"] > 0 for got in ranks)


def test_flux_batch_keeps_position_ids_whole():
    """Two prompts with a text length of 2: FLUX's ``txt_ids`` (2, 3) has as many rows as the batch,
    yet has no batch dimension; parallel batches must not re-index it (nor ``img_ids``)."""

    def call(p):
        return run_flux(p, prompt=["a red cube", "a blue ball"], text_len=2)

    out = check_equivalences(flux(), call, STEPS, KEYS)
    assert out["parallel"].shape[0] == 2
    assert not torch.allclose(out["parallel"][0], out["parallel"][1], atol=1e-3)
    check_against_reference(flux(), call, KEYS, encoder_blocks=3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_on_the_transformer_and_its_scale(family):
    """A PEFT LoRA on the attention projections, scaled through joint_attention_kwargs, goes through
    every pass (all key steps reproduce vanilla with the scale, both modes equal tests/reference.py
    with it; the scale changes the result)."""
    from peft import LoraConfig

    pipe, run = (sd3(), run_sd3) if family == "sd3" else (flux(), run_flux)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )

    def call(scale):
        return lambda p: run(p, joint_attention_kwargs={"scale": scale})

    half = check_equivalences(pipe, call(0.5), STEPS, KEYS)
    check_against_reference(pipe, call(0.5), KEYS, encoder_blocks=3)
    full, _ = apply_run(pipe, call(1.0), key_steps=KEYS, mode="parallel")
    assert not torch.allclose(full, half["parallel"], atol=1e-4)


def test_t5_sequence_length_from_the_tokenizer_reaches_every_call():
    """The T5 tokenizer's model_max_length below the pipeline's default is what distfd's calls pass
    (the embedded MMDiT reads 24 tokens): the harness's image equals the pipeline called with it and
    differs from the pipeline's default padding; a tokenizer at 512 (real checkpoints) adds nothing."""
    from distfd.adapters import call_defaults
    from distfd.quality import harness

    pipe = sd3()  # its T5 tokenizer: model_max_length 16
    assert call_defaults(pipe) == {"max_sequence_length": 16}
    setup = harness.Setup(
        prompts=["a red cube"], num_steps=4, guidance_scale=4.0, call_kwargs={"height": 32, "width": 32}
    )

    def direct(**kw):
        gen = torch.Generator().manual_seed(setup.seed)
        return pipe(
            "a red cube",
            num_inference_steps=4,
            guidance_scale=4.0,
            height=32,
            width=32,
            generator=gen,
            output_type="pt",
            **kw,
        ).images

    ours, _ = harness.generate(pipe, setup)
    assert torch.equal(ours, direct(max_sequence_length=16).float())
    assert not torch.equal(ours, direct().float())
    pipe.tokenizer_3.model_max_length = 512
    assert call_defaults(pipe) == {}
    flux_pipe = flux()
    assert call_defaults(flux_pipe) == {"max_sequence_length": 16}  # FLUX's T5 is tokenizer_2


@pytest.mark.parametrize(("family", "blocks"), [("sd3", 3), ("sd3", 1), ("flux", 3), ("flux", 1)])
def test_matches_reference_and_encoder_computes_at_key_steps_only(family, blocks):
    """Both distfd modes against tests/reference.py (hooks of its own, noise injection on); the
    image and text embeddings and every encoder block compute at the key steps and nowhere else."""
    pipe, call = (sd3(), run_sd3) if family == "sd3" else (flux(), run_flux)
    check_against_reference(pipe, call, KEYS, encoder_blocks=blocks)
