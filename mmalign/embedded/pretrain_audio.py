"""Pretrain the embedded audio world's tiny models on ToneWorld, on a CPU, reproducibly (seeded).

Subcommands::

    python -m mmalign.embedded.pretrain_audio clap     --out assets/toneworld-clap     [--max-minutes 6]
    python -m mmalign.embedded.pretrain_audio audioldm --out assets/toneworld-audioldm --clap assets/toneworld-clap
    python -m mmalign.embedded.pretrain_audio eval-audioldm --model assets/toneworld-audioldm
    python -m mmalign.embedded.pretrain_audio eval-clap     --model assets/toneworld-clap

``clap`` trains a tiny transformers ``ClapModel`` (2-layer RoBERTa text tower, 2-stage HTSAT audio tower
on 16 log-mel bins at 8 kHz with hop 160, 1 s windows) contrastively on ToneWorld clips (symmetric InfoNCE, CLIP /
CLAP, arXiv 2103.00020 / 2206.04769), with one hard-negative caption per clip
(:func:`~mmalign.embedded.toneworld.edit_caption`: a count, pitch, order, duration or timbre edit). It is
saved with its ``ClapProcessor`` (tokenizer + an 8 kHz ``ClapFeatureExtractor``), so
``load_reward("clap", model_id=DIR)`` scores audio with it; the reward computes exactly the features it
was trained on (:class:`mmalign.rewards.audio.LogMelSpectrogram`).

``audioldm`` builds a real diffusers ``AudioLDMPipeline`` and trains its parts in turn:

1. the *mel representation* (this module's :class:`ToneMel`): 8 kHz, 256-point STFT, hop 80 (100 frames
   per second), 32 Slaney mel bins over 0-4 kHz, ``log(max(mel magnitude, 1e-5))`` -- AudioLDM's
   log-magnitude mel, at ToneWorld's scale. A 1 s clip is 100 frames;
2. the *vocoder*: a ``SpeechT5HifiGan`` (upsampling 5 x 4 x 4 = 80, PyTorch's default conv init)
   trained on ground-truth (mel, waveform) crops with a plain waveform MSE. No GAN and no spectral loss:
   every ToneWorld frequency is a multiple of the 100 Hz frame rate and tones are rendered in absolute
   time, so a tone has the same phase at every frame and the waveform is a deterministic function of the
   spectrogram -- a regression target (a multi-resolution STFT loss with log magnitudes, tried first,
   drove the output to near-silence within the budget);
3. the *VAE* (``AutoencoderKL`` on ``B,1,100,32`` mels, scale factor 2): L1 + small KL, then
   ``scaling_factor`` = 1 / std of the latents;
4. the *UNet* (``UNet2DConditionModel``, ``class_embed_type="simple_projection"``) with the DDPM epsilon
   loss (Ho et al. 2020) on the pipeline's own noise schedule, conditioned, as in AudioLDM, on the
   L2-normalised CLAP text embedding of the caption (the text tower of the tiny CLAP, frozen), dropped to
   the empty caption 10% of the time for classifier-free guidance; AdamW + EMA.

Then it samples the held-out (and train) suite with the saved pipeline itself and measures ToneEval per
category, and writes ``save_pretrained`` output, ``mmalign_adapter.json`` (``audio_length_in_s: 1.0``),
``metrics.json`` and ``MODEL_CARD.md``. Every stage has a wall-clock cap; training data are freshly
generated ToneWorld clips with ``exclude_heldout=True``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import toneworld as tw
from .pretrain import EMA, Logger, _lr_at, seed_everything
from ..models.base import ADAPTER_OPTIONS_FILE

N_MELS = 32
N_FFT = 256
HOP = 80  # samples per mel frame at 8 kHz: 100 frames per second (= tw.FRAME_RATE)
MEL_FLOOR = 1e-5
FRAMES = int(tw.CLIP_SECONDS * tw.FRAME_RATE)  # 100
CLAP_MELS = 16  # the tiny CLAP's log-mel bins (HTSAT spec_size 32: 64 time steps x 16 bins)
CLAP_HOP = 160  # the tiny CLAP's STFT hop: 51 frames per second, within HTSAT's 64 time steps


# ---------------------------------------------------------------------------------------------- mel
class ToneMel(nn.Module):
    """Waveform ``...,N`` at 8 kHz -> log-magnitude mel ``...,frames,32`` (frames = N // 80; AudioLDM's
    ``log(clamp(mel, 1e-5))``). Centred STFT (reflect), periodic Hann window of 256 samples, hop 80,
    Slaney mel filters over 0-4 kHz; the last centred frame is dropped so 8000 samples give 100 frames."""

    def __init__(self) -> None:
        super().__init__()
        from ..rewards.audio import mel_filter_bank

        fb = mel_filter_bank(N_FFT // 2 + 1, N_MELS, 0.0, tw.SAMPLE_RATE / 2, tw.SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("fb", torch.from_numpy(fb).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        lead, n = wave.shape[:-1], wave.shape[-1]
        spec = torch.stft(wave.reshape(-1, n).float(), N_FFT, HOP, N_FFT, self.window, center=True, pad_mode="reflect", return_complex=True)
        mag = spec.abs()[..., : n // HOP]  # R, freq, frames
        mel = torch.einsum("rft,fm->rtm", mag, self.fb)
        return torch.log(mel.clamp(min=MEL_FLOOR)).reshape(*lead, n // HOP, N_MELS)


# ---------------------------------------------------------------------------------------------- data
def toneworld_data(n: int, seed: int, log: Callable[[str], None] = print, *, exclude_heldout: bool = True) -> tuple[Tensor, list[str], list[Any]]:
    """``n`` ToneWorld training clips (audio ``n,8000``), their captions and specs (categories cycle)."""
    t0 = time.time()
    exs = [tw.example_at(i, seed, exclude_heldout=exclude_heldout) for i in range(n)]
    audio = torch.from_numpy(np.stack([e.audio for e in exs]))
    log(f"generated {n} ToneWorld clips (seed {seed}, held-out compositions excluded: {exclude_heldout}) in {time.time() - t0:.1f} s")
    return audio, [e.caption for e in exs], [e.spec for e in exs]


def suite(split: str) -> list[tuple[str, str]]:
    """(category, prompt) of a ToneWorld prompt suite (the shipped file; built in code if missing)."""
    try:
        from .shapeworld import load_prompt_suite

        return load_prompt_suite(tw.prompt_suite_path(split))
    except FileNotFoundError:
        return tw.build_prompt_suites()[split]


def toneeval_table(audio: Tensor, prompts: Sequence[str], categories: Sequence[str], sample_rate: int = tw.SAMPLE_RATE) -> dict[str, Any]:
    """ToneEval per category: {category: {n, score, strict}}, plus "overall"."""
    from .toneeval import load_toneeval

    out = load_toneeval()(audio.reshape(audio.shape[0], 1, -1).clamp(-1, 1), list(prompts), sample_rate=sample_rate)
    out.raise_if_invalid()
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for cat, s, st in zip(categories, out.scores.tolist(), out.components["strict"].tolist()):
        rows[cat].append((s, st))
        rows["overall"].append((s, st))
    order = [c for c in tw.CATEGORIES if c in rows] + ["overall"]
    return {c: {"n": len(rows[c]), "score": float(np.mean([r[0] for r in rows[c]])), "strict": float(np.mean([r[1] for r in rows[c]]))} for c in order}


def _table_md(table: dict[str, Any]) -> str:
    lines = ["| category | n | ToneEval clause credit | ToneEval strict |", "|---|---:|---:|---:|"]
    lines += [f"| {c} | {r['n']} | {r['score']:.3f} | {r['strict']:.3f} |" for c, r in table.items()]
    return "\n".join(lines)


def _env_line() -> str:
    import diffusers
    import transformers

    return (f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} torch thread(s), {platform.machine()}")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


TONEWORLD_WORDS = ("tone", "tones", "a", "an", "one", "two", "three", "four", "short", "long", "low", "medium", "high", "beep", "beeps", "buzz", "buzzes",
                   "then")


def toneworld_tokenizer(max_length: int = 32):
    """A byte-level BPE ``RobertaTokenizer`` built offline whose merges spell the ToneWorld words (each
    word letter by letter, then the leading-space marker + word): most become one token, a few two or
    three where merges of different words compete ("buzzes" -> "Ġbuzz e s"); any other text falls back to
    byte tokens."""
    from transformers import RobertaTokenizer

    from ..testing.tokenizers import _bytes_to_unicode

    byte_tokens = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in TONEWORLD_WORDS:
        cur = word[0]
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
        merges.append(("\u0120", word))
    vocab: dict[str, int] = {}
    for tok in ("<s>", "<pad>", "</s>", "<unk>", *byte_tokens, *("".join(m) for m in merges), "<mask>"):
        vocab.setdefault(tok, len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _tokenizer(max_length: int = 32):
    return toneworld_tokenizer(max_length)


# ---------------------------------------------------------------------------------------------- CLAP
def build_clap(seed: int, tokenizer, *, width: int = 64, text_layers: int = 2, audio_width: int = 32, embed_dim: int = 32):
    """A tiny ``ClapModel``: RoBERTa text tower and HTSAT audio tower (spec_size 32, 16 mel bins, 2 stages)."""
    from transformers import ClapConfig, ClapModel

    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                num_hidden_layers=text_layers, max_position_embeddings=tokenizer.model_max_length + 2, projection_dim=embed_dim,
                layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    audio = dict(spec_size=2 * CLAP_MELS, num_mel_bins=CLAP_MELS, window_size=4, patch_embeds_hidden_size=audio_width, depths=[1, 1],
                 num_attention_heads=[2, 4], hidden_size=2 * audio_width, projection_dim=embed_dim, num_hidden_layers=2)
    torch.manual_seed(seed)
    return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=embed_dim))


def clap_processor(tokenizer):
    """The ``ClapProcessor`` shipped with the tiny CLAP: 8 kHz, 1 s windows, 32 mel bins, hop 80."""
    from transformers import ClapFeatureExtractor, ClapProcessor

    fe = ClapFeatureExtractor(feature_size=CLAP_MELS, sampling_rate=tw.SAMPLE_RATE, max_length_s=1, hop_length=CLAP_HOP, fft_window_size=N_FFT,
                              frequency_min=0, frequency_max=tw.SAMPLE_RATE // 2, truncation="rand_trunc", padding="repeatpad")
    return ClapProcessor(feature_extractor=fe, tokenizer=tokenizer)


def _clap_log_mel():
    from ..rewards.audio import LogMelSpectrogram

    return LogMelSpectrogram(sampling_rate=tw.SAMPLE_RATE, n_mels=CLAP_MELS, fft_window_size=N_FFT, hop_length=CLAP_HOP, frequency_min=0.0,
                             frequency_max=tw.SAMPLE_RATE / 2)


def clap_text(model, tokenizer, texts: Sequence[str]) -> Tensor:
    """Unit text embeddings ``len(texts),D`` (grad through the text tower)."""
    tok = tokenizer(list(texts), padding=True, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    out = model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def clap_audio(model, feats: Tensor) -> Tensor:
    """Unit audio embeddings from log-mel features ``B,1,frames,mels``."""
    is_longer = torch.zeros(feats.shape[0], 1, dtype=torch.bool)
    pooled = model.audio_model(input_features=feats, is_longer=is_longer).pooler_output
    return F.normalize(model.audio_projection(pooled), dim=-1)


def _stop(step: int, t0: float, max_seconds: float, stop_at_step: int | None, name: str, log) -> bool:
    """Whether a training loop stops before ``step``: at ``stop_at_step`` (a replay of a time-capped run:
    the schedule still spans the full step count) or past ``max_seconds`` of wall time."""
    if stop_at_step is not None and step >= stop_at_step:
        log(f"{name}: stopping at step {step} (stop-at-step)")
        return True
    if time.time() - t0 > max_seconds:
        log(f"{name}: time cap reached after {step} steps")
        return True
    return False


def train_clap(model, tokenizer, audio: Tensor, caps: list[str], specs: list[Any], *, steps: int, batch_size: int, lr: float, seed: int,
               log, max_seconds: float, stop_at_step: int | None = None) -> dict[str, Any]:
    """Symmetric InfoNCE with one hard-negative caption per clip (extra text columns)."""
    mel = _clap_log_mel()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    t0, step, losses = time.time(), 0, []
    for step in range(steps):
        if _stop(step, t0, max_seconds, stop_at_step, "clap", log):
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10))
        idx = torch.randint(len(caps), (batch_size,), generator=gen)
        gain = torch.exp(torch.empty(batch_size, 1).uniform_(-0.7, 0.3, generator=gen))  # -6..+2.6 dB
        noise = torch.randn(batch_size, audio.shape[1], generator=gen) * 10 ** (-torch.empty(batch_size, 1).uniform_(2.0, 4.0, generator=gen))
        wave = (audio[idx] * gain + noise).clamp(-1, 1)
        feats = mel(wave)[:, None]
        texts = list(dict.fromkeys(caps[i] for i in idx.tolist()))
        negs = []
        for i in idx.tolist():
            kinds = list(tw.EDIT_KINDS)
            rng.shuffle(kinds)
            for k in kinds:
                e = tw.edit_caption(specs[i], k, rng)
                if e is not None:
                    negs.append(e.prompt())
                    break
        all_texts = texts + [t for t in dict.fromkeys(negs) if t not in texts]
        a = clap_audio(model, feats)
        t = clap_text(model, tokenizer, all_texts)
        target = torch.tensor([texts.index(caps[i]) for i in idx.tolist()])
        logits_a = model.logit_scale_a.exp() * a @ t.T  # B, T
        loss_a = F.cross_entropy(logits_a, target)
        logits_t = model.logit_scale_t.exp() * t[: len(texts)] @ a.T  # U, B: several clips may share a caption
        pos = target[None, :] == torch.arange(len(texts))[:, None]
        loss_t = (torch.logsumexp(logits_t, 1) - torch.logsumexp(logits_t.masked_fill(~pos, -1e4), 1)).mean()
        loss = 0.5 * (loss_a + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale_a.clamp_(0, math.log(100))
            model.logit_scale_t.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"clap step {step}/{steps} loss {np.mean(losses[-100:]):.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    return {"steps_done": len(losses),  # one loss per completed step (a capped loop breaks before its step)
            "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-100:])) if losses else None}


@torch.no_grad()
def evaluate_clap_reward(reward, *, seed: int = 4321, clips_per_prompt: int = 3, log=print) -> dict[str, Any]:
    """Held-out (and train) prompt retrieval with the ``clap`` reward built on the model: each clip's
    top-1 prompt among its suite's prompts; and how often a clip scores its own caption above a
    hard-negative edit of it (per edit kind)."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for split in ("heldout", "train"):
        rows = suite(split)
        prompts = [p for _, p in rows]
        text = reward.text_embeddings(prompts)
        hits, true_hits, per_cat = [], [], defaultdict(list)
        edit_hits: dict[str, list[float]] = defaultdict(list)
        from .toneeval import evaluate, parse_prompt

        for k, (cat, prompt) in enumerate(rows):
            req = parse_prompt(prompt)
            for j in range(clips_per_prompt):
                scene = None
                while scene is None:
                    scene = tw._place(np.random.default_rng([seed, k, j]), req, tw.CLIP_SECONDS)
                wave = torch.from_numpy(tw.render(scene))[None]
                emb = reward.audio_embeddings(wave)
                sims = (emb @ text.T)[0]
                top = int(sims.argmax())
                hit = float(top == k)
                hits.append(hit)
                # several captions can be true of one clip ("a low tone" of a low beep): is the top-1 one of them?
                true_hits.append(float(top == k or evaluate(wave[0], prompts[top]).strict))
                per_cat[cat].append(hit)
                if split == "heldout":
                    own = float(sims[k])
                    for kind in tw.EDIT_KINDS:
                        e = tw.edit_caption(req, kind, rng)
                        if e is not None:
                            edit_hits[kind].append(float(own > float((emb @ reward.text_embeddings([e.prompt()]).T)[0, 0])))
        out[split] = {"prompts": len(prompts), "clips": len(hits), "top1": float(np.mean(hits)), "top1_true": float(np.mean(true_hits)),
                      "top1_per_category": {c: float(np.mean(v)) for c, v in per_cat.items()}}
        if split == "heldout":
            out[split]["own_above_edit"] = {k: float(np.mean(v)) for k, v in edit_hits.items()}
            out[split]["own_above_edit_overall"] = float(np.mean([x for v in edit_hits.values() for x in v]))
        log(f"clap {split}: top-1 retrieval {out[split]['top1']:.3f} (top-1 caption true of the clip: {out[split]['top1_true']:.3f}) "
            f"over {len(prompts)} prompts x {clips_per_prompt} clips")
    return out


