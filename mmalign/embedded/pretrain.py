"""Pretrain the embedded world's tiny models on ShapeWorld, on a CPU, reproducibly (seeded).

Subcommands::

    python -m mmalign.embedded.pretrain sd3  --out assets/shapeworld-sd3  [--steps 8000 --max-minutes 45 ...]   (the shipped run: its defaults)
    python -m mmalign.embedded.pretrain clip --out assets/shapeworld-clip [--steps 1500 ...]
    python -m mmalign.embedded.pretrain eval-sd3  --model assets/shapeworld-sd3   (re-measure, rewrite card)
    python -m mmalign.embedded.pretrain eval-clip --model assets/shapeworld-clip

``sd3`` builds a real diffusers ``StableDiffusion3Pipeline`` from the tiny test builder
(:func:`mmalign.testing.sd3.tiny_sd3_pipeline`, layout of SD3.5: MMDiT with a dual-attention first block,
two CLIP text encoders, no T5, ``AutoencoderKL`` with ``shift_factor``), then

1. trains the VAE (L1 + MSE reconstruction, small KL) and sets ``scaling_factor`` / ``shift_factor``
   from the latents' statistics;
2. freezes it, encodes the training images once, and trains the transformer and both CLIP text
   encoders with SD3's rectified-flow loss (x_t = (1 - t) x0 + t eps, target eps - x0, logit-normal t,
   prompt dropped to "" 10% of the time so classifier-free guidance works), AdamW + EMA;
3. measures held-out ShapeEval with the saved pipeline itself and writes ``save_pretrained`` output,
   ``metrics.json`` and ``MODEL_CARD.md``.

Without T5 the pipeline feeds ``max_sequence_length`` (256 by default) all-zero "T5" tokens after the
CLIP tokens. Those tokens are identical at every layer, so attending to N of them equals attending to one
whose attention logit is raised by log N; training uses one such token (:class:`ZeroTokensAttnProcessor`),
which is exactly the N-token pipeline at a fraction of the cost. ``--t5-tokens`` (default 1) is that N:
the shipped model uses 1 (33 text tokens instead of 288, a 4x cheaper denoiser call), saved in
``mmalign_adapter.json`` so ``mmalign.load_model`` passes ``max_sequence_length=1``. ``--init-from DIR``
continues a run written by this script (its VAE kept, a new schedule on freshly generated pairs).

``clip`` trains a tiny ``open_clip.CLIP`` (see :mod:`mmalign.embedded.tiny_clip`) contrastively on
ShapeWorld pairs, with one hard-negative caption per image (a colour / shape / count / relation edit of
its own caption) so that the reward sees binding, counting and relations.

Training data are freshly generated ShapeWorld scenes with ``exclude_heldout=True``: no held-out
composition (hence no held-out prompt) is ever seen in training.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import ADAPTER_OPTIONS_FILE  # read back by mmalign.load_model

HF_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


class PretrainError(RuntimeError):
    """A clear, user-facing error (bad arguments, missing dependency)."""


# ---------------------------------------------------------------------------------------------- utils
class Logger:
    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.time()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def _lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a list of parameters (decay warmed up like diffusers' EMAModel)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def _data_api():
    """The ShapeWorld module (generator, prompt suites) and ShapeEval; a clear error when missing."""
    try:
        from mmalign.embedded import shapeworld
    except ImportError as err:  # pragma: no cover - depends on the checkout
        raise PretrainError(f"mmalign.embedded.shapeworld is required to pretrain on ShapeWorld ({err})") from err
    return shapeworld


def _shapeeval():
    try:
        from mmalign.embedded import shapeeval
    except ImportError as err:
        raise PretrainError(f"mmalign.embedded.shapeeval is required to measure ShapeEval ({err})") from err
    return shapeeval


def prompt_suite(split: str) -> list[tuple[str, str]]:
    """(category, prompt) of a ShapeWorld prompt suite (the shipped file; built in code if missing)."""
    sw = _data_api()
    try:
        return sw.load_prompt_suite(sw.prompt_suite_path(split))
    except FileNotFoundError:
        return sw.build_prompt_suites()[split]


def _norm_prompt(p: str) -> str:
    return " ".join(p.lower().strip().rstrip(".").split())


def training_data(n: int, seed: int, size: int = 32, log: Callable[[str], None] = print) -> tuple[Tensor, list[str], list[str]]:
    """``n`` fresh ShapeWorld training pairs (uint8 images N,3,H,W), held-out compositions excluded;
    any caption equal to a held-out prompt is dropped too (a second, explicit guard)."""
    sw = _data_api()
    images, captions, categories = sw.generate(n, seed, size=size, exclude_heldout=True)
    heldout = {_norm_prompt(p) for _, p in prompt_suite("heldout")}
    keep = [i for i, c in enumerate(captions) if _norm_prompt(c) not in heldout]
    if len(keep) < len(captions):
        log(f"dropped {len(captions) - len(keep)} training captions equal to held-out prompts")
        images = images[keep]
        captions = [captions[i] for i in keep]
        categories = [categories[i] for i in keep]
    return (images * 255).round().to(torch.uint8), list(captions), list(categories)


# ---------------------------------------------------------------------------------------------- SD3 model
@dataclass
class SD3Arch:
    """Size of the tiny SD3 (every other setting comes from :func:`mmalign.testing.sd3.tiny_sd3_pipeline`)."""

    layers: int = 4
    heads: int = 6
    head_dim: int = 16
    vae_channels: tuple[int, int] = (16, 32)
    vae_groups: int = 4
    vae_mid_attention: bool = False
    text_layers: int = 2
    text_intermediate: int = 128
    num_merges: int = 8000
    context_length: int = 32
    shift: float = 3.0


def build_sd3_pipeline(seed: int, arch: SD3Arch):
    """A randomly initialised tiny ``StableDiffusion3Pipeline`` of ``arch`` (text_encoder_3=None)."""
    from diffusers import StableDiffusion3Pipeline

    from mmalign.testing.components import TINY_CLIP_WIDTH, tiny_clip_text_encoder
    from mmalign.testing.sd3 import tiny_sd3_pipeline
    from mmalign.testing.tokenizers import clip_tokenizer

    inner = arch.heads * arch.head_dim
    base = tiny_sd3_pipeline(
        seed,
        num_layers=arch.layers,
        num_attention_heads=arch.heads,
        attention_head_dim=arch.head_dim,
        caption_projection_dim=inner,
        vae={
            "block_out_channels": tuple(arch.vae_channels),
            "norm_num_groups": arch.vae_groups,
            "mid_block_add_attention": arch.vae_mid_attention,
        },
        scheduler={"shift": arch.shift},
    )
    # CLIP BPE with more merges (ShapeWorld words whole) and a 32-token context (captions are short)
    tokenizer = clip_tokenizer(arch.num_merges, model_max_length=arch.context_length)
    tokenizer_2 = clip_tokenizer(arch.num_merges, model_max_length=arch.context_length)
    clip = dict(
        projection=True,
        hidden_size=TINY_CLIP_WIDTH,
        projection_dim=TINY_CLIP_WIDTH,
        num_hidden_layers=arch.text_layers,
        intermediate_size=arch.text_intermediate,
    )
    components = dict(base.components)
    components.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=tiny_clip_text_encoder(tokenizer, seed=seed, **clip),
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, seed=seed + 1, **clip),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return StableDiffusion3Pipeline(**components)


class ZeroTokensAttnProcessor:
    """SD3 joint attention where the LAST text token stands for ``multiplicity`` identical tokens.

    Identical tokens have identical keys and values, so N copies of a key contribute N exp(q.k): the
    same as one copy with log N added to its logit. Used only in training (the pipeline's all-zero "T5"
    tokens); image-only attention (``attn2``) is left as it is.
    """

    def __init__(self, multiplicity: int) -> None:
        self.log_mult = math.log(max(int(multiplicity), 1))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            return JointAttnProcessor2_0()(attn, hidden_states, None, attention_mask)
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_mult
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


def encode_clip_ids(pipe, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The pipeline's CLIP conditioning (``encode_prompt`` without the T5 part) from token ids B,L:
    (hidden states B,L,2W from the penultimate layers, pooled projections B,2W)."""
    outs = [enc(ids, output_hidden_states=True) for enc in (pipe.text_encoder, pipe.text_encoder_2)]
    hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    pooled = torch.cat([o[0] for o in outs], dim=-1)
    pad = pipe.transformer.config.joint_attention_dim - hidden.shape[-1]
    if pad > 0:
        hidden = F.pad(hidden, (0, pad))
    return hidden, pooled


