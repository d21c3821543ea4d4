"""Train the bundled tiny models on scikit-learn's handwritten digits (16x16, class-conditional).

    python benchmarks/train_tiny.py all                 # every model, into python/stepfuse/models/
    python benchmarks/train_tiny.py digits-unet --steps 200 --out /tmp/models   # a smoke run

Models (all trained with 10% label dropout, so classifier-free guidance works; the null class is
label 10):

- ``digits-unet``: diffusers ``UNet2DModel`` with a class embedding, epsilon prediction, the DDPM
  linear VP schedule (Ho et al. 2020);
- ``digits-dit``: diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023) over 2x2 patches
  (64 tokens), epsilon prediction, same VP schedule;
- ``digits-dit-flow``: the same transformer trained for rectified flow / flow matching
  (x_t = (1 - t) x_0 + t * noise, velocity target noise - x_0; Lipman et al. 2023, Liu et al. 2023),
  sampled with the flow-matching Euler scheduler, as SD3, Flux and Wan are;
- ``classifier``: the digit classifier behind ``stepfuse.metrics`` (shift/noise augmentation).

Everything is seeded; weights are EMA averages (decay 0.999), stored as float16 safetensors in
diffusers pipeline folders (``model_index.json``, ``unet/`` or ``transformer/``, ``scheduler/``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stepfuse.models import digits

# The package's models folder in a source checkout: the default destination, to be committed.
MODELS_DIR = Path(__file__).resolve().parents[1] / "python" / "stepfuse" / "models"
NULL_CLASS = digits.NUM_CLASSES
LABEL_DROPOUT = 0.1

# name -> (architecture, objective, default steps, batch, learning rate)
RECIPES = {
    "digits-unet": ("unet", "epsilon", 3000, 64, 1e-3),
    "digits-dit": ("dit", "epsilon", 3000, 64, 1e-3),
    "digits-dit-flow": ("dit", "flow", 3000, 64, 1e-3),
}


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=digits.RESOLUTION, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=digits.NUM_CLASSES + 1,  # + the null class of classifier-free guidance
    )


def build_dit():
    from diffusers import DiTTransformer2DModel

    # num_embeds_ada_norm classes plus the built-in null class (index num_classes).
    return DiTTransformer2DModel(
        num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
        sample_size=digits.RESOLUTION, patch_size=2, num_embeds_ada_norm=digits.NUM_CLASSES,
    )


def build_scheduler(objective: str):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: dict, model: torch.nn.Module, step: int, decay: float = 0.999) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for name, p in model.state_dict().items():
        if p.dtype.is_floating_point:
            ema[name].mul_(d).add_(p.detach(), alpha=1 - d)
        else:
            ema[name].copy_(p)


def train_denoiser(name: str, steps: int, batch: int, lr: float, seed: int, out: Path, log_every: int) -> dict:
    arch, objective, _, _, _ = RECIPES[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x0_all, y_all = digits.load_sklearn_digits("train")
    model = build_unet() if arch == "unet" else build_dit()
    scheduler = build_scheduler(objective)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch,), generator=gen)
        x0, labels = x0_all[idx], y_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        if arch == "unet":  # DiT's label embedder drops labels itself in train mode
            drop = torch.rand(batch, generator=gen) < LABEL_DROPOUT
            labels = torch.where(drop, NULL_CLASS, labels)
        if objective == "flow":
            t = torch.rand(batch, generator=gen)
            tt = t.view(-1, 1, 1, 1)
            xt, target, timestep = (1 - tt) * x0 + tt * noise, noise - x0, t * 1000.0
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1).float()
            xt, target, timestep = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        pred = model(xt, timestep, class_labels=labels).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step)
        running += loss.item()
        if (step + 1) % log_every == 0:
            print(f"  {name} step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            running = 0.0
    seconds = time.perf_counter() - start
    model.load_state_dict(ema)
    model.eval().to(torch.float16)
    from stepfuse.models.pipeline import ClassConditionalPipeline

    parts = {"unet": model} if arch == "unet" else {"transformer": model}
    pipe = ClassConditionalPipeline(scheduler=scheduler, **parts)
    pipe.save_pretrained(out / name, safe_serialization=True)
    info = {"name": name, "architecture": arch, "objective": objective, "steps": steps, "batch": batch,
            "lr": lr, "seed": seed, "train_seconds": round(seconds, 1), "final_loss": round(loss.item(), 4),
            "parameters": sum(p.numel() for p in model.parameters())}
    return info


def train_classifier(steps: int, batch: int, lr: float, seed: int, out: Path, log_every: int) -> dict:
    from stepfuse.models.classifier import DigitClassifier

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = digits.load_sklearn_digits("train")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        # Augment with 1-pixel shifts and mild noise so generated digits are judged on shape, not on
        # the exact interpolation artefacts of the training images.
        shifts = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shifts, dims=(2, 3))
        x = x + 0.1 * torch.rand(()).item() * torch.randn(x.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=50)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            print(f"  classifier step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    x_test, y_test = digits.load_sklearn_digits("heldout")
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    model.save_pretrained(out / "digits-classifier", safe_serialization=True)
    return {"name": "digits-classifier", "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "train_seconds": round(seconds, 1), "heldout_accuracy": round(accuracy, 4),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", choices=["all", "classifier", *RECIPES])
    p.add_argument("--out", type=Path, default=MODELS_DIR, help="folder for the model folders")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["classifier", *RECIPES] if "all" in args.models else args.models
    args.out.mkdir(parents=True, exist_ok=True)
    digits.save_heldout(args.out / digits.HELDOUT_FILE.name)
    for name in names:
        if name == "classifier":
            info = train_classifier(args.steps or 1500, args.batch or 128, 2e-3, args.seed, args.out,
                                    args.log_every)
        else:
            _, _, steps, batch, lr = RECIPES[name]
            info = train_denoiser(name, args.steps or steps, args.batch or batch, lr, args.seed, args.out,
                                  args.log_every)
        print(json.dumps(info), flush=True)
        (args.out / f"{info['name']}.train.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