def run_clap(args) -> dict[str, Any]:
    log = Logger(args.quiet)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    tok = _tokenizer()
    audio, caps, specs = toneworld_data(args.num_train, args.seed, log)
    model = build_clap(args.seed, tok)
    log(f"tiny CLAP: {_params(model) / 1e6:.2f} M parameters")
    training = train_clap(model, tok, audio, caps, specs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed + 1,
                          log=log, max_seconds=args.max_minutes * 60, stop_at_step=args.stop_at_step)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    clap_processor(tok).save_pretrained(str(out))
    meta = {"command": _command(args), "args": vars(args), "training": training, "parameters": _params(model), "env": _env_line()}
    return eval_clap_dir(out, meta, log)


def eval_clap_dir(path: Path, meta: dict[str, Any], log=print) -> dict[str, Any]:
    from ..rewards.audio import load_clap

    reward = load_clap(str(path), offline=True)
    t0 = time.time()
    meta["eval"] = evaluate_clap_reward(reward, log=log)
    meta["eval_seconds"] = time.time() - t0
    meta["size_bytes"] = _dir_size(path)
    (path / "metrics.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_clap_card(path, meta)
    return meta


def write_clap_card(out: Path, meta: dict[str, Any]) -> None:
    ev, tr = meta["eval"], meta["training"]
    held = ev["heldout"]
    lines = [
        "# toneworld-clap: a tiny CLAP trained on ToneWorld", "",
        "A transformers `ClapModel` (2-layer RoBERTa text tower of width 64 over a small byte-level BPE that spells the ToneWorld",
        f"words; HTSAT audio tower, spec_size {2 * CLAP_MELS}, 2 stages of width 32/64, on {CLAP_MELS} log-mel bins of 8 kHz audio",
        f"(256-point STFT, hop {CLAP_HOP}), 1 s windows; {meta['parameters'] / 1e6:.2f} M parameters, {meta.get('size_bytes', 0) / 2**20:.1f} MB),",
        "trained here contrastively (symmetric InfoNCE with one hard-negative caption per clip: a count, pitch, order,",
        "duration or timbre edit) on freshly generated ToneWorld clips that never use a held-out composition.", "",
        "Use it as the differentiable `clap` reward: `mmalign.load_reward(\"clap\", model_id=\"assets/toneworld-clap\")`",
        "(audio `B,C,N` with `sample_rate=`; other rates are resampled to 8 kHz; longer clips are averaged over",
        "deterministic 1 s windows). Score: cosine of text and audio embeddings.", "",
        "## Training", "",
        f"    {meta['command']}", "",
        f"{tr['steps_done']} steps in {tr['seconds'] / 60:.1f} min (final loss {tr['final_loss']:.3f}); {meta['env']}.", "",
        "## Held-out evaluation (ground-truth clips, seeds fixed)", "",
        f"- held-out prompt retrieval top-1: **{held['top1']:.3f}** ({held['prompts']} held-out prompts x {held['clips'] // held['prompts']} rendered clips each; chance {1 / held['prompts']:.3f});",
        f"  the top-1 caption is *true* of the clip (its own, or another the clip satisfies per ToneEval, e.g. \"a low tone\" for a low beep): **{held['top1_true']:.3f}**",
        f"- train prompt retrieval top-1: {ev['train']['top1']:.3f}, top-1 true: {ev['train']['top1_true']:.3f} ({ev['train']['prompts']} prompts)",
        f"- own caption above a hard-negative edit (held out): {held['own_above_edit_overall']:.3f}; per edit: "
        + ", ".join(f"{k} {v:.3f}" for k, v in held["own_above_edit"].items()),
        "- held-out top-1 per category: " + ", ".join(f"{k} {v:.3f}" for k, v in held["top1_per_category"].items()), "",
        "Re-measure with `python -m mmalign.embedded.pretrain_audio eval-clap --model assets/toneworld-clap`.",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- AudioLDM
def build_audioldm(seed: int, text_encoder, tokenizer, *, unet_channels: Sequence[int] = (32, 64), vae_channels: Sequence[int] = (8, 16, 32),
                   vocoder_channels: int = 64, latent_channels: int = 8):
    """A diffusers ``AudioLDMPipeline`` at ToneWorld's sizes (8 kHz, 32 mels, 1 s = 100 frames)."""
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    c1, c2 = unet_channels
    unet = UNet2DConditionModel(
        sample_size=FRAMES // 2 ** (len(vae_channels) - 1), in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(c1, c2), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(c1, c2), attention_head_dim=8, class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=text_encoder.config.projection_dim, class_embeddings_concat=True,
    )
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=list(vae_channels), norm_num_groups=8, layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * len(vae_channels), up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
                        latent_channels=latent_channels)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=N_MELS, sampling_rate=tw.SAMPLE_RATE, upsample_initial_channel=vocoder_channels, upsample_rates=[5, 4, 4],
        upsample_kernel_sizes=[11, 8, 8], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3], [1, 3]], normalize_before=True))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)  # the published cvssp/audioldm-s-full-v2 settings
    pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, vocoder=vocoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoder_from_clap(clap_dir: str | None, seed: int, tokenizer):
    """``ClapTextModelWithProjection`` with the tiny CLAP's text tower and projection (AudioLDM's text
    encoder is CLAP's), or a fresh one when ``clap_dir`` is None."""
    from transformers import ClapModel, ClapTextModelWithProjection

    if clap_dir:
        clap = ClapModel.from_pretrained(clap_dir, local_files_only=True)
        enc = ClapTextModelWithProjection(clap.config.text_config)
        missing, unexpected = enc.load_state_dict({k: v for k, v in clap.state_dict().items() if k.startswith(("text_model.", "text_projection."))}, strict=False)
        if [m for m in missing if "position_ids" not in m] or unexpected:
            raise RuntimeError(f"CLAP text tower does not fit ClapTextModelWithProjection: missing {missing}, unexpected {unexpected}")
        return enc.eval()
    tmp = build_clap(seed, tokenizer)
    enc = ClapTextModelWithProjection(tmp.config.text_config)
    enc.load_state_dict({k: v for k, v in tmp.state_dict().items() if k.startswith(("text_model.", "text_projection."))}, strict=False)
    return enc.eval()