def tokenize(pipe, texts: Sequence[str]) -> Tensor:
    return pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt").input_ids


def transformer_forward(pipe, latents: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
    """Transformer call with the CLIP tokens plus ONE zero "T5" token (see :class:`ZeroTokensAttnProcessor`)."""
    zeros = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1])
    return pipe.transformer(
        hidden_states=latents,
        timestep=sigma * 1000.0,
        encoder_hidden_states=torch.cat([hidden, zeros], dim=1),
        pooled_projections=pooled,
        return_dict=False,
    )[0]


def set_zero_token_processors(transformer, multiplicity: int):
    """Install :class:`ZeroTokensAttnProcessor` on the joint attentions; returns the old processors."""
    old = dict(transformer.attn_processors)
    proc = ZeroTokensAttnProcessor(multiplicity)
    transformer.set_attn_processor({name: proc if ".attn." in name else p for name, p in old.items()})
    return old


# ---------------------------------------------------------------------------------------------- SD3 training
def train_vae(vae, images_u8: Tensor, *, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, log, max_seconds: float | None = None,
              stop_at_step: int | None = None) -> dict[str, float]:
    """Train the AutoencoderKL on uint8 images (reconstruction L1 + MSE in [-1,1], + kl_weight * KL)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    n = images_u8.shape[0]
    t0 = time.time()
    stats: dict[str, float] = {}
    run_rec = run_kl = 0.0
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = images_u8[idx].float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run_rec = 0.98 * run_rec + 0.02 * rec_loss.item() if step else rec_loss.item()
        run_kl = 0.98 * run_kl + 0.02 * kl.item() if step else kl.item()
        done = step + 1
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps} rec {run_rec:.4f} kl/elem {run_kl:.3f} ({time.time() - t0:.0f}s)")
        if stop_at_step is not None and done >= stop_at_step:
            log(f"vae: stopping after {done} steps (--vae-stop-at-step)")
            break
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"vae: time limit reached after {done} steps")
            break
    vae.eval()
    stats.update(vae_steps=done, vae_rec_loss=run_rec, vae_kl_per_elem=run_kl, vae_seconds=time.time() - t0)
    return stats


@torch.no_grad()
def encode_latents(vae, images_u8: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (float16, N,C,h,w)."""
    means, stds = [], []
    for i in range(0, images_u8.shape[0], batch_size):
        post = vae.encode(images_u8[i : i + batch_size].float() / 127.5 - 1.0).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae, images_u8: Tensor) -> float:
    x = images_u8.float() / 255
    rec = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    mse = F.mse_loss(rec, x).item()
    return float(10 * math.log10(1.0 / max(mse, 1e-10)))


def train_transformer(
    pipe,
    latent_mean: Tensor,
    latent_std: Tensor,
    ids: Tensor,
    empty_ids: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    text_lr: float,
    cfg_dropout: float,
    ema_decay: float,
    t5_tokens: int,
    seed: int,
    log,
    max_seconds: float | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Rectified-flow training of the transformer (+ CLIP text encoders); leaves EMA weights in place.

    The learning-rate schedule always spans ``steps``; ``stop_at_step`` (or ``max_seconds``) ends earlier."""
    vae = pipe.vae
    shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    groups = [
        {"params": list(pipe.transformer.parameters()), "lr": lr, "base_lr": lr},
        {"params": [p for enc in modules[1:] for p in enc.parameters()], "lr": text_lr, "base_lr": text_lr},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA([p for m in modules for p in m.parameters()], ema_decay)
    old_procs = set_zero_token_processors(pipe.transformer, t5_tokens)
    gen = torch.Generator().manual_seed(seed)
    n = latent_mean.shape[0]
    t0 = time.time()
    run = None
    done = 0
    history = []
    warmup = min(300, steps // 10 + 1)
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, g["base_lr"], warmup=warmup)
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            z = latent_mean[idx].float() + latent_std[idx].float() * torch.randn(latent_mean[idx].shape, generator=gen)
            x0 = (z - shift) * scale
            batch_ids = ids[idx].clone()
            drop = torch.rand(batch_size, generator=gen) < cfg_dropout
            batch_ids[drop] = empty_ids
            # t: logit-normal(0, 1) like SD3, with 20% uniform so the ends of the schedule are trained too
            t = torch.sigmoid(torch.randn(batch_size, generator=gen))
            uni = torch.rand(batch_size, generator=gen) < 0.2
            t = torch.where(uni, torch.rand(batch_size, generator=gen), t).clamp(1e-4, 1 - 1e-4)
            noise = torch.randn(x0.shape, generator=gen)
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
            hidden, pooled = encode_clip_ids(pipe, batch_ids)
            pred = transformer_forward(pipe, xt, t, hidden, pooled)
            loss = F.mse_loss(pred.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            ema.update()
            run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
            done = step + 1
            if step % 100 == 0 or step == steps - 1:
                el = time.time() - t0
                eta = el / done * (steps - done)
                log(f"sd3 step {step:5d}/{steps} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} ({el:.0f}s, eta {eta:.0f}s)")
                history.append((done, round(run, 5)))
            if max_seconds is not None and time.time() - t0 > max_seconds:
                log(f"sd3: time limit reached after {done} of {steps} steps")
                break
            if stop_at_step is not None and done >= stop_at_step:
                log(f"sd3: stopping at step {done} of {steps} (--stop-at-step)")
                break
    finally:
        pipe.transformer.set_attn_processor(old_procs)
    ema.copy_to_params()
    for m in modules:
        m.eval()
    return {"steps_done": done, "final_loss_ema": run, "train_seconds": time.time() - t0, "loss_history": history}


# ---------------------------------------------------------------------------------------------- SD3 eval
@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], *, steps: int, guidance: float, seed: int, batch_size: int = 64,
                  max_sequence_length: int = 256) -> Tensor:
    """Images (N,3,H,W in [0,1]) from the pipeline's own ``__call__``; row i seeded with seed + i."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt",
                   max_sequence_length=max_sequence_length)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def shapeeval_scores(images: Tensor, prompts: Sequence[str], categories: Sequence[str]) -> dict[str, Any]:
    """Per-category and overall strict accuracy and clause credit of images against their prompts."""
    se = _shapeeval()
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for img, prompt, cat in zip(images, prompts, categories):
        r = se.evaluate(img, prompt)
        per[cat].append((float(bool(r.strict)), float(r.score)))
    table = {c: {"n": len(v), "strict": float(np.mean([s for s, _ in v])), "credit": float(np.mean([c_ for _, c_ in v]))} for c, v in sorted(per.items())}
    allv = [x for v in per.values() for x in v]
    cats = list(table.values())
    table["overall"] = {
        "n": len(allv),
        "strict": float(np.mean([s for s, _ in allv])),
        "credit": float(np.mean([c for _, c in allv])),
        # GenEval-style: mean over categories
        "strict_mean_over_categories": float(np.mean([t["strict"] for t in cats])),
        "credit_mean_over_categories": float(np.mean([t["credit"] for t in cats])),
    }
    return table


