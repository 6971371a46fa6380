"""Pretrain the embedded world's tiny text-to-video model (a real diffusers ``WanPipeline``) on
MovingShapes, on a CPU, reproducibly (seeded).

    python -m mmalign.embedded.pretrain_video wan  --out assets/movingshapes-wan --seed 0 --threads 1 --max-minutes 22
    python -m mmalign.embedded.pretrain_video eval --model assets/movingshapes-wan     (re-measure, rewrite card)

``wan`` builds a tiny ``WanPipeline`` (``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``,
a word-level T5 tokenizer over the MovingShapes vocabulary, ``FlowMatchEulerDiscreteScheduler``) for
clips of 9 frames of 32 x 32, then, like :mod:`mmalign.embedded.pretrain` does for SD3:

1. trains the VAE (L1 + MSE reconstruction, small KL) on 5-frame windows of the clips and sets
   ``latents_mean`` / ``latents_std`` per channel from the latents' statistics;
2. freezes it, encodes the training clips once and trains the transformer and the text encoder with
   the rectified-flow loss (x_t = (1 - t) x0 + t eps, target eps - x0 as Wan predicts it, logit-normal t
   with 20% uniform, prompt dropped to "" 10% of the time for classifier-free guidance), AdamW + EMA;
3. saves the pipeline (``save_pretrained``; transformer and VAE float16), ``mmalign_adapter.json``
   (size, frames, fps and the 16-token text length, so ``mmalign.load_model`` runs it as trained), then
   measures MotionEval on the held-out (and train) prompt suites with the saved pipeline's own
   ``__call__`` and writes ``metrics.json``, ``MODEL_CARD.md`` and sample GIF / MP4 files.

The VAE compresses 4x in space and 2x in time (a 9-frame clip is 5 latent frames of 8 x 8 x 8), the
transformer patchifies 1 x 2 x 2 (80 tokens). Training clips come from ``exclude_heldout=True``: no
held-out composition (hence no held-out prompt) is ever seen. ``--max-minutes`` caps the whole run
(VAE included); the learning-rate schedule always spans ``--steps``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.base import ADAPTER_OPTIONS_FILE
from .pretrain import EMA, HF_ENV, Logger, PretrainError, _dir_size, _env_line, _fmt_minutes, _lr_at, _param_count, seed_everything

VOCAB_WORDS: tuple[str, ...] = (
    "a", "an", "and", "circle", "square", "triangle", "red", "green", "blue", "yellow", "purple", "white",
    "moving", "left", "right", "up", "down", "bouncing", "appearing", "disappearing", "standing", "still", "turning",
)
FPS = 8


@dataclass
class WanArch:
    """Sizes of the tiny Wan (see the module docstring)."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 24
    ffn_dim: int = 256
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    z_dim: int = 8
    text_dim: int = 48
    text_layers: int = 2
    text_heads: int = 4
    max_sequence_length: int = 16
    shift: float = 3.0
    frames: int = 9
    size: int = 32


# ---------------------------------------------------------------------------------------------- building
def build_tokenizer(directory: str | os.PathLike, max_length: int = 16):
    """A word-level T5 tokenizer (Unigram over whole words: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) saved to
    ``directory`` and loaded back as ``T5Tokenizer`` (the object the saved pipeline will hold)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in VOCAB_WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    T5Tokenizer(tokenizer_object=tok, extra_ids=0, model_max_length=max_length).save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def build_wan_pipeline(seed: int, arch: WanArch, tokenizer):
    """A randomly initialised tiny ``WanPipeline`` of ``arch``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    levels = len(arch.vae_dim_mult) - 1
    tdown = [False] * (levels - 1) + [True]  # 2x in time at the last level
    vae = AutoencoderKLWan(
        base_dim=arch.vae_base_dim, z_dim=arch.z_dim, dim_mult=list(arch.vae_dim_mult), num_res_blocks=1,
        temperal_downsample=tdown, latents_mean=[0.0] * arch.z_dim, latents_std=[1.0] * arch.z_dim,
        scale_factor_spatial=2**levels, scale_factor_temporal=2,
    )
    torch.manual_seed(seed + 1)
    te = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=arch.text_dim, d_kv=arch.text_dim // arch.text_heads, d_ff=2 * arch.text_dim,
        num_layers=arch.text_layers, num_heads=arch.text_heads, relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed + 2)
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=arch.heads, attention_head_dim=arch.head_dim, in_channels=arch.z_dim,
        out_channels=arch.z_dim, text_dim=arch.text_dim, freq_dim=64, ffn_dim=arch.ffn_dim, num_layers=arch.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    sched = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae, transformer=dit, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_text(pipe, prompts: Sequence[str], max_length: int) -> Tensor:
    """``WanPipeline._get_t5_prompt_embeds`` with gradients: B, L, D embeddings, zero past each prompt."""
    inputs = pipe.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = inputs.input_ids, inputs.attention_mask
    hidden = pipe.text_encoder(ids, mask).last_hidden_state
    return hidden * (torch.arange(max_length)[None, :] < mask.sum(1, keepdim=True)).unsqueeze(-1).to(hidden.dtype)


