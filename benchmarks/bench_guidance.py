"""Fused guided solver step against diffusers' guidance + scheduler chain, and guidance variants end to end.

Part 1 (step): the model output of one guided step is a batch ``[uncond; cond]`` of twice the
latent of one image (SD1.5, SDXL, Flux, Wan shapes).  diffusers' chain is what its pipelines run:
``chunk(2)``, ``uncond + w (cond - uncond)``, ``rescale_noise_cfg`` when ``guidance_rescale > 0``
(APG and CFG-Zero* through ``diffusers.guiders``' ``forward``), then
``DPMSolverMultistepScheduler.step``.  stepfuse runs ``prepare_guided`` (the statistics pass,
when the variant needs one) and the drop-in scheduler's ``guided_step``.  Both run the same
DPM++ 2M trajectories, interleaved, and only mid-run steps (history warmed up, not the last) are
timed.  *launches* counts device kernels on a GPU (profiler) and dispatched non-view ops on a
CPU, for one mid-run step.  Effective GB/s uses the bytes the fused step must move: cond,
uncond, sample and the history slots it reads, the slot and the sample it writes.

On a 2-core CPU shared with other jobs, diffusers' rows at 2 threads were seen to jump from
~0.3 ms to ~150 ms for a whole row (each of its ~60 small ops waits on the other thread);
``--threads 1`` gives steadier step numbers there.

Part 2 (end to end, ``--e2e``): the bundled class-conditional models sampled through
``stepfuse.sample`` with DPM++ 2M, with full CFG, CFG in a limited interval (Kynkäänniemi et al.
2024), CFG-Zero* (Fan et al. 2025) and APG (Sadat et al. 2025), next to the bundled pipeline with
diffusers' DPM++ 2M and its CFG.  Same noise and labels for every run; scores as ``stepfuse demo``
(class accuracy, Fréchet distance to held-out digits, PSNR to a 100-step UniPC full-CFG run).

    python benchmarks/bench_guidance.py [--shapes sdxl] [--dtypes fp32 bf16] [--no-e2e] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solver_step import program_bytes  # noqa: E402
from common import DTYPES, SHAPES, base_parser, format_table, synchronize, write_results  # noqa: E402

import diffusers  # noqa: E402
from diffusers import guiders  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

import stepfuse  # noqa: E402
import stepfuse.schedulers as sf  # noqa: E402
from stepfuse.guidance import APG, CFG, CFGZeroStar, prepare_guided  # noqa: E402

# Latent shapes whose models sample with flow matching (DPM++ 2M in its flow form, as the demo).
FLOW_SHAPES = ("flux", "wan")
FLOW_CONFIG = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}


def variants(scale: float) -> dict:
    """label -> (stepfuse config, diffusers guider or None for the pipelines' inline CFG)."""
    return {
        "cfg": (CFG(guidance_scale=scale), None),
        "cfg+rescale0.7": (CFG(guidance_scale=scale, guidance_rescale=0.7), None),
        "apg": (APG(guidance_scale=scale), guiders.AdaptiveProjectedGuidance(guidance_scale=scale)),
        "cfg-zero*": (CFGZeroStar(guidance_scale=scale), guiders.ClassifierFreeZeroStarGuidance(guidance_scale=scale)),
    }


# -- part 1: one guided step ---------------------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts the ops that reach a kernel (views and aliases excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn, device: torch.device) -> int:
    """Kernels one call of ``fn`` launches: device kernels on a GPU, dispatched ops on a CPU."""
    if device.type != "cuda":
        with _OpCounter() as counter:
            fn()
        return counter.count
    from torch.profiler import DeviceType, ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def diffusers_chain(scheduler, guider, scale: float, rescale: float, output: torch.Tensor, num_steps: int):
    """One pipeline step as diffusers writes it: ``fn(i, t, x) -> next x``."""
    def step(i, t, x):
        uncond, cond = output.chunk(2)
        if guider is None:
            pred = uncond + scale * (cond - uncond)
            if rescale > 0:
                pred = rescale_noise_cfg(pred, cond, guidance_rescale=rescale)
        else:
            guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
            pred = guider.forward(cond, uncond).pred
        return scheduler.step(pred, t, x, return_dict=False)[0]
    return step


def stepfuse_chain(scheduler, guidance, output: torch.Tensor):
    """The same step with guidance fused into stepfuse's scheduler step."""
    zeros = torch.zeros_like(output[: output.shape[0] // 2])
    momentum = torch.zeros(zeros.shape, dtype=torch.float32, device=zeros.device) if guidance.uses_momentum else None

    def step(i, t, x):
        if guidance.zero_step(i):
            return scheduler.step(zeros, t, x, return_dict=False)[0]
        uncond, cond = output.chunk(2)
        guided = prepare_guided(guidance, x, [cond, uncond], momentum)
        return scheduler.guided_step(guided, t, x, return_dict=False)[0]
    return step


def run_trajectory(scheduler, step, x, num_steps: int, device, timed: range, probe: int = -1) -> tuple:
    """Seconds of each step in ``timed``, and the launches of step ``probe`` (None if not probed)."""
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    times, launches = [], None
    for i, t in enumerate(scheduler.timesteps):
        if i == probe:
            box = []
            launches = count_launches(lambda: box.append(step(i, t, x)), device)
            break  # the probed step's program stays the scheduler's last_program
        synchronize(device)
        start = time.perf_counter()
        x = step(i, t, x)
        synchronize(device)
        if i in timed:
            times.append(time.perf_counter() - start)
    return times, launches


def bench_step(shape_name: str, dtype_name: str, label: str, guidance, guider, args, device) -> dict:
    shape = (1, *SHAPES[shape_name][1:])  # the latent of one image; CFG doubles the model batch
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    output = torch.randn((2 * shape[0], *shape[1:]), generator=g, device=device).to(dtype)
    config = FLOW_CONFIG if shape_name in FLOW_SHAPES else {}
    ours = sf.DPMSolverMultistepScheduler(solver_order=2, **config)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    n = args.step_trajectory
    timed = range(2, n - 1)  # second order from step 1 on; the last step may drop to first order
    chains = [(ours, stepfuse_chain(ours, guidance, output)),
              (theirs, diffusers_chain(theirs, guider, guidance.guidance_scale, guidance.guidance_rescale, output, n))]
    times = {0: [], 1: []}
    for r in range(args.repeats + 1):  # the first round warms up
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate which library goes first
            spent, _ = run_trajectory(*chains[k], x, n, device, timed)
            if r:
                times[k] += spent
    probe = timed[len(timed) // 2]
    launches = [run_trajectory(s, step, x, n, device, range(0), probe)[1] for s, step in chains]
    program = ours.last_program  # stepfuse's chain ran first and is probed at the same step
    item = x.element_size()
    hist_item = torch.empty((), dtype=ours.history_dtype or dtype).element_size()
    # program_bytes counts one model output; a guided step reads two branches.
    nbytes = program_bytes(program, x.numel(), item, hist_item) + x.numel() * item
    t_ours, t_theirs = statistics.median(times[0]), statistics.median(times[1])
    return {
        "shape": shape_name, "dtype": dtype_name, "guidance": label,
        "stepfuse_us": round(t_ours * 1e6, 1), "diffusers_us": round(t_theirs * 1e6, 1),
        "speedup": round(t_theirs / t_ours, 2),
        "stepfuse_launches": launches[0], "diffusers_launches": launches[1],
        "stepfuse_GBps": round(nbytes / t_ours / 1e9, 2), "diffusers_GBps": round(nbytes / t_theirs / 1e9, 2),
        "timed_steps": len(times[0]),
    }


# -- part 2: end to end on the bundled models ----------------------------------------------------
def e2e_guidances(args, flow: bool) -> dict:
    """label -> stepfuse guidance config of the end-to-end table."""
    scale = args.e2e_guidance_scale
    interval = ({"sigma_interval": tuple(args.sigma_interval)} if args.sigma_interval
                else {"start": args.interval[0], "stop": args.interval[1]})
    # CFG-Zero*'s zero-init (a zero velocity at the first step) is meant for flow matching; on an
    # epsilon model a zero output means x0 = x / alpha, so there it defaults to off.
    zero_init = args.zero_init_steps if args.zero_init_steps is not None else int(flow)
    return {
        "full cfg": CFG(guidance_scale=scale),
        "interval cfg": CFG(guidance_scale=scale, **interval),
        "cfg-zero*": CFGZeroStar(guidance_scale=scale, zero_init_steps=zero_init),
        # With eta = 1 and no clipping APG is exactly CFG; eta = 0 is the paper's setting (Sadat et al. 2025, Sec. 5).
        "apg": APG(guidance_scale=scale, eta=args.apg_eta, norm_threshold=args.apg_norm_threshold),
    }


def bench_e2e(model_name: str, args, device) -> dict:
    from stepfuse import models
    from stepfuse.demo import RunSpec, is_flow, make_scheduler, sample as pipeline_sample
    from stepfuse.metrics import DigitMetrics

    pipe = models.load(model_name, device=str(device))
    flow, base_config, denoiser = is_flow(pipe), pipe.scheduler.config, pipe.denoiser
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    latents = torch.randn((labels.numel(), *pipe.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    scale, steps = args.e2e_guidance_scale, args.e2e_steps
    metrics = DigitMetrics(device=device)
    dev_labels = labels.to(device)
    cond = {"class_labels": dev_labels}
    uncond = {"class_labels": torch.full_like(dev_labels, pipe.null_class_label)}

    def model(x, t, class_labels):
        return denoiser(x, t, class_labels=class_labels).sample

    @torch.no_grad()
    def run_stepfuse(guidance, n: int, num_steps: int = steps) -> torch.Tensor:
        scheduler = make_scheduler(base_config, args.e2e_solver, flow)
        scheduler.set_timesteps(num_steps, device=device)
        x0 = latents[:n].to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
        kw = {k: {"class_labels": v["class_labels"][:n]} for k, v in (("cond", cond), ("uncond", uncond))}
        x = stepfuse.sample(model, x0, scheduler, guidance=guidance, **kw)
        return (x / 2 + 0.5).clamp(0, 1).cpu()

    def run_pipeline(spec, n: int) -> torch.Tensor:
        return pipeline_sample(pipe, spec, base_config, labels[:n], latents[:n], scale, flow, False)[0].cpu()

    def timed(fn) -> tuple:
        """Images, wall seconds and process CPU seconds (steadier than wall time on a shared machine)."""
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        images = fn()
        synchronize(device)
        return images, time.perf_counter() - wall, time.process_time() - cpu

    guidances = e2e_guidances(args, flow)
    diffusers_spec = RunSpec(args.e2e_solver, steps, "diffusers")
    # Warm-up at the timed batch sizes (N cond-only, 2N guided): one-time costs (lazy imports,
    # oneDNN primitives built per input shape) stay out of the timings.
    for g in guidances.values():
        run_stepfuse(g, labels.numel(), num_steps=2)
    run_pipeline(replace(diffusers_spec, steps=2), labels.numel())
    reference = RunSpec("UniPC", args.reference_steps, "stepfuse")
    ref_images = run_pipeline(reference, labels.numel())

    runs = [(f"stepfuse {label}", (lambda g=g: run_stepfuse(g, labels.numel()))) for label, g in guidances.items()]
    runs.append((f"diffusers {args.e2e_solver} cfg", lambda: run_pipeline(diffusers_spec, labels.numel())))
    seconds = {name: [] for name, _ in runs}
    cpu_seconds = {name: [] for name, _ in runs}
    images = {}
    for r in range(args.e2e_repeats):  # rounds interleave the runs, so load from other jobs hits all alike
        for name, fn in runs:
            images[name], wall, cpu = timed(fn)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    rows = []
    for name, _ in runs:
        scores = metrics(images[name], labels, reference=ref_images)
        rows.append({"name": name, "seconds": round(min(seconds[name]), 3),
                     "cpu_seconds": round(min(cpu_seconds[name]), 3),
                     **{k: round(v, 4) for k, v in scores.items() if k != "mse"}})
    for key in ("seconds", "cpu_seconds"):
        base = rows[0][key]
        for row in rows:
            row[f"{key}_vs_full_cfg"] = round(row[key] / base, 3)
    interval = guidances["interval cfg"]
    sigmas = make_scheduler(base_config, args.e2e_solver, flow)
    sigmas.set_timesteps(steps)
    guided_steps = sum(interval.active(i, steps, float(s)) for i, s in enumerate(sigmas.sigmas[:steps].tolist()))
    return {
        "model": model_name, "flow": flow, "solver": args.e2e_solver, "steps": steps, "guidance_scale": scale,
        "samples": int(labels.numel()), "seed": args.seed, "timing": f"best of {args.e2e_repeats} interleaved rounds",
        "interval": {"sigma_interval": interval.sigma_interval, "start": interval.start, "stop": interval.stop,
                     "guided_steps": int(guided_steps)},
        "reference": {"name": reference.name, **{k: round(v, 4) for k, v in metrics(ref_images, labels).items()
                                                 if k != "mse"}},
        "rows": rows,
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--guidance", nargs="+", default=None, help="step variants (default: all)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="w of the step benchmark")
    p.add_argument("--step-trajectory", type=int, default=8, help="steps per timed trajectory (step part)")
    p.add_argument("--repeats", type=int, default=None, help="timed trajectories per library and row")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-step", action="store_true", help="skip the step part")
    p.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit-flow"])
    p.add_argument("--e2e-solver", default="DPM++ 2M", choices=["DPM++ 2M", "UniPC"])
    p.add_argument("--e2e-steps", type=int, default=10)
    p.add_argument("--e2e-guidance-scale", type=float, default=2.0, help="as `stepfuse demo`")
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 0.4], metavar=("START", "STOP"),
                   help="interval guidance on steps int(START*N) <= i < int(STOP*N)")
    p.add_argument("--sigma-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="interval guidance where LO < sigma <= HI (overrides --interval)")
    p.add_argument("--zero-init-steps", type=int, default=None,
                   help="CFG-Zero* zero-init steps (default: 1 on flow models, 0 on epsilon models)")
    p.add_argument("--apg-eta", type=float, default=0.0, help="APG's weight of the parallel part (e2e)")
    p.add_argument("--apg-norm-threshold", type=float, default=15.0, help="APG's norm clip r (e2e)")
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 keeps tiny ops out of thread barriers on a loaded machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes, args.repeats = args.shapes[:1], args.repeats or 2
        args.models, args.samples_per_class, args.e2e_repeats = args.models[:1], 1, 1
        args.e2e_steps, args.reference_steps = 5, 10
    args.repeats = args.repeats or 6
    device = torch.device(args.device)
    payload, text = {"step": {"rows": []}}, []

    if not args.no_step:
        rows = payload["step"]["rows"]
        payload["step"].update({"trajectory_steps": args.step_trajectory, "guidance_scale": args.guidance_scale,
                                "solver": "DPM++ 2M", "repeats": args.repeats})
        for label, (guidance, guider) in variants(args.guidance_scale).items():
            if args.guidance and label not in args.guidance:
                continue
            for shape_name in args.shapes:
                for dtype_name in args.dtypes:
                    rows.append(bench_step(shape_name, dtype_name, label, guidance, guider, args, device))
                    print(format_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        text += [f"guided DPM++ 2M step, w={args.guidance_scale} (median of mid-run steps; launches: "
                 f"{'CUDA kernels' if device.type == 'cuda' else 'dispatched non-view ops'})",
                 format_table(rows, list(rows[0])) if rows else "(no rows)"]
        print("\n" + "\n".join(text[-2:]))

    if args.e2e:
        payload["e2e"] = []
        for model_name in args.models:
            report = bench_e2e(model_name, args, device)
            payload["e2e"].append(report)
            it, ref = report["interval"], report["reference"]
            where = (f"sigma in ({it['sigma_interval'][0]}, {it['sigma_interval'][1]}]" if it["sigma_interval"]
                     else f"steps [{it['start']}, {it['stop']}) of the run")
            text += ["", f"{model_name}: {report['solver']} {report['steps']} steps, w={report['guidance_scale']}, "
                     f"{report['samples']} samples, {report['timing']}; interval cfg: {where} "
                     f"({it['guided_steps']} of {report['steps']} steps guided); reference {ref['name']}: "
                     f"accuracy {ref['accuracy']}, fd {ref['fd']}",
                     format_table(report["rows"], list(report["rows"][0]))]
            print("\n".join(text[-3:]), flush=True)

    write_results(args.out, "bench_guidance", device, payload, text)


if __name__ == "__main__":
    main()