def evaluate_sd3(pipe, *, split: str = "heldout", samples_per_prompt: int = 2, steps: int = 16, guidance: float = 4.0, seed: int = 1234, max_prompts: int | None = None, max_sequence_length: int = 256, log=print) -> dict[str, Any]:
    suite = prompt_suite(split)
    if max_prompts is not None:
        suite = suite[:max_prompts]
    cats = [c for c, _ in suite for _ in range(samples_per_prompt)]
    prompts = [p for _, p in suite for _ in range(samples_per_prompt)]
    t0 = time.time()
    images = sample_images(pipe, prompts, steps=steps, guidance=guidance, seed=seed, max_sequence_length=max_sequence_length)
    table = shapeeval_scores(images, prompts, cats)
    log(f"shapeeval[{split}] {len(suite)} prompts x {samples_per_prompt}, {steps} steps, cfg {guidance}: "
        f"strict {table['overall']['strict']:.3f} credit {table['overall']['credit']:.3f} ({time.time() - t0:.0f}s)")
    return {"split": split, "prompts": len(suite), "samples_per_prompt": samples_per_prompt, "steps": steps, "guidance": guidance, "seed": seed, "table": table, "images": images, "prompt_list": prompts}


def save_grid(images: Tensor, path: Path, ncol: int = 16, scale: int = 2) -> None:
    from PIL import Image

    n = images.shape[0]
    nrow = (n + ncol - 1) // ncol
    h, w = images.shape[-2:]
    grid = torch.zeros(3, nrow * (h + 2), ncol * (w + 2))
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = images[i]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------- model cards
def _table_md(table: dict[str, Any]) -> str:
    lines = ["| category | n | strict accuracy | clause credit |", "|---|---:|---:|---:|"]
    for cat, row in table.items():
        lines.append(f"| {cat} | {row['n']} | {row['strict']:.3f} | {row['credit']:.3f} |")
    ov = table.get("overall", {})
    if "strict_mean_over_categories" in ov:
        lines.append(f"| mean over categories | | {ov['strict_mean_over_categories']:.3f} | {ov['credit_mean_over_categories']:.3f} |")
    return "\n".join(lines)


def _env_line() -> str:
    import diffusers
    import transformers

    return (f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} CPU threads ({platform.machine()})")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _replay_lines(meta: dict[str, Any]) -> list[str]:
    if not meta.get("replay_command"):
        return []
    tr, args = meta.get("training", {}), meta.get("args", {})
    cut = []
    if tr.get("vae_steps") is not None and args.get("vae_steps") and tr["vae_steps"] < args["vae_steps"] and not meta.get("init_from"):
        cut.append(f"the VAE after {tr['vae_steps']} of {args['vae_steps']} steps")
    if tr.get("steps_done") is not None and args.get("steps") and tr["steps_done"] < args["steps"]:
        cut.append(f"training after {tr['steps_done']} of {args['steps']} steps")
    return [
        f"A wall-time limit stopped {' and '.join(cut) or 'the run early'}. This replays the run step for step "
        "(same schedules, same stopping points, no time limits; bit-identical on the same CPU and thread count):",
        "",
        "```",
        meta["replay_command"],
        "```",
        "",
    ]


def _notes_lines(meta: dict[str, Any]) -> list[str]:
    notes = meta.get("notes") or []
    return ["## Notes and limitations", "", *[f"- {n}" for n in notes], ""] if notes else []


def _t5_line(meta: dict[str, Any]) -> str:
    n = int(meta.get("t5_tokens", 256))
    if n == 256:
        return ("The model was trained for the pipeline's default `max_sequence_length=256` (256 all-zero \"T5\" "
                "tokens after the 32 CLIP tokens; training used one token with multiplicity 256, which is exactly equivalent).")
    return (f"The model was trained with `max_sequence_length={n}` ({n} all-zero \"T5\" token(s) after the 32 CLIP "
            f"tokens, {(32 + n)} text tokens instead of the pipeline default's 288: ~4x cheaper). Pass "
            f"`max_sequence_length={n}` to the pipeline; `mmalign.load_model` reads it from `{ADAPTER_OPTIONS_FILE}`.")


def _init_lines(meta: dict[str, Any]) -> list[str]:
    chain, init = [], meta.get("init_from")
    while init:
        chain.append(init)
        init = init.get("init_from")
    if not chain:
        return []
    lines = ["This run continued an earlier one (its weights, VAE included, were the starting point). "
             "The chain, oldest first:", "", "```"]
    for c in reversed(chain):
        lines.append(c.get("replay_command") or c.get("command") or "?")
    lines += ["```", ""]
    return lines


