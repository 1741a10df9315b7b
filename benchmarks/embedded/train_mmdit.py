"""Train the embedded tiny-shapes-mmdit pipeline: Stable Diffusion 3's layout with flow matching, on CPU.

A standard diffusers ``StableDiffusion3Pipeline`` folder, every part of SD3 in miniature: two CLIP
text encoders with projections and a T5 encoder (offline tokenizers over the scene vocabulary), an
``SD3Transformer2DModel`` (joint blocks, patch 2) and ``FlowMatchEulerDiscreteScheduler``. The
autoencoder is tiny-shapes' (the same 32x32x3 <-> 16x16x4 VAE, copied with ``shift_factor`` 0), so
both embedded models see the same latents; everything else is trained here from scratch on the same
procedural scenes: the three text encoders and the transformer jointly, with the rectified-flow
loss (``x_t = (1 - s) x0 + s e``, target ``e - x0``), logit-normal ``s`` as SD3 trains, 10% caption
dropout for classifier-free guidance, EMA weights. Prompts go through the pipeline's own
``encode_prompt``, so training sees exactly what sampling sees (the T5 tokenizer's
``model_max_length``, 24, is the sequence length distfd passes; see ``ModelFacts``).

The result plus ``training.json`` (seed, steps, final loss, wall time, command) is written to ``--out``.

Example::

    python -m benchmarks.embedded.train_mmdit --out distfd/embedded/weights/tiny-shapes-mmdit --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from tqdm.auto import tqdm
from transformers import (
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from distfd.embedded import default_model_path
from distfd.embedded.scenes import VOCABULARY, generate_scenes

from .models import make_text_encoder
from .tokenizer import build_tokenizer, save_tokenizer
from .train_pipeline import _ema_update, _lr_lambda, encode_latents

logger = logging.getLogger(__name__)

MAX_LENGTH = 24  # tokens per text encoder
CLIP_WIDTHS = (64, 32)  # text_encoder, text_encoder_2 (SD3: CLIP-L 768, CLIP-G 1280)
T5_WIDTH = 96  # >= the CLIP widths together: SD3 pads the CLIP features to T5's width


def t5_tokenizer(max_length: int = MAX_LENGTH, words=VOCABULARY) -> T5TokenizerFast:
    """A T5 tokenizer without sentencepiece: one unigram piece per word of ``words`` (the scene
    vocabulary), printable characters otherwise."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(chr(i), -8.0) for i in range(33, 127)] + [("\u2581", -8.0)]
    tok = Tokenizer(tok_models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        extra_ids=0,
    )


def t5_encoder(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_WIDTH,
            d_kv=24,
            d_ff=2 * T5_WIDTH,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def make_transformer(layers: int, heads: int) -> SD3Transformer2DModel:
    """SD3's joint-block transformer on 16x16x4 latents: patch 2 (64 image tokens), 32-wide heads."""
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32 * heads,
        pooled_projection_dim=sum(CLIP_WIDTHS),
        out_channels=4,
        pos_embed_max_size=16,
    )


def make_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def make_pipeline(vae: AutoencoderKL, args: argparse.Namespace) -> StableDiffusion3Pipeline:
    tok = build_tokenizer(MAX_LENGTH)
    tok3 = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(args.layers, args.heads),
        scheduler=make_scheduler(args.shift),
        vae=vae,
        text_encoder=make_text_encoder(tok, CLIP_WIDTHS[0], CLIPTextModelWithProjection),
        tokenizer=tok,
        text_encoder_2=make_text_encoder(tok, CLIP_WIDTHS[1], CLIPTextModelWithProjection),
        tokenizer_2=copy.deepcopy(tok),
        text_encoder_3=t5_encoder(tok3),
        tokenizer_3=tok3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def encode(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) exactly as the pipeline computes them when sampling."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_LENGTH,
        device=torch.device("cpu"),
    )
    return embeds, pooled


def train(pipe, latents: torch.Tensor, captions: list[str], args, gen, on_checkpoint=None) -> dict:
    """Rectified flow on scaled latents; trains ``pipe``'s encoders and transformer, keeps EMA copies."""
    modules = {name: getattr(pipe, name).float().train() for name in TRAINED}
    ema = {name: copy.deepcopy(m).eval() for name, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps, max(1, args.steps // 20)))
    ema_loss = None
    bar = tqdm(range(args.steps), desc="mmdit+text")
    for step in bar:
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]
        drop = (torch.rand(args.batch_size, generator=gen) < args.caption_dropout).tolist()
        batch = ["" if d else captions[i] for d, i in zip(drop, idx.tolist(), strict=True)]
        s = torch.sigmoid(torch.randn(args.batch_size, generator=gen))  # logit-normal(0, 1), as SD3
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        embeds, pooled = encode(pipe, batch)
        pred = pipe.transformer(
            hidden_states=xt, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=s * 1000
        ).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        for name, m in modules.items():
            _ema_update(ema[name], m, decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(mse=f"{ema_loss:.4f}")
        if on_checkpoint and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            on_checkpoint(step + 1, ema)
    for name, m in ema.items():
        setattr(pipe, name, m)
    return {"flow_mse": ema_loss}


def save(pipe: StableDiffusion3Pipeline, out: Path, ema: dict | None = None, fp16: bool = False) -> None:
    """Write a loadable ``StableDiffusion3Pipeline`` folder (a copy, so training can go on)."""
    copy_ = copy.deepcopy(pipe)
    for name, m in (ema or {}).items():
        setattr(copy_, name, copy.deepcopy(m))
    copy_.register_modules(**{name: getattr(copy_, name) for name in TRAINED})
    if fp16:
        for name in TRAINED:
            getattr(copy_, name).to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    copy_.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        save_tokenizer(getattr(copy_, name), out / name)


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(str(default_model_path() / "vae")).float().eval()
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline reads it; tiny-shapes' latents are centred
    data = generate_scenes(args.n_scenes, args.seed, two_shape_prob=args.two_shape_prob)
    latents = encode_latents(vae, data.as_float()) * vae.config.scaling_factor
    pipe = make_pipeline(vae, args)
    out = Path(args.out)

    def checkpoint(step: int, ema: dict) -> None:
        save(pipe, out / "checkpoints" / f"step-{step}", ema)

    losses = train(pipe, latents, data.captions, args, gen, on_checkpoint=checkpoint)
    save(pipe, out, fp16=args.fp16)
    report = {
        "seed": args.seed,
        "command": "python -m benchmarks.embedded.train_mmdit " + shlex.join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "vae": "tiny-shapes' VAE, copied (shift_factor 0)",
        "final_losses": losses,
        "parameters": {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in TRAINED},
        "wall_time_s": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-scenes", type=int, default=30000)
    p.add_argument("--two-shape-prob", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layers", type=int, default=6, help="joint transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads of 32 channels")
    p.add_argument("--shift", type=float, default=1.0, help="the scheduler's sigma shift")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fp16", action="store_true", help="store the trained weights in float16")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="save EMA weights every N steps (0: never)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args)
    print(json.dumps({k: report[k] for k in ("final_losses", "parameters", "wall_time_s")}, indent=2))


if __name__ == "__main__":
    main()