def train_vocoder(vocoder, mels: Tensor, audio: Tensor, *, steps: int, batch_size: int, lr: float, crop: int, seed: int, log,
                  max_seconds: float, stop_at_step: int | None = None) -> dict[str, Any]:
    """Regression training of the vocoder on random crops of ``crop`` frames (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for m in vocoder.modules():  # PyTorch's default (Kaiming-uniform) init: transformers' N(0, 0.01) barely trains in minutes
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            m.reset_parameters()
    with torch.no_grad():
        vocoder.mean.copy_(mels.mean((0, 1)))
        vocoder.scale.copy_(mels.std((0, 1)).clamp(min=1e-3))
    opt = torch.optim.AdamW(vocoder.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.0)
    vocoder.train()
    t0, losses, step = time.time(), [], 0
    for step in range(steps):
        if _stop(step, t0, max_seconds, stop_at_step, "vocoder", log):
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=50)
        idx = torch.randint(mels.shape[0], (batch_size,), generator=gen)
        start = torch.randint(0, FRAMES - crop + 1, (batch_size,), generator=gen)
        m = torch.stack([mels[i, s : s + crop] for i, s in zip(idx.tolist(), start.tolist())])
        w = torch.stack([audio[i, s * HOP : (s + crop) * HOP] for i, s in zip(idx.tolist(), start.tolist())])
        pred = vocoder(m)[:, : w.shape[1]]
        loss = 100.0 * F.mse_loss(pred, w)  # waveform regression: the target is phase-locked to the frames
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vocoder.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vocoder step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    vocoder.eval()
    return {"steps_done": len(losses),  # one loss per completed step (a capped loop breaks before its step)
            "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-100:])) if losses else None}


def train_vae(vae, mels: Tensor, *, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, log, max_seconds: float,
              stop_at_step: int | None = None) -> dict[str, Any]:
    """L1 reconstruction + ``kl_weight`` x per-element KL on ``B,1,100,32`` log-mels."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0, losses, step = time.time(), [], 0
    for step in range(steps):
        if _stop(step, t0, max_seconds, stop_at_step, "vae", log):
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=50)
        x = mels[torch.randint(mels.shape[0], (batch_size,), generator=gen)][:, None]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + kl_weight * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    return {"steps_done": len(losses),  # one loss per completed step (a capped loop breaks before its step)
            "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-100:])) if losses else None}


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> Tensor:
    """The pipeline's own prompt encoding (``_encode_prompt``, no guidance): unit CLAP text embeddings."""
    return pipe._encode_prompt(list(prompts), torch.device("cpu"), 1, False).float()


def train_unet(pipe, latents_mean: Tensor, latents_std: Tensor, caps: list[str], *, steps: int, batch_size: int, lr: float, ema_decay: float,
               cfg_dropout: float, seed: int, log, max_seconds: float, stop_at_step: int | None = None) -> dict[str, Any]:
    """DDPM epsilon loss on VAE posterior samples (times ``scaling_factor``), CLAP-text class conditioning."""
    unet, sched = pipe.unet, pipe.scheduler
    gen = torch.Generator().manual_seed(seed)
    unique = sorted(set(caps))
    emb = encode_prompts(pipe, unique + [""])
    cap_idx = torch.tensor([unique.index(c) for c in caps])
    empty = len(unique)
    sf = float(pipe.vae.config.scaling_factor)
    alphas = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = EMA(list(unet.parameters()), ema_decay)
    unet.train()
    t0, losses, step = time.time(), [], 0
    for step in range(steps):
        if _stop(step, t0, max_seconds, stop_at_step, "unet", log):
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=100)
        idx = torch.randint(len(caps), (batch_size,), generator=gen)
        z0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)) * sf
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # q(z_t | z_0), Ho et al. 2020
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        cond = emb[torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])]
        pred = unet(zt, t, encoder_hidden_states=None, class_labels=cond).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    ema.copy_to_params()
    unet.eval()
    return {"steps_done": len(losses),  # one loss per completed step (a capped loop breaks before its step)
            "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-100:])) if losses else None}


@torch.no_grad()
def sample_audio(pipe, prompts: Sequence[str], *, steps: int, guidance: float, seed: int, batch_size: int = 64) -> Tensor:
    """Pipeline samples ``len(prompts),8000``; prompt i uses ``Generator().manual_seed(seed + i)``."""
    outs = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s : s + batch_size])
        gens = [torch.Generator().manual_seed(seed + s + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, audio_length_in_s=tw.CLIP_SECONDS, generator=gens, output_type="pt")
        outs.append(torch.as_tensor(out.audios).float())
    return torch.cat(outs)


@torch.no_grad()
def vocoded_ground_truth(pipe, n_per_cat: int, seed: int, through_vae: bool = False) -> dict[str, Any]:
    """ToneEval on ground-truth held-out-free clips passed through mel -> (VAE ->) vocoder."""
    audio, caps, cats = tw.generate(n_per_cat * len(tw.CATEGORIES), seed)
    mels = ToneMel()(audio[:, 0])
    if through_vae:
        vae = pipe.vae
        mels = torch.cat([vae.decode(vae.encode(m[:, None]).latent_dist.mode()).sample[:, 0] for m in mels.split(64)])
    wave = pipe.vocoder(mels)[:, : audio.shape[-1]].clamp(-1, 1)
    return toneeval_table(wave, caps, cats)


def evaluate_pipeline(pipe, *, samples_per_prompt: int = 2, steps: int = 25, guidance: float = 2.5, seed: int = 1234,
                      splits: Sequence[str] = ("heldout", "train"), wav_dir: Path | None = None, log=print) -> dict[str, Any]:
    """ToneEval per category of pipeline samples on prompt suites (prompt i, sample j: seed + j * 1000 + i)."""
    out: dict[str, Any] = {"samples_per_prompt": samples_per_prompt, "steps": steps, "guidance": guidance, "seed": seed}
    for split in splits:
        rows = suite(split)
        prompts = [p for _, p in rows] * samples_per_prompt
        cats = [c for c, _ in rows] * samples_per_prompt
        t0 = time.time()
        audio = torch.cat([sample_audio(pipe, [p for _, p in rows], steps=steps, guidance=guidance, seed=seed + 1000 * j) for j in range(samples_per_prompt)])
        table = toneeval_table(audio, prompts, cats)
        out[split] = table
        log(f"{split}: ToneEval strict {table['overall']['strict']:.3f}, clause credit {table['overall']['score']:.3f} "
            f"({len(prompts)} samples, {time.time() - t0:.0f} s)")
        if wav_dir is not None and split == "heldout":
            from ..media import save_wav

            wav_dir.mkdir(parents=True, exist_ok=True)
            for i, (cat, p) in enumerate(rows[:: max(1, len(rows) // 10)]):
                k = [q for _, q in rows].index(p)
                save_wav(audio[k][None], wav_dir / f"{i:02d}_{cat}_{p.replace(' ', '_')}.wav", tw.SAMPLE_RATE)
    return out


def save_audioldm(pipe, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out))
    (out / ADAPTER_OPTIONS_FILE).write_text(json.dumps({"adapter_kwargs": {"audio_length_in_s": tw.CLIP_SECONDS}}, indent=2) + "\n")


def run_audioldm(args) -> dict[str, Any]:
    log = Logger(args.quiet)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    t_start = time.time()
    budget = args.max_minutes * 60
    tok = _tokenizer()
    text_encoder = text_encoder_from_clap(args.clap, args.seed, tok)
    pipe = build_audioldm(args.seed, text_encoder, tok, unet_channels=args.unet_channels, vae_channels=args.vae_channels,
                          vocoder_channels=args.vocoder_channels, latent_channels=args.latent_channels)
    sizes = {n: _params(getattr(pipe, n)) for n in ("unet", "vae", "vocoder", "text_encoder")}
    log("AudioLDM parameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in sizes.items()))
    audio, caps, _ = toneworld_data(args.num_train, args.seed, log)
    mels = ToneMel()(audio)
    log(f"mels {tuple(mels.shape)}: min {float(mels.min()):.2f}, max {float(mels.max()):.2f}")
    meta: dict[str, Any] = {"command": _command(args), "args": vars(args), "parameters": sizes, "env": _env_line(),
                            "vae_scale_factor": int(pipe.vae_scale_factor),
                            "latent_shape": f"B,{args.latent_channels},{FRAMES // pipe.vae_scale_factor},{N_MELS // pipe.vae_scale_factor}"}
    meta["vocoder"] = train_vocoder(pipe.vocoder, mels, audio, steps=args.vocoder_steps, batch_size=args.vocoder_batch_size, lr=args.vocoder_lr,
                                    crop=args.vocoder_crop, seed=args.seed + 1, log=log, max_seconds=min(args.vocoder_max_minutes * 60, budget),
                                    stop_at_step=args.vocoder_stop_at_step)
    meta["vocoded_ground_truth"] = vocoded_ground_truth(pipe, 40, seed=args.eval_seed)
    log(f"ToneEval on vocoded ground truth: strict {meta['vocoded_ground_truth']['overall']['strict']:.3f}")
    meta["vae"] = train_vae(pipe.vae, mels, steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr, kl_weight=args.kl_weight,
                            seed=args.seed + 2, log=log, max_seconds=min(args.vae_max_minutes * 60, budget - (time.time() - t_start)),
                            stop_at_step=args.vae_stop_at_step)
    with torch.no_grad():
        posts = [pipe.vae.encode(m[:, None]).latent_dist for m in mels.split(256)]
        mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
        sf = float(1.0 / mean.std())
    pipe.vae.register_to_config(scaling_factor=sf)
    meta["vae"]["scaling_factor"] = sf
    meta["vae_vocoded_ground_truth"] = vocoded_ground_truth(pipe, 40, seed=args.eval_seed, through_vae=True)
    log(f"scaling_factor {sf:.4f}; ToneEval on VAE-reconstructed + vocoded ground truth: strict {meta['vae_vocoded_ground_truth']['overall']['strict']:.3f}")
    remaining = budget - (time.time() - t_start)
    meta["unet"] = train_unet(pipe, mean, std, caps, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                              cfg_dropout=args.cfg_dropout, seed=args.seed + 3, log=log, max_seconds=remaining,
                              stop_at_step=args.stop_at_step)
    meta["train_minutes"] = (time.time() - t_start) / 60
    meta["replay_command"] = replay_command(args, meta)
    save_audioldm(pipe, out)
    return eval_audioldm_dir(out, args, meta, log)


def replay_command(args, meta: dict[str, Any]) -> str:
    """The command that re-runs this training step for step: every stage stopped where it stopped (its
    schedule still spanning the full step count), without time caps (bit-identical on the same CPU and
    thread count)."""
    stages = [("vocoder", "vocoder_steps", "--vocoder-stop-at-step"), ("vae", "vae_steps", "--vae-stop-at-step"),
              ("unet", "steps", "--stop-at-step")]
    flags = "".join(f" {flag} {meta[stage]['steps_done']}" for stage, total, flag in stages
                    if meta[stage]["steps_done"] < getattr(args, total))
    return _command(args) + flags + " --vocoder-max-minutes 100000 --vae-max-minutes 100000 --max-minutes 100000"


def load_audioldm_dir(path: str | Path):
    from diffusers import AudioLDMPipeline

    pipe = AudioLDMPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_audioldm_dir(path: Path, args, meta: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    meta = meta if meta is not None else json.loads((path / "metrics.json").read_text())
    pipe = load_audioldm_dir(path)  # measure what ships
    t0 = time.time()
    meta["eval"] = evaluate_pipeline(pipe, samples_per_prompt=args.eval_samples, steps=args.eval_steps, guidance=args.eval_guidance,
                                     seed=args.eval_seed, wav_dir=path / "samples_heldout", log=log)
    meta["eval_seconds"] = time.time() - t0
    meta["size_bytes"] = _dir_size(path)
    (path / "metrics.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_audioldm_card(path, meta)
    return meta


def write_audioldm_card(out: Path, meta: dict[str, Any]) -> None:
    ev = meta["eval"]
    p = meta["parameters"]
    lines = [
        "# toneworld-audioldm: a tiny AudioLDM trained on ToneWorld", "",
        "A real diffusers `AudioLDMPipeline` (8 kHz, 1 s clips, 32 log-magnitude mel bins at 100 frames/s):",
        f"UNet {p['unet'] / 1e6:.2f} M parameters (2 levels, CLAP-text class embedding), `AutoencoderKL` {p['vae'] / 1e6:.2f} M",
        f"(scale factor {meta.get('vae_scale_factor', 4)}, latents `{meta.get('latent_shape', '')}`), `SpeechT5HifiGan` vocoder {p['vocoder'] / 1e6:.2f} M (upsampling 5x4x4 = 80), tiny CLAP text",
        f"encoder {p['text_encoder'] / 1e6:.2f} M (the text tower of `assets/toneworld-clap`, frozen); {meta.get('size_bytes', 0) / 2**20:.1f} MB.",
        "Trained here on ToneWorld clips that never use a held-out composition (see `mmalign/embedded/pretrain_audio.py`).", "",
        "```python",
        "import mmalign",
        "adapter = mmalign.load_model(\"assets/toneworld-audioldm\")   # audio_length_in_s=1.0 from mmalign_adapter.json",
        "# or: AudioLDMPipeline.from_pretrained(\"assets/toneworld-audioldm\")(prompt, audio_length_in_s=1.0).audios  (8 kHz)",
        "```", "",
        "## Training", "",
        f"    {meta['command']}", "",
        f"Vocoder {meta['vocoder']['steps_done']} steps ({meta['vocoder']['seconds'] / 60:.1f} min), VAE {meta['vae']['steps_done']} steps "
        f"({meta['vae']['seconds'] / 60:.1f} min), UNet {meta['unet']['steps_done']} steps ({meta['unet']['seconds'] / 60:.1f} min); "
        f"{meta['train_minutes']:.1f} min in all; {meta['env']}. The text encoder comes from the tiny CLAP, trained first",
        "(`assets/toneworld-clap`, its model card gives the command and time). Stages are capped by wall-clock minutes, so",
        "the step counts above depend on the machine's load; this replays the run step for step (no time caps):", "",
        f"    {meta.get('replay_command', '(not recorded for this run)')}", "",
        "## How good are the parts (ToneEval strict on ground-truth clips)", "",
        f"- mel -> vocoder: {meta['vocoded_ground_truth']['overall']['strict']:.3f} "
        + "(" + ", ".join(f"{c} {r['strict']:.2f}" for c, r in meta["vocoded_ground_truth"].items() if c != "overall") + ")",
        f"- mel -> VAE -> vocoder: {meta['vae_vocoded_ground_truth']['overall']['strict']:.3f} "
        + "(" + ", ".join(f"{c} {r['strict']:.2f}" for c, r in meta["vae_vocoded_ground_truth"].items() if c != "overall") + ")", "",
        f"## Generated samples (DDIM {ev['steps']} steps, guidance {ev['guidance']}, {ev['samples_per_prompt']} samples per prompt, seeds {ev['seed']}+)", "",
        "Held-out prompts (compositions never seen in training):", "", _table_md(ev["heldout"]), "",
    ]
    if "train" in ev:
        lines += ["Train prompts:", "", _table_md(ev["train"]), ""]
    lines += ["It is deliberately small and imperfect: it draws tones of roughly the right pitch region and count for easy prompts and",
              "misses sequences (order, rhythm) and timbre most of the time -- the gap alignment is for",
              "(`mmalign train --config configs/train_grpo_toneworld.yaml`).", "",
              "`samples_heldout/` holds a few held-out samples as WAV. Re-measure with",
              "`python -m mmalign.embedded.pretrain_audio eval-audioldm --model assets/toneworld-audioldm`."]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- CLI
def _command(args) -> str:
    return "python -m mmalign.embedded.pretrain_audio " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmalign.embedded.pretrain_audio", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        sp.add_argument("--quiet", action="store_true")

    def eval_opts(sp):
        sp.add_argument("--eval-samples", type=int, default=2)
        sp.add_argument("--eval-steps", type=int, default=25)
        sp.add_argument("--eval-guidance", type=float, default=2.5)
        sp.add_argument("--eval-seed", type=int, default=1234)

    c = sub.add_parser("clap", help="train the tiny CLAP")
    common(c)
    c.add_argument("--out", required=True)
    c.add_argument("--num-train", type=int, default=6000)
    c.add_argument("--steps", type=int, default=4000)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--max-minutes", type=float, default=6.0)
    c.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps (schedule still spans --steps): replays a time-capped run")

    a = sub.add_parser("audioldm", help="train the tiny AudioLDM (vocoder, VAE, UNet)")
    common(a)
    eval_opts(a)
    a.add_argument("--out", required=True)
    a.add_argument("--clap", default=None, help="tiny CLAP directory whose text tower becomes the text encoder (frozen)")
    a.add_argument("--num-train", type=int, default=4000)
    a.add_argument("--unet-channels", type=int, nargs=2, default=[32, 64])
    a.add_argument("--vae-channels", type=int, nargs="+", default=[8, 16, 32], help="VAE widths; n levels = scale factor 2^(n-1)")
    a.add_argument("--latent-channels", type=int, default=8)
    a.add_argument("--vocoder-channels", type=int, default=64)
    a.add_argument("--vocoder-steps", type=int, default=3000)
    a.add_argument("--vocoder-batch-size", type=int, default=16)
    a.add_argument("--vocoder-lr", type=float, default=2e-3)
    a.add_argument("--vocoder-crop", type=int, default=32, help="mel frames per training crop")
    a.add_argument("--vocoder-max-minutes", type=float, default=2.5)
    a.add_argument("--vocoder-stop-at-step", type=int, default=None, help="stop the vocoder after this many steps (replay)")
    a.add_argument("--vae-steps", type=int, default=1000)
    a.add_argument("--vae-batch-size", type=int, default=16)
    a.add_argument("--vae-lr", type=float, default=2e-3)
    a.add_argument("--kl-weight", type=float, default=1e-3)
    a.add_argument("--vae-max-minutes", type=float, default=2.5)
    a.add_argument("--vae-stop-at-step", type=int, default=None, help="stop the VAE after this many steps (replay)")
    a.add_argument("--steps", type=int, default=3000, help="UNet steps")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--ema-decay", type=float, default=0.995)
    a.add_argument("--cfg-dropout", type=float, default=0.1)
    a.add_argument("--max-minutes", type=float, default=17.0, help="wall-clock cap of all training stages together")
    a.add_argument("--stop-at-step", type=int, default=None, help="stop the UNet after this many steps (schedule still spans --steps): replays a time-capped run")

    e = sub.add_parser("eval-audioldm", help="re-measure a saved pipeline, rewrite metrics.json and MODEL_CARD.md")
    common(e)
    eval_opts(e)
    e.add_argument("--model", required=True)
    ec = sub.add_parser("eval-clap", help="re-measure a saved tiny CLAP")
    common(ec)
    ec.add_argument("--model", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "clap":
        run_clap(args)
    elif args.cmd == "audioldm":
        run_audioldm(args)
    elif args.cmd == "eval-audioldm":
        eval_audioldm_dir(Path(args.model), args)
    elif args.cmd == "eval-clap":
        path = Path(args.model)
        eval_clap_dir(path, json.loads((path / "metrics.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