def write_sd3_card(out: Path, meta: dict[str, Any]) -> None:
    tr = meta.get("training", {})
    ev = meta.get("eval", {})
    parts = [
        "# shapeworld-sd3: a tiny Stable Diffusion 3 pipeline pretrained on ShapeWorld",
        "",
        "A real diffusers `StableDiffusion3Pipeline` (SD3.5 layout at toy width: MMDiT with a dual-attention "
        "first block and RMS q/k norm, two CLIP text encoders, **no T5**, 2-level `AutoencoderKL` with "
        "`shift_factor`, `FlowMatchEulerDiscreteScheduler`), trained from scratch on a laptop-class CPU on "
        "procedurally generated ShapeWorld images (32x32, shapes circle/square/triangle in six colours on black). "
        "It is deliberately small and briefly trained: the measured ShapeEval scores and the notes below say "
        "what it can and cannot draw; there is ample room for alignment to improve it.",
        "",
        "## Loading",
        "",
        "```python",
        "from diffusers import StableDiffusion3Pipeline",
        f"pipe = StableDiffusion3Pipeline.from_pretrained('{meta.get('out_rel', 'assets/shapeworld-sd3')}', text_encoder_3=None, tokenizer_3=None)",
        "image = pipe('a red circle left of a blue square', num_inference_steps=16, guidance_scale=4.0,"
        + (f" max_sequence_length={int(meta.get('t5_tokens', 256))}," if int(meta.get("t5_tokens", 256)) != 256 else "") + "",
        "             generator=torch.Generator().manual_seed(0), output_type='pt').images  # 1,3,32,32",
        "",
        "import mmalign",
        f"adapter = mmalign.load_model('{meta.get('out_rel', 'assets/shapeworld-sd3')}')",
        "```",
        "",
        _t5_line(meta),
        "",
        "## Architecture",
        "",
        f"- transformer: {meta['arch']['layers']} MMDiT blocks, {meta['arch']['heads']} heads x {meta['arch']['head_dim']} "
        f"(width {meta['arch']['heads'] * meta['arch']['head_dim']}), patch 2 on 16x16x4 latents (64 image tokens); "
        f"{meta['params']['transformer']:,} parameters",
        f"- VAE: AutoencoderKL, channels {tuple(meta['arch']['vae_channels'])}, 4 latent channels, "
        f"scaling_factor {meta['vae_scaling_factor']:.4f}, shift_factor {meta['vae_shift_factor']:.4f}; {meta['params']['vae']:,} parameters",
        f"- text encoders: 2 x CLIPTextModelWithProjection (width 32, {meta['arch']['text_layers']} layers), CLIP BPE "
        f"with the first {meta['arch']['num_merges']} merges, context {meta['arch']['context_length']}; "
        f"{meta['params']['text_encoders']:,} parameters (trained jointly with the transformer)",
        f"- scheduler: FlowMatchEulerDiscreteScheduler, shift {meta['arch']['shift']}",
        f"- files: {meta.get('size_mb', 0):.1f} MB (safetensors: transformer and VAE float16, text encoders float32)",
        "",
        "## Training",
        "",
        "```",
        meta["command"],
        "```",
        "",
        *_replay_lines(meta),
        *_init_lines(meta),
        f"- seed {meta['seed']}; {meta['num_train']} freshly generated ShapeWorld pairs "
        f"(`generate(n, seed, exclude_heldout=True)`: no held-out composition or prompt is ever seen)",
        f"- VAE: {tr.get('vae_steps')} steps, batch {meta['vae_batch_size']}, L1 + MSE + {meta['kl_weight']:g} x KL; "
        f"held-out reconstruction PSNR {meta.get('vae_psnr', float('nan')):.1f} dB; {_fmt_minutes(tr.get('vae_seconds', 0))}",
        f"- transformer + text encoders: {tr.get('steps_done')} steps (schedule of {meta.get('args', {}).get('steps', tr.get('steps_done'))}) of batch {meta['batch_size']}, rectified flow "
        f"(logit-normal t with 20% uniform), AdamW lr {meta['lr']:g} (text {meta['text_lr']:g}), cosine, EMA {meta['ema_decay']}, "
        f"prompt dropout {meta['cfg_dropout']}; final loss (running mean) {tr.get('final_loss_ema', float('nan')):.4f}; "
        f"{_fmt_minutes(tr.get('train_seconds', 0))}",
        f"- total wall time {_fmt_minutes(meta.get('total_seconds', 0))} on {meta.get('env', _env_line())}",
        "",
    ]
    for key, title in (("heldout", "held-out"), ("train", "train")):
        if key in ev:
            e = ev[key]
            parts += [
                f"## ShapeEval on the {title} prompt suite",
                "",
                f"{e['prompts']} prompts x {e['samples_per_prompt']} samples, {e['steps']} Euler steps, guidance {e['guidance']}, "
                f"seeds {e['seed']}+i (`python -m mmalign.embedded.pretrain eval-sd3 --model <dir>` re-measures).",
                "",
                _table_md(e["table"]),
                "",
            ]
    if "reference" in ev:
        parts += ["Reference (ShapeEval of real ShapeWorld renders of the same categories): "
                  f"strict {ev['reference']['strict']:.3f}, credit {ev['reference']['credit']:.3f}.", ""]
    parts += ["`samples_heldout.png`: the first held-out samples (one row = 8 prompts x 2 seeds).", ""]
    parts += _notes_lines(meta)
    (out / "MODEL_CARD.md").write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------- sd3 command
def _command(args) -> str:
    return "python -m mmalign.embedded.pretrain " + " ".join(shlex.quote(a) for a in args.argv)


def _resolved_args(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "argv"}