# ---------------------------------------------------------------------------------------------- data
def training_clips(n: int, seed: int, arch: WanArch, log=print) -> tuple[Tensor, list[str], list[str]]:
    """``n`` MovingShapes clips (uint8 N, 3, T, H, W: the VAE's layout), held-out compositions excluded;
    captions equal to a held-out prompt are dropped too (an explicit second guard)."""
    from . import movingshapes as ms

    heldout = {" ".join(p.split()) for _, p in ms.prompt_suite("heldout")}
    vids, caps, cats = [], [], []
    for i in range(n):
        clip = ms.clip_at(i, seed, arch.size, arch.frames, exclude_heldout=True)
        if clip.caption in heldout:
            continue
        vids.append(clip.video)
        caps.append(clip.caption)
        cats.append(clip.category)
    if len(caps) < n:
        log(f"dropped {n - len(caps)} clips whose caption is a held-out prompt")
    videos = torch.from_numpy(np.stack(vids)).permute(0, 4, 1, 2, 3).contiguous()  # N, 3, T, H, W uint8
    return videos, caps, cats


def _to_unit(x_u8: Tensor) -> Tensor:
    return x_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- VAE
def decode_unclamped(vae, z: Tensor) -> Tensor:
    """``AutoencoderKLWan.decode`` (frame by frame with the causal cache) without its final clamp to
    [-1, 1]: B, C, F', h, w -> B, 3, T, H, W. Training through the clamp gets no gradient on pixels
    predicted past -1, so object pixels once predicted as black background would never recover."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        kwargs = {"first_chunk": True} if i == 0 else {}
        outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs))
    vae.clear_cache()
    return torch.cat(outs, 2)


def train_vae(vae, videos_u8: Tensor, *, steps: int, batch_size: int, window: int, lr: float, kl_weight: float, seed: int, log,
              max_seconds: float | None, fg_weight: float = 4.0, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train the AutoencoderKLWan on random ``window``-frame windows: L1 + MSE in [-1, 1] with object
    pixels weighted ``fg_weight`` x, + kl_weight * KL per latent element."""
    vae.train()
    with torch.no_grad():  # start with a small posterior std (log-variance bias -6): a unit-variance start
        z_dim = vae.config.z_dim  # drowns the untrained encoder's signal and the decoder learns to ignore it
        vae.quant_conv.bias[z_dim:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    n, T = videos_u8.shape[0], videos_u8.shape[2]
    starts = list(range(0, T - window + 1, 2))
    t0 = time.time()
    run = run_kl = None
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        s = starts[int(torch.randint(0, len(starts), (1,), generator=gen))]
        x = _to_unit(videos_u8[idx, :, s : s + window])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = decode_unclamped(vae, z)
        # objects cover ~6% of a frame: weight their pixels (and a 1-px ring) fg_weight x, or the
        # decoder settles on the black background for hundreds of steps
        fg = (x.amax(1, keepdim=True) > -0.9).float()
        fg = F.max_pool3d(fg, (1, 3, 3), stride=1, padding=(0, 1, 1))
        w = 1 + (fg_weight - 1) * fg
        err = (rec - x).abs()
        rec_loss = ((err + err**2) * w).mean() / w.mean()
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run = rec_loss.item() if run is None else 0.95 * run + 0.05 * rec_loss.item()
        run_kl = kl.item() if run_kl is None else 0.95 * run_kl + 0.05 * kl.item()
        done = step + 1
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step:4d}/{steps} rec {run:.4f} kl/elem {run_kl:.3f} ({time.time() - t0:.0f}s)")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"vae: time limit reached after {done} of {steps} steps")
            break
        if stop_at_step is not None and done >= stop_at_step:
            log(f"vae: stopping at step {done} of {steps} (--vae-stop-at-step)")
            break
    vae.eval()
    return {"vae_steps": done, "vae_rec_loss": run, "vae_kl_per_elem": run_kl, "vae_seconds": time.time() - t0}


