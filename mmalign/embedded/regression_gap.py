"""How the embedded SD3's own samples differ from real ShapeWorld images, in its own denoising loss.

Reward-weighted regression (and every self-distillation) regresses the model onto its own samples. This
prints the model's denoising loss on rendered ShapeWorld images and on its own ODE samples of the same
captions (at each guidance scale given), computed through :class:`~mmalign.trainers.rwr.RWRTrainer`'s own
re-noising (uniform points of the training schedule, rectified-flow target ``noise - x0``) with the
conditional prediction, the one RWR trains. A loss on real images close to the pretraining loss shows the
regression path matches how the model was trained; the loss on its own samples says how far the data RWR
regresses onto sits from the real data, in the model's own terms.

    python -m mmalign.embedded.regression_gap --model assets/shapeworld-sd3 --n 48 --draws 4
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..trainers.losses import denoising_loss
from .shapeworld import CATEGORIES, sample_example


def denoising_losses(trainer, x0: torch.Tensor, captions: Sequence[str], draws: int, seed: int = 0) -> torch.Tensor:
    """Per-sample denoising loss (B) of the trainer's model on clean latents ``x0`` (B,*L), averaged over
    ``draws`` re-noisings (row i of draw d from generator seed ``seed + 1000 d + i``)."""
    adapter = trainer.adapter
    micro = trainer.cfg.sampler.micro_batch
    with torch.no_grad():
        cond = adapter.encode_in_chunks(list(captions), None, 1.0, micro)
        per_draw = []
        for d in range(draws):
            gens = [torch.Generator().manual_seed(seed + 1000 * d + i) for i in range(len(captions))]
            x_t, t, target = trainer.renoise(x0, gens)
            out = adapter.denoise_in_chunks(x_t, t, cond, micro)
            per_draw.append(denoising_loss(out, target))
    return torch.stack(per_draw).mean(0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapeworld-sd3")
    p.add_argument("--n", type=int, default=48, help="captions (rendered train-split examples, categories in turn)")
    p.add_argument("--draws", type=int, default=4, help="re-noisings per sample")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0], help="guidance scales of the own samples")
    p.add_argument("--steps", type=int, default=16, help="ODE steps of the own samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 1 or args.draws < 1 or args.steps < 1:
        p.error("--n, --draws and --steps must be >= 1")
    from ..samplers import SamplerConfig, sample
    from ..trainers import build_trainer, load_train_config

    torch.set_num_threads(args.threads)
    recipe = Path(__file__).resolve().parents[2] / "configs" / "train_rwr_embedded.yaml"
    with tempfile.TemporaryDirectory() as run_dir:  # the trainer writes its resolved config; nothing is kept
        cfg = load_train_config(recipe, [f"model.name={args.model}", "eval.every=0", "logging.stdout=false",
                                         "checkpoint.save_final=false", f"out={run_dir}", f"threads={args.threads}"])
        trainer = build_trainer(cfg, log=lambda s: None)
    rng = np.random.default_rng(args.seed)
    examples = [sample_example(rng, CATEGORIES[i % len(CATEGORIES)], trainer.adapter.image_size()[0], exclude_heldout=True)
                for i in range(args.n)]
    captions = [e.caption for e in examples]
    images = torch.stack([torch.from_numpy(e.image).permute(2, 0, 1).float() / 255 for e in examples])
    with torch.no_grad():
        real = trainer.adapter.encode_images(images.to(trainer.adapter.device)).float()
    rows = [("rendered ShapeWorld images", denoising_losses(trainer, real, captions, args.draws))]
    for g in args.guidance:
        out = sample(trainer.adapter, captions, SamplerConfig(method="ode", num_steps=args.steps, guidance_scale=g),
                     generator=torch.Generator().manual_seed(args.seed))
        rows.append((f"own ODE samples, CFG {g:g}", denoising_losses(trainer, out.final_latents.float(), captions, args.draws)))
    print(f"denoising loss of {args.model} (conditional prediction, RWR's re-noising; {args.n} captions x {args.draws} draws)")
    for name, loss in rows:
        se = float(loss.std() / len(loss) ** 0.5) if len(loss) > 1 else float("nan")
        print(f"  {name:32s} {float(loss.mean()):.4f}  (SE {se:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