def _replay_command(args, training: dict[str, Any]) -> str | None:
    """When a run was cut by its time limit: the command that replays it exactly (same schedule, same
    stopping step, no time limits); None when it ran all its steps."""
    cut = training.get("steps_done") is not None and training["steps_done"] < args.steps and args.stop_at_step is None
    vae_done = training.get("vae_steps")
    vae_cut = (args.command == "sd3" and not args.init_from and vae_done is not None and vae_done < args.vae_steps
               and args.vae_stop_at_step is None)  # (a continued run keeps its source's VAE)
    if not (cut or vae_cut):
        return None
    extra = []
    if cut:
        extra.append(f"--stop-at-step {training['steps_done']}")
    extra.append("--max-minutes 100000")
    if args.command == "sd3":
        if vae_cut:
            extra.append(f"--vae-stop-at-step {vae_done}")
        extra.append("--vae-max-minutes 100000")
    argv = [a for a in args.argv]
    return _command(args) + " " + " ".join(extra) if argv else None


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_sd3(args) -> dict[str, Any]:
    log = Logger(args.quiet)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    t_start = time.time()
    arch = SD3Arch(
        layers=args.layers, heads=args.heads, head_dim=args.head_dim, vae_channels=tuple(args.vae_channels),
        vae_groups=args.vae_groups, text_layers=args.text_layers, num_merges=args.num_merges,
        context_length=args.context_length, shift=args.shift,
    )
    init_meta: dict[str, Any] | None = None
    if args.init_from:
        # continue a shipped run: its VAE (and latent shift/scale) stay as they are; the transformer and
        # text encoders train on, with a fresh schedule, on freshly generated pairs (--seed)
        src = Path(args.init_from)
        mfile = src / "metrics.json"
        if not mfile.is_file():
            raise PretrainError(f"--init-from {src}: no metrics.json (not written by `pretrain sd3`)")
        init_meta = json.loads(mfile.read_text())
        a = init_meta["arch"]
        arch = SD3Arch(layers=a["layers"], heads=a["heads"], head_dim=a["head_dim"], vae_channels=tuple(a["vae_channels"]),
                       vae_groups=a["vae_groups"], text_layers=a["text_layers"], num_merges=a["num_merges"],
                       context_length=a["context_length"], shift=a["shift"])
        log(f"continuing {src} ({init_meta.get('training', {}).get('steps_done')} steps, "
            f"{init_meta.get('t5_tokens', 256)} zero T5 tokens): {arch}")
        pipe = load_sd3_dir(src)
        pipe.to(torch.float32)
    else:
        log(f"building tiny SD3 pipeline: {arch}")
        pipe = build_sd3_pipeline(args.seed, arch)
    params = {
        "transformer": _param_count(pipe.transformer),
        "vae": _param_count(pipe.vae),
        "text_encoders": _param_count(pipe.text_encoder) + _param_count(pipe.text_encoder_2),
    }
    log(f"parameters: {params}")

    log(f"generating {args.num_train} ShapeWorld training pairs (seed {args.seed})")
    images, captions, _ = training_data(args.num_train, args.seed, size=args.image_size, log=log)
    val_images, _, _ = training_data(256, args.seed + 7919, size=args.image_size, log=log)

    # 1. VAE (kept as it is when continuing a run)
    vae = pipe.vae
    if init_meta is None:
        stats = train_vae(vae, images, steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr,
                          kl_weight=args.kl_weight, seed=args.seed + 1, log=log, max_seconds=args.vae_max_minutes * 60,
                          stop_at_step=args.vae_stop_at_step)
    else:
        stats = {k: init_meta["training"][k] for k in ("vae_steps", "vae_rec_loss", "vae_kl_per_elem", "vae_seconds")
                 if k in init_meta.get("training", {})}
    psnr = vae_psnr(vae, val_images)
    log(f"vae: held-out reconstruction PSNR {psnr:.2f} dB")
    vae.requires_grad_(False)
    mean, std = encode_latents(vae, images)
    if init_meta is None:
        shift = float(mean.float().mean())
        scale = float(1.0 / (mean.float() - shift).std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    else:
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    log(f"latents {tuple(mean.shape)}: shift_factor {shift:.4f} scaling_factor {scale:.4f} "
        f"(posterior std mean {float(std.float().mean()):.4f})")

    # 2. transformer + text encoders
    ids = tokenize(pipe, captions)
    empty_ids = tokenize(pipe, [""])[0]
    remaining = args.max_minutes * 60 - (time.time() - t_start)
    tr = train_transformer(
        pipe, mean, std, ids, empty_ids, steps=args.steps, batch_size=args.batch_size, lr=args.lr, text_lr=args.text_lr,
        cfg_dropout=args.cfg_dropout, ema_decay=args.ema_decay, t5_tokens=args.t5_tokens, seed=args.seed + 2, log=log,
        max_seconds=max(remaining, 1.0), stop_at_step=args.stop_at_step,
    )
    stats.update(tr)
    pipe.set_progress_bar_config(disable=True)

    # 3. save, reload, evaluate the shipped files
    save_sd3_pipeline(pipe, out, max_sequence_length=args.t5_tokens)
    total = time.time() - t_start
    try:
        out_rel = str(out.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        out_rel = str(out)
    meta: dict[str, Any] = {
        "command": _command(args),
        "replay_command": _replay_command(args, tr),
        "args": _resolved_args(args),
        "seed": args.seed,
        "arch": {**arch.__dict__, "vae_channels": list(arch.vae_channels)},
        "params": params,
        "num_train": len(captions),
        "batch_size": args.batch_size,
        "vae_batch_size": args.vae_batch_size,
        "kl_weight": args.kl_weight,
        "lr": args.lr,
        "text_lr": args.text_lr,
        "ema_decay": args.ema_decay,
        "cfg_dropout": args.cfg_dropout,
        "t5_tokens": args.t5_tokens,
        "init_from": None if init_meta is None else {
            "path": str(args.init_from),
            "command": init_meta.get("command"),
            "replay_command": init_meta.get("replay_command"),
            "steps_done": init_meta.get("training", {}).get("steps_done"),
            "t5_tokens": init_meta.get("t5_tokens", 256),
            "total_seconds": init_meta.get("total_seconds"),
            "init_from": init_meta.get("init_from"),
        },
        "vae_psnr": psnr,
        "vae_shift_factor": shift,
        "vae_scaling_factor": scale,
        "training": stats,
        "total_seconds": total,
        "env": _env_line(),
        "out_rel": out_rel,
        "size_mb": _dir_size(out) / 2**20,
    }
    log(f"saved pipeline to {out} ({meta['size_mb']:.1f} MB); training wall time {_fmt_minutes(total)}")
    (out / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.eval_prompts != 0:
        try:
            meta = eval_sd3_dir(out, args, meta=meta, log=log)
        except PretrainError as err:  # the model is saved: measure later with `eval-sd3`
            log(f"evaluation skipped: {err}")
    write_sd3_card(out, meta)
    log(f"wrote {out / 'MODEL_CARD.md'}")
    return meta




def save_sd3_pipeline(pipe, out: Path, max_sequence_length: int = 256) -> None:
    """``save_pretrained`` with the transformer and VAE in float16 (diffusers loads them back as float32)
    and the small CLIP text encoders in float32 (transformers would keep float16 weights in float16);
    ``model_index.json`` records the absent T5 as ``[null, null]``."""
    from diffusers.utils import logging as dlog

    out.mkdir(parents=True, exist_ok=True)
    dlog.set_verbosity_error()
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    try:
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        pipe.transformer.to(torch.float32)
        pipe.vae.to(torch.float32)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("text_encoder_3", "tokenizer_3"):
        index.setdefault(name, [None, None])
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # mmalign.load_model reads adapter defaults from this file: the zero "T5" tokens the model was trained with
    options = out / ADAPTER_OPTIONS_FILE
    if max_sequence_length != 256:
        options.write_text(json.dumps({"adapter_kwargs": {"max_sequence_length": int(max_sequence_length)}}, indent=2) + "\n")
    elif options.exists():
        options.unlink()


def load_sd3_dir(path: str | os.PathLike):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_sd3_dir(path: Path, args, meta: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Measure ShapeEval of the saved pipeline (held-out, and a train-suite subset); update metrics/card."""
    torch.set_num_threads(args.threads)
    _shapeeval()  # fail before sampling when the verifier is missing
    path = Path(path)
    if meta is None:
        mfile = path / "metrics.json"
        if not mfile.is_file():
            raise PretrainError(f"{path}: no metrics.json (not written by `pretrain sd3`)")
        meta = json.loads(mfile.read_text())
    pipe = load_sd3_dir(path)
    max_prompts = None if args.eval_prompts is None or args.eval_prompts < 0 else args.eval_prompts
    ev: dict[str, Any] = {}
    for split in ("heldout", "train"):
        res = evaluate_sd3(pipe, split=split, samples_per_prompt=args.eval_samples, steps=args.eval_steps,
                           guidance=args.eval_guidance, seed=args.eval_seed, max_prompts=max_prompts,
                           max_sequence_length=int(meta.get("t5_tokens", 256)), log=log)
        if split == "heldout":
            save_grid(res["images"][:128], path / "samples_heldout.png")
        ev[split] = {k: v for k, v in res.items() if k not in ("images", "prompt_list")}
        for cat, row in res["table"].items():
            log(f"  {split:8s} {cat:22s} n={row['n']:4d} strict {row['strict']:.3f} credit {row['credit']:.3f}")
    # reference: ShapeEval on real renders (how far from perfect the verifier itself is)
    sw = _data_api()
    ref_imgs, ref_caps, ref_cats = sw.generate(240, args.eval_seed, size=32)
    ref = shapeeval_scores(ref_imgs, ref_caps, ref_cats)["overall"]
    ev["reference"] = {"strict": ref["strict"], "credit": ref["credit"]}
    log(f"reference (real renders): strict {ref['strict']:.3f} credit {ref['credit']:.3f}")
    meta["eval"] = ev
    (path / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_sd3_card(path, meta)
    return meta


# ---------------------------------------------------------------------------------------------- CLIP
def _perturb(spec, rng: np.random.Generator):
    """A hard-negative edit of a ShapeWorld ``Requirements`` (colour, shape, count, binding or relation);
    None when the drawn edit does not apply. Edits stay inside the caption grammar."""
    from dataclasses import replace

    sw = _data_api()
    groups = list(spec.groups)
    ops = ["color", "shape"]
    if len(groups) == 1:
        ops += ["count", "count"]
    else:
        ops += ["swap_colors", "swap_shapes"]
    if spec.relations:
        ops += ["relation", "relation"]
    op = ops[int(rng.integers(len(ops)))]
    i = int(rng.integers(len(groups)))
    g = groups[i]
    if op == "color":
        if g.color is None:  # naming a colour for "any colour" objects may still be true
            return None
        colors = [c for c in sw.COLORS if c != g.color]
        groups[i] = replace(g, color=str(colors[int(rng.integers(len(colors)))]))
    elif op == "shape":
        taken = {h.shape for j, h in enumerate(groups) if j != i} if not spec.relations else set()
        shapes = [s for s in sw.SHAPES if s != g.shape and s not in taken]
        if not shapes:
            return None
        groups[i] = replace(g, shape=str(shapes[int(rng.integers(len(shapes)))]))
    elif op == "count":
        counts = [c for c in range(1, sw.MAX_COUNT + 1) if c != g.count]
        groups[i] = replace(g, count=int(counts[int(rng.integers(len(counts)))]))
    elif op == "swap_colors":
        if groups[0].color == groups[1].color or None in (groups[0].color, groups[1].color):
            return None
        groups[0], groups[1] = replace(groups[0], color=groups[1].color), replace(groups[1], color=groups[0].color)
    elif op == "swap_shapes":
        if groups[0].shape == groups[1].shape:
            return None
        groups[0], groups[1] = replace(groups[0], shape=groups[1].shape), replace(groups[1], shape=groups[0].shape)
    elif op == "relation":
        (r,) = spec.relations
        others = [x for x in sw.RELATIONS if x != r.rel]
        rel = sw.CONVERSE[r.rel] if rng.random() < 0.6 else str(others[int(rng.integers(len(others)))])
        return sw.Requirements(tuple(groups), (sw.Relation(r.a, rel, r.b),))
    return sw.Requirements(tuple(groups), spec.relations)


def clip_training_data(n: int, seed: int, size: int = 32, log=print) -> tuple[Tensor, list[str], list[str], list[str]]:
    """(uint8 images, captions, one hard-negative caption each, categories); held-out compositions excluded."""
    sw = _data_api()
    heldout = {_norm_prompt(p) for _, p in prompt_suite("heldout")}
    imgs, caps, negs, cats = [], [], [], []
    rng = np.random.default_rng([seed, 99])
    for i in range(n):
        ex = sw.example_at(i, seed, size, exclude_heldout=True)
        if _norm_prompt(ex.caption) in heldout:
            continue
        neg = None
        for _ in range(20):
            cand = _perturb(ex.spec, rng)
            if cand is None or sw.is_heldout(cand):
                continue
            text = cand.prompt()
            if _norm_prompt(text) != _norm_prompt(ex.caption) and _norm_prompt(text) not in heldout:
                neg = text
                break
        imgs.append(ex.image)
        caps.append(ex.caption)
        negs.append(neg if neg is not None else ex.caption)
        cats.append(ex.category)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, caps, negs, cats


def encode_text_prefix(model, text: Tensor, normalize: bool = True) -> Tensor:
    """``model.encode_text`` on ids cut to their first L <= context_length tokens (exact for causal CLIP
    text towers with argmax pooling as long as every row's <eot> is within the L tokens)."""
    from open_clip.transformer import text_global_pool

    L = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Light photometric jitter (no flips or crops: they would change relations and counts)."""
    b = x.shape[0]
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    noise = 0.02 * torch.randn(x.shape, generator=gen)
    return (x * gain + noise).clamp(0, 1)


def train_clip(model, tokenizer, info, images: Tensor, caps: list[str], negs: list[str], *, steps: int, batch_size: int, lr: float, seed: int, log, max_seconds: float | None, hard_negatives: bool = True, stop_at_step: int | None = None) -> dict[str, Any]:
    from mmalign.embedded.tiny_clip import preprocess

    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    uniq = sorted(set(caps) | set(negs))
    index = {c: i for i, c in enumerate(uniq)}
    all_ids = tokenizer(uniq)
    L = int((all_ids == tokenizer.eot_token_id).int().argmax(-1).max()) + 1
    all_ids = all_ids[:, :L]
    cap_idx = torch.tensor([index[c] for c in caps])
    neg_idx = torch.tensor([index[c] for c in negs])
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    t0 = time.time()
    run = run_acc = None
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1), final_frac=0.05)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = preprocess(_augment(images[idx].float() / 255, gen), info)
        ci, ni = cap_idx[idx], neg_idx[idx]
        txt_rows = torch.cat([ci, ni]) if hard_negatives else ci
        fi = model.encode_image(x, normalize=True)
        ft = encode_text_prefix(model, all_ids[txt_rows])
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * fi @ ft.T  # B x (B [+ B hard negatives])
        # identical captions in the batch are all positives (multi-positive targets); a hard-negative
        # column whose text equals an image's own caption (e.g. no edit was found) is masked for that image
        same = ci[:, None] == txt_rows[None, :]
        if hard_negatives:
            false_neg = same.clone()
            false_neg[:, :batch_size] = False
            logits = logits.masked_fill(false_neg, -1e4)
            same[:, batch_size:] = False
        same = same.float()
        tgt = same / same.sum(1, keepdim=True)
        loss_i = -(tgt * logits.log_softmax(-1)).sum(-1).mean()
        logits_t = logits[:, :batch_size].T
        same_t = (ci[:, None] == ci[None, :]).float()
        loss_t = -((same_t / same_t.sum(1, keepdim=True)) * logits_t.log_softmax(-1)).sum(-1).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            acc = float((same.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean())
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        run_acc = acc if run_acc is None else 0.98 * run_acc + 0.02 * acc
        done = step + 1
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step:5d}/{steps} loss {run:.3f} batch i2t acc {run_acc:.3f} scale {scale.item():.1f} ({time.time() - t0:.0f}s)")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"clip: time limit reached after {done} of {steps} steps")
            break
        if stop_at_step is not None and done >= stop_at_step:
            log(f"clip: stopping at step {done} of {steps} (--stop-at-step)")
            break
    model.eval()
    return {"steps_done": done, "final_loss_ema": run, "final_batch_acc_ema": run_acc, "train_seconds": time.time() - t0, "context_used": L}


@torch.no_grad()
def evaluate_clip(model, tokenizer, info, *, seed: int, n: int = 600, log=print) -> dict[str, Any]:
    """Retrieval on fresh ShapeWorld pairs of held-out compositions and on fresh train-type pairs.

    - ``heldout_i2t``: image -> its caption among all held-out suite prompts (top-1), for renders of the
      held-out compositions (images whose caption is a held-out prompt);
    - ``pairwise_hard``: matching caption scored above its hard-negative edit;
    - ``i2t`` / ``t2i``: top-1 over the unique captions / images of a fresh batch (identical captions count)."""
    from mmalign.embedded.tiny_clip import preprocess

    sw = _data_api()
    res: dict[str, Any] = {}
    suite = prompt_suite("heldout")
    heldout_prompts = [p for _, p in suite]
    hp_index = {_norm_prompt(p): i for i, p in enumerate(heldout_prompts)}
    # renders of held-out prompts: sample scenes of each category without the exclusion, keep held-out ones
    imgs, caps, cats = [], [], []
    i = 0
    per_cat_need = defaultdict(int)
    while len(imgs) < n and i < 200 * n:
        ex = sw.example_at(i, seed, 32, exclude_heldout=False)
        i += 1
        if _norm_prompt(ex.caption) in hp_index and per_cat_need[ex.category] < n // 4:
            per_cat_need[ex.category] += 1
            imgs.append(ex.image)
            caps.append(ex.caption)
            cats.append(ex.category)
    if imgs:
        x = preprocess(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255, info)
        fi = model.encode_image(x, normalize=True)
        ft = model.encode_text(tokenizer(heldout_prompts), normalize=True)
        pred = (fi @ ft.T).argmax(1)
        target = torch.tensor([hp_index[_norm_prompt(c)] for c in caps])
        correct = (pred == target).float()
        by_cat = defaultdict(list)
        for c, ok in zip(cats, correct.tolist()):
            by_cat[c].append(ok)
        res["heldout_i2t_top1"] = float(correct.mean())
        res["heldout_i2t_top1_by_category"] = {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}
        res["heldout_i2t_n"] = len(imgs)
        res["heldout_i2t_candidates"] = len(heldout_prompts)
        # hard negatives of held-out images (edits may land on train compositions: that is fine here)
        rng = np.random.default_rng([seed, 5])
        wins = []
        for j in range(len(imgs)):
            spec = None
            ex_caps = caps[j]
            # re-parse through the grammar: find a spec whose prompt equals the caption
            spec = _spec_of(ex_caps)
            if spec is None:
                continue
            neg = None
            for _ in range(20):
                cand = _perturb(spec, rng)
                if cand is not None and _norm_prompt(cand.prompt()) != _norm_prompt(ex_caps):
                    neg = cand.prompt()
                    break
            if neg is None:
                continue
            tn = model.encode_text(tokenizer([ex_caps, neg]), normalize=True)
            s = fi[j] @ tn.T
            wins.append(float(s[0] > s[1]))
        res["heldout_pairwise_hard"] = float(np.mean(wins)) if wins else float("nan")
    # fresh train-distribution pairs (new seed), batch retrieval among unique captions
    images, caps2, negs2, cats2 = clip_training_data(min(n, 512), seed + 1, log=log)
    x = preprocess(images.float() / 255, info)
    fi = model.encode_image(x, normalize=True)
    uniq = sorted(set(caps2))
    ft = model.encode_text(tokenizer(uniq), normalize=True)
    pos = torch.tensor([uniq.index(c) for c in caps2])
    res["fresh_i2t_top1"] = float(((fi @ ft.T).argmax(1) == pos).float().mean())
    res["fresh_i2t_candidates"] = len(uniq)
    tn = model.encode_text(tokenizer(negs2), normalize=True)
    tc = ft[pos]
    ok = [(float((fi[k] * tc[k]).sum() > (fi[k] * tn[k]).sum())) for k in range(len(caps2)) if negs2[k] != caps2[k]]
    res["fresh_pairwise_hard"] = float(np.mean(ok))
    log("clip eval: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}))
    return res


def _spec_of(caption: str):
    """The ShapeWorld ``Requirements`` whose canonical prompt is ``caption`` (None if none)."""
    global _SPEC_INDEX
    sw = _data_api()
    if _SPEC_INDEX is None:
        _SPEC_INDEX = {_norm_prompt(r.prompt()): r for cat in sw.CATEGORIES for r in sw.all_specs(cat)}
    return _SPEC_INDEX.get(_norm_prompt(caption))


_SPEC_INDEX = None


def write_clip_card(out: Path, meta: dict[str, Any]) -> None:
    ev = meta.get("eval", {})
    tr = meta.get("training", {})
    cfg = meta["config"]
    lines = [
        "# shapeworld-clip: a tiny open_clip CLIP trained on ShapeWorld",
        "",
        "A plain `open_clip.CLIP` (custom config) trained contrastively from scratch on procedurally generated "
        "ShapeWorld image-caption pairs, with one hard-negative caption per image (a colour / shape / count / "
        "binding / relation edit). It serves as a learned, differentiable reward and as a held-out reward for "
        "the embedded world.",
        "",
        "## Loading",
        "",
        "```python",
        "from mmalign.embedded.tiny_clip import load_shapeworld_clip, preprocess",
        f"model, tokenizer, info = load_shapeworld_clip('{meta.get('out_rel', 'assets/shapeworld-clip')}')",
        "img = model.encode_image(preprocess(images, info), normalize=True)   # images B,3,H,W in [0,1]",
        "txt = model.encode_text(tokenizer(['a red circle']), normalize=True)",
        "# or natively: open_clip.create_model_and_transforms('local-dir:<dir>'), open_clip.get_tokenizer('local-dir:<dir>')",
        "```",
        "",
        "## Architecture",
        "",
        f"- vision: ViT, {cfg['vision_cfg']['image_size']}x{cfg['vision_cfg']['image_size']} input, patch "
        f"{cfg['vision_cfg']['patch_size']}, width {cfg['vision_cfg']['width']}, {cfg['vision_cfg']['layers']} layers",
        f"- text: causal transformer, width {cfg['text_cfg']['width']}, {cfg['text_cfg']['layers']} layers, context "
        f"{cfg['text_cfg']['context_length']}, CLIP BPE with the first {cfg['mmalign_tokenizer']['num_merges']} merges "
        f"(vocabulary {cfg['text_cfg']['vocab_size']})",
        f"- embed dim {cfg['embed_dim']}; {meta['params']:,} parameters; files {meta.get('size_mb', 0):.1f} MB (float16 safetensors)",
        "- preprocessing: resize to 32x32 (bilinear), OpenAI CLIP mean/std",
        "",
        "## Training",
        "",
        "```",
        meta["command"],
        "```",
        "",
        *_replay_lines(meta),
        *_init_lines(meta),
        f"- seed {meta['seed']}; {meta['num_train']} fresh ShapeWorld pairs (`exclude_heldout=True`; no held-out "
        "composition or prompt, not even as a negative)",
        f"- {tr.get('steps_done')} steps (schedule of {meta.get('args', {}).get('steps', tr.get('steps_done'))}) of batch {meta['batch_size']}, AdamW lr {meta['lr']:g}, cosine; symmetric "
        f"InfoNCE (identical captions are co-positives) + hard negatives; final loss {tr.get('final_loss_ema', float('nan')):.3f}, "
        f"in-batch image->text accuracy {tr.get('final_batch_acc_ema', float('nan')):.3f}",
        f"- wall time {_fmt_minutes(meta.get('total_seconds', 0))} (training {_fmt_minutes(tr.get('train_seconds', 0))}) on {meta.get('env', '')}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    names = {
        "heldout_i2t_top1": "held-out renders: image -> its prompt among all held-out prompts, top-1",
        "heldout_pairwise_hard": "held-out renders: own prompt > hard-negative edit",
        "fresh_i2t_top1": "fresh train-type renders: image -> caption among the batch's unique captions, top-1",
        "fresh_pairwise_hard": "fresh train-type renders: own caption > hard-negative edit",
    }
    for k, label in names.items():
        if k in ev:
            lines.append(f"| {label} | {ev[k]:.3f} |")
    if "heldout_i2t_top1_by_category" in ev:
        lines += ["", "Held-out image -> prompt top-1 by category: " + ", ".join(f"{c} {v:.3f}" for c, v in ev["heldout_i2t_top1_by_category"].items())]
    if "heldout_i2t_candidates" in ev:
        lines += [f"({ev['heldout_i2t_n']} held-out renders, {ev['heldout_i2t_candidates']} candidate prompts; "
                  f"fresh: {ev.get('fresh_i2t_candidates')} candidate captions.)"]
    lines.append("")
    lines += _notes_lines(meta)
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def run_clip(args) -> dict[str, Any]:
    from mmalign.embedded.tiny_clip import build_tiny_clip, preprocess_cfg, save_shapeworld_clip, shapeworld_clip_tokenizer, tiny_clip_config

    log = Logger(args.quiet)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    t_start = time.time()
    config = tiny_clip_config(num_merges=args.num_merges, context_length=args.context_length, patch_size=args.patch_size,
                              width=args.width, layers=args.layers, heads=args.heads, embed_dim=args.embed_dim,
                              text_width=args.text_width, text_layers=args.text_layers)
    model = build_tiny_clip(config, seed=args.seed)
    tokenizer = shapeworld_clip_tokenizer(args.num_merges, args.context_length)
    info = preprocess_cfg(config["vision_cfg"]["image_size"])
    params = _param_count(model)
    log(f"tiny CLIP: {params:,} parameters; generating {args.num_train} pairs with hard negatives (seed {args.seed})")
    images, caps, negs, _ = clip_training_data(args.num_train, args.seed, log=log)
    log(f"{len(caps)} pairs, {len(set(caps))} unique captions")
    tr = train_clip(model, tokenizer, info, images, caps, negs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed + 1, log=log, max_seconds=args.max_minutes * 60 - (time.time() - t_start),
                    hard_negatives=not args.no_hard_negatives, stop_at_step=args.stop_at_step)
    save_shapeworld_clip(model, config, tokenizer, out)
    total = time.time() - t_start
    try:
        out_rel = str(out.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        out_rel = str(out)
    meta = {
        "command": _command(args),
        "replay_command": _replay_command(args, tr),
        "args": _resolved_args(args),
        "seed": args.seed, "config": config, "params": params, "num_train": len(caps), "batch_size": args.batch_size,
        "lr": args.lr, "training": tr, "total_seconds": total, "env": _env_line(), "out_rel": out_rel,
        "size_mb": _dir_size(out) / 2**20,
    }
    log(f"saved tiny CLIP to {out} ({meta['size_mb']:.1f} MB); wall time {_fmt_minutes(total)}")
    if args.eval_n:
        meta["eval"] = eval_clip_dir(out, args, log=log)
    (out / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_clip_card(out, meta)
    log(f"wrote {out / 'MODEL_CARD.md'}")
    return meta


def eval_clip_dir(path: Path, args, log=print) -> dict[str, Any]:
    from mmalign.embedded.tiny_clip import load_shapeworld_clip

    torch.set_num_threads(args.threads)
    model, tokenizer, info = load_shapeworld_clip(path)
    return evaluate_clip(model, tokenizer, info, seed=args.eval_seed, n=args.eval_n, log=log)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmalign.embedded.pretrain", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{sd3,clip,eval-sd3,eval-clip}")

    def common(sp, out_required: bool = True):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
        sp.add_argument("--quiet", action="store_true")

    def sd3_eval_opts(sp):
        sp.add_argument("--eval-prompts", type=int, default=-1, help="prompts per suite to evaluate (-1: all, 0: skip eval)")
        sp.add_argument("--eval-samples", type=int, default=2, help="samples per prompt")
        sp.add_argument("--eval-steps", type=int, default=16)
        sp.add_argument("--eval-guidance", type=float, default=4.0)
        sp.add_argument("--eval-seed", type=int, default=1234)

    s = sub.add_parser("sd3", help="pretrain the tiny SD3 pipeline")
    s.add_argument("--out", required=True, help="output directory (save_pretrained)")
    common(s)
    s.add_argument("--num-train", type=int, default=40000, help="training pairs to generate")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--heads", type=int, default=6)
    s.add_argument("--head-dim", type=int, default=16)
    s.add_argument("--vae-channels", type=int, nargs=2, default=[16, 32])
    s.add_argument("--vae-groups", type=int, default=4)
    s.add_argument("--text-layers", type=int, default=2)
    s.add_argument("--num-merges", type=int, default=8000)
    s.add_argument("--context-length", type=int, default=32)
    s.add_argument("--shift", type=float, default=3.0, help="scheduler shift saved with the pipeline")
    s.add_argument("--vae-steps", type=int, default=1500)
    s.add_argument("--vae-batch-size", type=int, default=64)
    s.add_argument("--vae-lr", type=float, default=2e-3)
    s.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-element KL")
    s.add_argument("--vae-max-minutes", type=float, default=5.0)
    s.add_argument("--vae-stop-at-step", type=int, default=None,
                   help="stop the VAE after this many steps (schedule still spans --vae-steps): replays a time-capped run")
    s.add_argument("--steps", type=int, default=8000, help="transformer steps")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=4e-4)
    s.add_argument("--text-lr", type=float, default=2e-4)
    s.add_argument("--cfg-dropout", type=float, default=0.1)
    s.add_argument("--ema-decay", type=float, default=0.999)
    s.add_argument("--t5-tokens", type=int, default=1,
                   help="zero T5 tokens the pipeline feeds (its max_sequence_length; 1 is 4x cheaper than the pipeline default 256)")
    s.add_argument("--init-from", default=None,
                   help="continue training a directory written by `pretrain sd3` (keeps its VAE; new schedule, new data from --seed)")
    s.add_argument("--max-minutes", type=float, default=45.0, help="stop training early past this wall time (VAE included)")
    s.add_argument("--stop-at-step", type=int, default=None, help="stop the transformer after this many steps (schedule still spans --steps): replays a time-capped run")
    sd3_eval_opts(s)

    c = sub.add_parser("clip", help="pretrain the tiny open_clip CLIP")
    c.add_argument("--out", required=True, help="output directory")
    common(c)
    c.add_argument("--num-train", type=int, default=40000)
    c.add_argument("--num-merges", type=int, default=8000)
    c.add_argument("--context-length", type=int, default=32)
    c.add_argument("--patch-size", type=int, default=4)
    c.add_argument("--width", type=int, default=128)
    c.add_argument("--layers", type=int, default=4, help="vision transformer layers")
    c.add_argument("--text-width", type=int, default=None, help="text transformer width (default: --width)")
    c.add_argument("--text-layers", type=int, default=3)
    c.add_argument("--heads", type=int, default=4)
    c.add_argument("--embed-dim", type=int, default=128)
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--no-hard-negatives", action="store_true")
    c.add_argument("--max-minutes", type=float, default=10.0, help="stop training early past this wall time")
    c.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps (schedule still spans --steps): replays a time-capped run")
    c.add_argument("--eval-n", type=int, default=600, help="held-out pairs to evaluate (0: skip)")
    c.add_argument("--eval-seed", type=int, default=4321)

    e = sub.add_parser("eval-sd3", help="measure ShapeEval of a pretrained SD3 directory; rewrite its card")
    e.add_argument("--model", required=True)
    common(e)
    sd3_eval_opts(e)

    ec = sub.add_parser("eval-clip", help="measure retrieval of a pretrained CLIP directory; rewrite its card")
    ec.add_argument("--model", required=True)
    common(ec)
    ec.add_argument("--eval-n", type=int, default=600)
    ec.add_argument("--eval-seed", type=int, default=4321)
    return p


def _check(args, parser) -> None:
    positive = ["steps", "batch_size", "num_train", "threads"]
    if args.command == "sd3":
        positive += ["vae_steps", "vae_batch_size", "layers", "heads", "head_dim", "t5_tokens"]
        if args.image_size % 4:
            parser.error(f"--image-size must be a multiple of 4 (VAE factor 2 x patch 2), got {args.image_size}")
        if not 0 <= args.cfg_dropout < 1:
            parser.error(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    for name in positive:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.command in ("sd3", "clip"):
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"--out {out} exists and is not a directory")
    if args.command == "sd3" and args.init_from and not Path(args.init_from).is_dir():
        parser.error(f"--init-from {args.init_from} is not a directory")
    if args.command in ("eval-sd3", "eval-clip") and not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is not a directory")


def main(argv: Sequence[str] | None = None) -> int:
    for k, v in HF_ENV.items():
        os.environ.setdefault(k, v)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    _check(args, parser)
    try:
        if args.command == "sd3":
            run_sd3(args)
        elif args.command == "clip":
            run_clip(args)
        elif args.command == "eval-sd3":
            eval_sd3_dir(Path(args.model), args, log=Logger(args.quiet))
        elif args.command == "eval-clip":
            path = Path(args.model)
            mfile = path / "metrics.json"
            meta = json.loads(mfile.read_text()) if mfile.is_file() else None
            ev = eval_clip_dir(path, args, log=Logger(args.quiet))
            if meta is not None:
                meta["eval"] = ev
                mfile.write_text(json.dumps(meta, indent=2) + "\n")
                write_clip_card(path, meta)
    except PretrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
