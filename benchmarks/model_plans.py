"""Optimised sampling plans on the bundled digit models (``bench_solver_accuracy.py --models``).

Plans are fitted on a calibration batch (4 noises per digit) and measured on a held-out batch
(8 per digit, unguided) against a 200-NFE reference from the same noise (Heun, 100 Karras
steps): PSNR to the reference, class accuracy and Frechet distance in the shipped classifier's
features. diffusers' schedulers run in the same pipeline from the same noise.
"""

from __future__ import annotations

import math
import sys

import torch

from stepfuse import k_diffusion as kd
from stepfuse import models, plans
from stepfuse.metrics import DigitMetrics, psnr

# (label, diffusers class, config overrides): the configurations a diffusers user would pick.
BASELINES = [
    ("dpm++ 2M", "DPMSolverMultistepScheduler", {}),
    ("dpm++ 2M karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("dpm++ 3M karras", "DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("unipc bh2 3", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("unipc bh2 3 karras", "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("ddim trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("euler karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
]
BUDGETS = (5, 8)


def fitted_plans(model, calibration, num_steps: int, sigma_min: float, sigma_max: float, solvers, search: int,
                 extra_args=None, progress=None, evolve: int = 0) -> list:
    """``(label, solver, plan)`` for each optimiser (and combination) at ``num_steps`` steps; with
    ``evolve`` evaluations also a CMA-ES search of levels, D-ODE scales and shifted levels from
    the joint Nelder-Mead plan."""
    karras = kd.get_sigmas_karras(num_steps, sigma_min, sigma_max).double()
    dp = plans.optimal_schedule(model, calibration, num_steps, sigma_min, sigma_max, teacher_steps=200,
                                extra_args=extra_args)
    out = []
    for solver in solvers:
        # The search from the Karras and from the DP schedule; the one with the lower calibration error.
        searched = min((plans.search_schedule(model, calibration, start, solver=solver, max_evaluations=search,
                                              extra_args=extra_args) for start in (karras, dp)),
                       key=lambda p: p.metadata["mse_after"])
        for label, plan in [("karras", plans.SamplingPlan(sigmas=karras.tolist())), ("dp", dp),
                            ("searched", searched)]:
            out.append((f"{solver} {label}", solver, plan))
            out.append((f"{solver} {label} + d-ode", solver,
                        plans.distill_scales(model, calibration, plan, solver, extra_args=extra_args)))
        joint = plans.search_schedule(model, calibration, searched, solver=solver, max_evaluations=5 * search,
                                      extra_args=extra_args, scales=True)
        out.append((f"{solver} joint search (levels + d-ode)", solver, joint))
        if evolve:
            out.append((f"{solver} cma-es (levels + d-ode + shifts)", solver,
                        plans.search_schedule(model, calibration, joint, solver=solver, max_evaluations=evolve,
                                              extra_args=extra_args, scales=True, shifts=True, optimizer="cma-es")))
        out.append((f"{solver} karras + time shift", solver,
                    plans.time_shift(model, calibration, karras, solver=solver, window=0.1, extra_args=extra_args)))
        if progress:
            progress(f"plans fitted: {solver} at {num_steps} steps")
    return out


def _network(pipe):
    denoiser, channels = pipe.denoiser, pipe.sample_shape[0]

    def network(x, t, class_labels):
        return denoiser(x, t, class_labels=class_labels).sample[:, :channels].float()
    return network


def _images(latents: torch.Tensor) -> torch.Tensor:
    return (latents.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def model_plans(name: str, search: int, quick: bool = False) -> dict:
    """``{"psnr" | "accuracy" | "fd": {"baselines": {nfe: (best value, label)}, "plans": {nfe: [...]}}}``."""
    import diffusers

    def log(line):
        print(f"  {name}: {line}", file=sys.stderr, flush=True)

    pipe = models.load(name)
    pipe.set_progress_bar_config(disable=True)
    model = plans.DiscreteVPDenoiser(_network(pipe), pipe.scheduler.alphas_cumprod,
                                     pipe.scheduler.config.prediction_type)
    sigma_min, sigma_max = model.sigma_min, model.sigma_max
    shape = pipe.sample_shape
    metrics = DigitMetrics()

    def noise(per_class, seed):
        labels = torch.arange(10).repeat_interleave(per_class)
        z = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
        return labels, z

    cal_labels, cal_z = noise(4, 1)
    labels, z = noise(8, 0)
    # A VP sample x_T = z at the top of the schedule is the VE sample z * sqrt(sigma_max^2 + 1).
    scale = math.sqrt(sigma_max**2 + 1.0)
    calibration, x = cal_z * scale, z * scale
    cal_args, args = {"class_labels": cal_labels}, {"class_labels": labels}
    reference = _images(kd.sample_heun(model, x, kd.get_sigmas_karras(100, sigma_min, sigma_max),
                                       extra_args=args, disable=True))
    log("reference done")

    def scores(latents) -> dict:
        images = _images(latents)
        return {"psnr": psnr(images, reference), "accuracy": metrics.accuracy(images, labels),
                "fd": metrics.fd(images)}

    result = {m: {"baselines": {}, "plans": {}} for m in ("psnr", "accuracy", "fd")}
    for budget in (*BUDGETS, 20):
        runs = []
        for label, cls_name, overrides in BASELINES:
            pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
            latents = pipe(labels.tolist(), num_inference_steps=budget, guidance_scale=1.0, latents=z,
                           output_type="latent").images
            runs.append((label, scores(latents)))
        for m, better in (("psnr", max), ("accuracy", max), ("fd", min)):
            best = better(runs, key=lambda r: r[1][m])
            result[m]["baselines"][budget] = (best[1][m], best[0])
        log(f"diffusers baselines at NFE {budget} done")

    solvers = ("dpmpp_2m",) if quick else ("dpmpp_2m", "dpmpp_3m")
    for budget in BUDGETS:
        for m in result:
            result[m]["plans"][budget] = []
        for label, solver, plan in fitted_plans(model, calibration, budget, sigma_min, sigma_max, solvers, search,
                                                cal_args, log):
            s = scores(plans.run_plan(model, x, plan, solver, extra_args=args))
            for m in result:
                result[m]["plans"][budget].append({"label": label, m: s[m], "plan": plan.to_dict()})
    return result