@torch.no_grad()
def encode_latents(vae, videos_u8: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every clip (float16, N, C, F', h, w)."""
    means, stds = [], []
    for i in range(0, videos_u8.shape[0], batch_size):
        post = vae.encode(_to_unit(videos_u8[i : i + batch_size])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae, videos_u8: Tensor) -> float:
    x = videos_u8.float() / 255
    rec = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    return float(10 * math.log10(1.0 / max(F.mse_loss(rec, x).item(), 1e-10)))


# ---------------------------------------------------------------------------------------------- transformer
def train_transformer(pipe, lat_mean: Tensor, lat_std: Tensor, captions: list[str], *, steps: int, batch_size: int, lr: float,
                      text_lr: float, cfg_dropout: float, ema_decay: float, max_length: int, seed: int, log,
                      max_seconds: float | None, stop_at_step: int | None = None) -> dict[str, Any]:
    """Rectified-flow training of the transformer + text encoder on normalised latents; leaves EMA weights in place."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    modules = [pipe.transformer, pipe.text_encoder]
    for m in modules:
        m.train()
    groups = [
        {"params": list(pipe.transformer.parameters()), "lr": lr, "base_lr": lr},
        {"params": list(pipe.text_encoder.parameters()), "lr": text_lr, "base_lr": text_lr},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA([p for m in modules for p in m.parameters()], ema_decay)
    gen = torch.Generator().manual_seed(seed)
    n = lat_mean.shape[0]
    t0 = time.time()
    run = None
    done = 0
    history = []
    warmup = min(200, steps // 10 + 1)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, g["base_lr"], warmup=warmup)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        z = lat_mean[idx].float() + lat_std[idx].float() * torch.randn(lat_mean[idx].shape, generator=gen)
        x0 = (z - mean) / std
        drop = (torch.rand(batch_size, generator=gen) < cfg_dropout).tolist()
        texts = ["" if d else captions[int(i)] for d, i in zip(drop, idx)]
        # t: logit-normal(0, 1) (SD3, Esser et al. 2024, arXiv 2403.03206) with 20% uniform
        t = torch.sigmoid(torch.randn(batch_size, generator=gen))
        uni = torch.rand(batch_size, generator=gen) < 0.2
        t = torch.where(uni, torch.rand(batch_size, generator=gen), t).clamp(1e-4, 1 - 1e-4)
        noise = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise  # rectified flow (Liu et al. 2022, arXiv 2209.03003)
        emb = encode_text(pipe, texts, max_length)
        pred = pipe.transformer(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=emb, return_dict=False)[0]
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
            log(f"wan step {step:5d}/{steps} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} ({el:.0f}s, eta {el / done * (steps - done):.0f}s)")
            history.append((done, round(run, 5)))
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"wan: time limit reached after {done} of {steps} steps")
            break
        if stop_at_step is not None and done >= stop_at_step:
            log(f"wan: stopping at step {done} of {steps} (--stop-at-step)")
            break
    ema.copy_to_params()
    for m in modules:
        m.eval()
    return {"steps_done": done, "final_loss_ema": run, "train_seconds": time.time() - t0, "loss_history": history}


# ---------------------------------------------------------------------------------------------- save / load
def save_wan_pipeline(pipe, out: Path, arch: WanArch) -> None:
    """``save_pretrained`` (transformer and VAE float16, the small text encoder float32) and the adapter
    options ``mmalign.load_model`` reads."""
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
    options = {"height": arch.size, "width": arch.size, "num_frames": arch.frames, "max_sequence_length": arch.max_sequence_length, "fps": FPS}
    (out / ADAPTER_OPTIONS_FILE).write_text(json.dumps({"adapter_kwargs": options}, indent=2) + "\n")


def load_wan_dir(path: str | os.PathLike):
    """The saved pipeline in float32 (weights stored float16), progress bar off."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sample_videos(pipe, prompts: Sequence[str], *, arch_kwargs: dict[str, Any], steps: int, guidance: float, seed: int, batch_size: int = 32) -> Tensor:
    """Videos ``N, T, 3, H, W`` in [0, 1] from the pipeline's own ``__call__``; row i seeded with seed + i."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt", height=arch_kwargs["height"], width=arch_kwargs["width"], num_frames=arch_kwargs["num_frames"],
                   max_sequence_length=arch_kwargs["max_sequence_length"])
        out.append(res.frames.float().cpu())
    return torch.cat(out)


def motioneval_table(videos: Tensor, prompts: Sequence[str], categories: Sequence[str]) -> dict[str, Any]:
    """Per-category and overall strict accuracy and clause credit (plus identity / action / temporal)."""
    from .motioneval import evaluate

    per: dict[str, list[dict[str, float]]] = defaultdict(list)
    for vid, prompt, cat in zip(videos, prompts, categories):
        r = evaluate(vid, prompt)
        per[cat].append({"strict": float(r.strict), "credit": float(r.score), **r.kind_scores()})
    keys = ("strict", "credit", "identity", "action", "temporal")
    table: dict[str, Any] = {c: {"n": len(v), **{k: float(np.nanmean([x[k] for x in v])) for k in keys}} for c, v in sorted(per.items())}
    allv = [x for v in per.values() for x in v]
    cats = [table[c] for c in sorted(per)]
    table["overall"] = {"n": len(allv), **{k: float(np.nanmean([x[k] for x in allv])) for k in keys},
                        "strict_mean_over_categories": float(np.mean([t["strict"] for t in cats])),
                        "credit_mean_over_categories": float(np.mean([t["credit"] for t in cats]))}
    return table


def evaluate_wan(pipe, arch_kwargs: dict[str, Any], *, split: str, samples_per_prompt: int, steps: int, guidance: float, seed: int,
                 max_prompts: int | None = None, log=print) -> dict[str, Any]:
    from .movingshapes import prompt_suite

    suite = prompt_suite(split)
    if max_prompts is not None:
        suite = suite[:max_prompts]
    cats = [c for c, _ in suite for _ in range(samples_per_prompt)]
    prompts = [p for _, p in suite for _ in range(samples_per_prompt)]
    t0 = time.time()
    videos = sample_videos(pipe, prompts, arch_kwargs=arch_kwargs, steps=steps, guidance=guidance, seed=seed)
    table = motioneval_table(videos, prompts, cats)
    log(f"motioneval[{split}] {len(suite)} prompts x {samples_per_prompt}, {steps} steps, cfg {guidance}: strict "
        f"{table['overall']['strict']:.3f} credit {table['overall']['credit']:.3f} ({time.time() - t0:.0f}s)")
    return {"split": split, "prompts": len(suite), "samples_per_prompt": samples_per_prompt, "steps": steps, "guidance": guidance,
            "seed": seed, "table": table, "videos": videos, "prompt_list": prompts, "categories": cats}


def save_samples(videos: Tensor, prompts: Sequence[str], categories: Sequence[str], out: Path, per_category: int = 2) -> list[str]:
    """A few held-out samples per category as GIF and MP4 (upscaled 4x) plus a frame-strip PNG; returns their names."""
    from ..media import save_video_gif, save_video_mp4

    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for old in sample_dir.iterdir():
        old.unlink()
    names, seen = [], defaultdict(int)
    strips = []
    for vid, prompt, cat in zip(videos, prompts, categories):
        if seen[cat] >= per_category:
            continue
        seen[cat] += 1
        stem = f"{cat}_{seen[cat]}_" + "_".join(prompt.split())[:60]
        save_video_gif(vid, sample_dir / f"{stem}.gif", fps=FPS, upscale=4)
        save_video_mp4(vid, sample_dir / f"{stem}.mp4", fps=FPS, upscale=4)
        names.append(stem)
        strips.append(vid)
    if strips:
        from .pretrain import save_grid

        frames = torch.stack(strips)  # K, T, 3, H, W -> one row per clip
        save_grid(frames.reshape(-1, *frames.shape[2:]), out / "samples_heldout.png", ncol=frames.shape[1], scale=2)
    return names


# ---------------------------------------------------------------------------------------------- model card
def _table_md(table: dict[str, Any]) -> str:
    lines = ["| category | n | strict | clause credit | identity | action | temporal |", "|---|---:|---:|---:|---:|---:|---:|"]
    for cat, row in table.items():
        lines.append(f"| {cat} | {row['n']} | {row['strict']:.3f} | {row['credit']:.3f} | {row['identity']:.3f} | {row['action']:.3f} | {row['temporal']:.3f} |")
    ov = table.get("overall", {})
    if "strict_mean_over_categories" in ov:
        lines.append(f"| mean over categories | | {ov['strict_mean_over_categories']:.3f} | {ov['credit_mean_over_categories']:.3f} | | | |")
    return "\n".join(lines)


def write_card(out: Path, meta: dict[str, Any]) -> None:
    a = meta["arch"]
    tr = meta.get("training", {})
    ev = meta.get("eval", {})
    rel = meta.get("out_rel", "assets/movingshapes-wan")
    parts = [
        "# movingshapes-wan: a tiny Wan 2.1 text-to-video pipeline pretrained on MovingShapes",
        "",
        "A real diffusers `WanPipeline` (`WanTransformer3DModel`, `AutoencoderKLWan`, `UMT5EncoderModel`, a word-level T5 "
        "tokenizer, `FlowMatchEulerDiscreteScheduler`) trained from scratch on one CPU thread on procedurally generated "
        f"MovingShapes clips ({a['frames']} frames of {a['size']}x{a['size']}: ShapeWorld shapes that move, bounce, appear, "
        "disappear or change colour). Deliberately small and briefly trained: the measured MotionEval scores below say what "
        "it can and cannot do; alignment has room to improve it.",
        "",
        "## Loading",
        "",
        "```python",
        "import torch",
        "from diffusers import WanPipeline",
        f"pipe = WanPipeline.from_pretrained('{rel}')",
        f"video = pipe('a red circle moving left', height={a['size']}, width={a['size']}, num_frames={a['frames']}, "
        f"max_sequence_length={a['max_sequence_length']},",
        "             num_inference_steps=16, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type='pt').frames",
        f"# 1,{a['frames']},3,{a['size']},{a['size']} in [0, 1]",
        "",
        "import mmalign",
        f"adapter = mmalign.load_model('{rel}')   # size, frames, fps and text length from {ADAPTER_OPTIONS_FILE}",
        "```",
        "",
        "Prompts are lowercase MovingShapes captions (the tokenizer knows only their words; anything else is `<unk>`).",
        "",
        "## Architecture",
        "",
        f"- transformer: WanTransformer3DModel, {a['layers']} blocks, {a['heads']} heads x {a['head_dim']} (width {a['heads'] * a['head_dim']}), "
        f"FFN {a['ffn_dim']}, patch 1x2x2 on {a['z_dim']}x5x8x8 latents (80 tokens); {meta['params']['transformer']:,} parameters",
        f"- VAE: AutoencoderKLWan, base dim {a['vae_base_dim']}, dim_mult {tuple(a['vae_dim_mult'])}, z_dim {a['z_dim']}, 4x spatial and 2x temporal "
        f"compression (`scale_factor_spatial=4`, `scale_factor_temporal=2`: frames must be 2k+1); {meta['params']['vae']:,} parameters; "
        f"held-out reconstruction PSNR {meta.get('vae_psnr', float('nan')):.1f} dB",
        f"- text encoder: UMT5EncoderModel (d_model {a['text_dim']}, {a['text_layers']} layers), word-level tokenizer of {len(VOCAB_WORDS)} words, "
        f"{a['max_sequence_length']} tokens; {meta['params']['text_encoder']:,} parameters (trained jointly with the transformer)",
        f"- scheduler: FlowMatchEulerDiscreteScheduler, shift {a['shift']}; files {meta.get('size_mb', 0):.1f} MB "
        "(safetensors; transformer and VAE float16, text encoder float32)",
        "",
        "## Training",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
    if meta.get("replay_command"):
        parts += ["The run hit its wall-time limit; this replays it step for step (same schedule and stopping point):", "", "```", meta["replay_command"], "```", ""]
    parts += [
        f"- seed {meta['seed']}; {meta['num_train']} MovingShapes clips (`clip_at(i, seed, exclude_heldout=True)`: no held-out composition or prompt is seen)",
        f"- VAE: {tr.get('vae_steps')} steps of batch {meta['args']['vae_batch_size']} ({meta['args']['vae_window']}-frame windows), L1 + MSE "
        f"(object pixels x{meta['args']['fg_weight']:g}, unclamped decoder output) + {meta['args']['kl_weight']:g} x KL; {_fmt_minutes(tr.get('vae_seconds', 0))}",
        f"- transformer + text encoder: {tr.get('steps_done')} steps (schedule of {meta['args']['steps']}) of batch {meta['args']['batch_size']}, "
        f"rectified flow (logit-normal t, 20% uniform), AdamW lr {meta['args']['lr']:g} (text {meta['args']['text_lr']:g}), cosine, EMA "
        f"{meta['args']['ema_decay']}, prompt dropout {meta['args']['cfg_dropout']}; final loss (running mean) {tr.get('final_loss_ema', float('nan')):.4f}; "
        f"{_fmt_minutes(tr.get('train_seconds', 0))}",
        f"- training wall time {_fmt_minutes(meta.get('total_seconds', 0))} (data, VAE, latents, transformer; cap `--max-minutes "
        f"{meta['args']['max_minutes']:g}`) on {meta.get('env', '')}",
        "",
    ]
    for key, title in (("heldout", "held-out"), ("train", "train")):
        if key in ev:
            e = ev[key]
            parts += [
                f"## MotionEval on the {title} prompt suite",
                "",
                f"{e['prompts']} prompts x {e['samples_per_prompt']} samples, {e['steps']} Euler steps, guidance {e['guidance']}, seeds "
                f"{e['seed']}+i, sampled with the saved pipeline's `__call__` (`python -m mmalign.embedded.pretrain_video eval --model <dir>` "
                "re-measures; took " + _fmt_minutes(e.get("seconds", 0)) + ").",
                "",
                _table_md(e["table"]),
                "",
            ]
    if "reference" in ev:
        parts += [f"Reference (MotionEval on rendered MovingShapes clips of every category): strict {ev['reference']['strict']:.3f}, "
                  f"credit {ev['reference']['credit']:.3f}.", ""]
    parts += ["`samples/`: held-out samples per category as GIF and MP4 (4x upscaled, 8 fps); `samples_heldout.png`: their frames, one row per clip.", ""]
    notes = meta.get("notes") or []
    if notes:
        parts += ["## Notes and limitations", "", *[f"- {n}" for n in notes], ""]
    (out / "MODEL_CARD.md").write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------- commands
def _command(args) -> str:
    return "python -m mmalign.embedded.pretrain_video " + " ".join(shlex.quote(a) for a in args.argv)


def _adapter_kwargs(path: Path) -> dict[str, Any]:
    return json.loads((path / ADAPTER_OPTIONS_FILE).read_text())["adapter_kwargs"]


def run_wan(args) -> dict[str, Any]:
    log = Logger(args.quiet)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    t_start = time.time()
    arch = WanArch(layers=args.layers, heads=args.heads, head_dim=args.head_dim, ffn_dim=args.ffn_dim, vae_base_dim=args.vae_base_dim,
                   z_dim=args.z_dim, text_dim=args.text_dim, shift=args.shift)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, arch.max_sequence_length)
    pipe = build_wan_pipeline(args.seed, arch, tokenizer)
    params = {"transformer": _param_count(pipe.transformer), "vae": _param_count(pipe.vae), "text_encoder": _param_count(pipe.text_encoder)}
    log(f"tiny Wan {asdict(arch)}; parameters {params}")
    log(f"generating {args.num_train} MovingShapes clips (seed {args.seed})")
    videos, captions, _ = training_clips(args.num_train, args.seed, arch, log=log)
    val, _, _ = training_clips(min(64, args.num_train), args.seed + 7919, arch, log=log)
    log(f"{len(captions)} clips, {len(set(captions))} distinct captions ({time.time() - t_start:.0f}s)")

    budget = args.max_minutes * 60
    stats = train_vae(pipe.vae, videos, steps=args.vae_steps, batch_size=args.vae_batch_size, window=args.vae_window, lr=args.vae_lr,
                      kl_weight=args.kl_weight, fg_weight=args.fg_weight, stop_at_step=args.vae_stop_at_step, seed=args.seed + 1, log=log, max_seconds=min(args.vae_max_minutes * 60, budget - (time.time() - t_start)))
    psnr = vae_psnr(pipe.vae, val)
    log(f"vae: held-out reconstruction PSNR {psnr:.2f} dB")
    pipe.vae.requires_grad_(False)
    t_enc = time.time()
    lat_mean, lat_std = encode_latents(pipe.vae, videos)
    ch_mean = lat_mean.float().mean((0, 2, 3, 4))
    # std of the sampled latents (spread of the means plus the posterior variance)
    ch_std = (lat_mean.float().var((0, 2, 3, 4)) + lat_std.float().pow(2).mean((0, 2, 3, 4))).sqrt().clamp_min(1e-3)
    pipe.vae.register_to_config(latents_mean=[round(float(v), 5) for v in ch_mean], latents_std=[round(float(v), 5) for v in ch_std])
    log(f"latents {tuple(lat_mean.shape)} encoded in {time.time() - t_enc:.0f}s; per-channel mean {[round(float(v), 2) for v in ch_mean]} "
        f"std {[round(float(v), 2) for v in ch_std]} (posterior std mean {float(lat_std.float().mean()):.3f})")

    tr = train_transformer(pipe, lat_mean, lat_std, captions, steps=args.steps, batch_size=args.batch_size, lr=args.lr, text_lr=args.text_lr,
                           cfg_dropout=args.cfg_dropout, ema_decay=args.ema_decay, max_length=arch.max_sequence_length, seed=args.seed + 2,
                           log=log, max_seconds=max(budget - (time.time() - t_start), 1.0), stop_at_step=args.stop_at_step)
    stats.update(tr)
    save_wan_pipeline(pipe, out, arch)
    total = time.time() - t_start
    try:
        out_rel = str(out.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        out_rel = str(out)
    replay = None
    if (tr["steps_done"] < args.steps and args.stop_at_step is None) or (stats["vae_steps"] < args.vae_steps and args.vae_stop_at_step is None):
        replay = _command(args) + (f" --stop-at-step {tr['steps_done']} --vae-stop-at-step {stats['vae_steps']}"
                                   " --vae-max-minutes 100000 --max-minutes 100000")
    meta: dict[str, Any] = {
        "command": _command(args), "replay_command": replay, "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "seed": args.seed, "arch": asdict(arch), "params": params, "num_train": len(captions), "vae_psnr": psnr,
        "training": stats, "total_seconds": total, "env": _env_line(), "out_rel": out_rel, "size_mb": _dir_size(out) / 2**20,
    }
    log(f"saved pipeline to {out} ({meta['size_mb']:.1f} MB); training wall time {_fmt_minutes(total)}")
    (out / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.eval_samples > 0:
        meta = eval_dir(out, args, meta=meta, log=log)
    write_card(out, meta)
    log(f"wrote {out / 'MODEL_CARD.md'}")
    return meta


def eval_dir(path: Path, args, meta: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Measure MotionEval of the saved pipeline on the held-out and train suites; update metrics.json and the card."""
    torch.set_num_threads(args.threads)
    path = Path(path)
    if meta is None:
        mfile = path / "metrics.json"
        if not mfile.is_file():
            raise PretrainError(f"{path}: no metrics.json (not written by `pretrain_video wan`)")
        meta = json.loads(mfile.read_text())
    pipe = load_wan_dir(path)
    kw = _adapter_kwargs(path)
    ev: dict[str, Any] = {}
    for split, max_prompts in (("heldout", None), ("train", args.eval_train_prompts)):
        if max_prompts == 0:
            continue
        t0 = time.time()
        res = evaluate_wan(pipe, kw, split=split, samples_per_prompt=args.eval_samples, steps=args.eval_steps, guidance=args.eval_guidance,
                           seed=args.eval_seed, max_prompts=max_prompts, log=log)
        if split == "heldout":
            save_samples(res["videos"], res["prompt_list"], res["categories"], path)
        ev[split] = {k: v for k, v in res.items() if k not in ("videos", "prompt_list", "categories")}
        ev[split]["seconds"] = time.time() - t0
        for cat, row in res["table"].items():
            log(f"  {split:8s} {cat:14s} n={row['n']:4d} strict {row['strict']:.3f} credit {row['credit']:.3f}")
    from . import movingshapes as ms

    ref_v, ref_p, ref_c = ms.generate(70, args.eval_seed)
    ref = motioneval_table(ref_v, ref_p, ref_c)["overall"]
    ev["reference"] = {"strict": ref["strict"], "credit": ref["credit"]}
    meta["eval"] = ev
    (path / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_card(path, meta)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmalign.embedded.pretrain_video", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{wan,eval}")

    def common(sp):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        sp.add_argument("--quiet", action="store_true")
        sp.add_argument("--eval-samples", type=int, default=2, help="samples per prompt (0: skip evaluation)")
        sp.add_argument("--eval-train-prompts", type=int, default=70, help="train-suite prompts to evaluate (0: none; held-out: all)")
        sp.add_argument("--eval-steps", type=int, default=16)
        sp.add_argument("--eval-guidance", type=float, default=4.0)
        sp.add_argument("--eval-seed", type=int, default=1234)

    w = sub.add_parser("wan", help="pretrain the tiny Wan pipeline on MovingShapes")
    w.add_argument("--out", required=True)
    common(w)
    w.add_argument("--num-train", type=int, default=4000, help="training clips to generate")
    w.add_argument("--layers", type=int, default=4)
    w.add_argument("--heads", type=int, default=4)
    w.add_argument("--head-dim", type=int, default=24)
    w.add_argument("--ffn-dim", type=int, default=256)
    w.add_argument("--vae-base-dim", type=int, default=8)
    w.add_argument("--z-dim", type=int, default=8)
    w.add_argument("--text-dim", type=int, default=48)
    w.add_argument("--shift", type=float, default=3.0)
    w.add_argument("--vae-steps", type=int, default=1500)
    w.add_argument("--vae-batch-size", type=int, default=8)
    w.add_argument("--vae-window", type=int, default=5, help="frames per VAE training window (4k+1)")
    w.add_argument("--vae-lr", type=float, default=3e-3)
    w.add_argument("--fg-weight", type=float, default=4.0, help="weight of object pixels in the VAE loss (background 1)")
    w.add_argument("--kl-weight", type=float, default=1e-4)
    w.add_argument("--vae-max-minutes", type=float, default=9.0)
    w.add_argument("--vae-stop-at-step", type=int, default=None, help="stop the VAE after this many steps (schedule still spans --vae-steps)")
    w.add_argument("--steps", type=int, default=12000, help="transformer steps")
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--lr", type=float, default=6e-4)
    w.add_argument("--text-lr", type=float, default=3e-4)
    w.add_argument("--cfg-dropout", type=float, default=0.1)
    w.add_argument("--ema-decay", type=float, default=0.995)
    w.add_argument("--max-minutes", type=float, default=55.0, help="wall-time cap of the whole training (VAE included)")
    w.add_argument("--stop-at-step", type=int, default=None, help="stop the transformer after this many steps (schedule still spans --steps)")

    e = sub.add_parser("eval", help="measure MotionEval of a pretrained directory; rewrite its card")
    e.add_argument("--model", required=True)
    common(e)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for k, v in HF_ENV.items():
        os.environ.setdefault(k, v)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    for name in ("steps", "batch_size", "num_train", "threads", "vae_steps", "vae_batch_size", "layers", "heads", "head_dim"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.command == "wan" and (args.vae_window < 5 or (args.vae_window - 1) % 4):
        parser.error(f"--vae-window must be 4k+1 >= 5, got {args.vae_window}")
    if args.command == "eval" and not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is not a directory")
    try:
        if args.command == "wan":
            run_wan(args)
        else:
            eval_dir(Path(args.model), args, log=Logger(args.quiet))
    except PretrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
