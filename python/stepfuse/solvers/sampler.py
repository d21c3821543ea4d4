"""The stepfuse denoising loop: any scheduler, any denoiser, guidance fused into the step.

A :class:`Sampler` runs a scheduler's timesteps over a denoiser ``model(x, t, **inputs)``
with conditional / unconditional (/ extra) inputs.  Per step it decides on the host, from
the schedule alone, which branches the guidance needs (a guidance interval or CFG-Zero*'s
zero-init steps skip forward passes entirely), evaluates them in one batched call or one
after the other, and hands them to the scheduler's fused guided step: the guidance maths
costs one reduction pass at most, and no step syncs with the host, so a whole loop can be
captured as one CUDA graph (:meth:`Sampler.capture`).

Schedulers that cannot fuse guidance (diffusers' own, or a stepfuse drop-in with
thresholding or clipping) get the guided output from the same kernels, then their ``step``.
"""

from __future__ import annotations


import inspect
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..cache.runtime import branch as cache_branch
from ..guidance import Guidance, guided_output, prepare_guided

__all__ = ["Sampler", "sample", "CapturedLoop"]


def _as_tensor(out) -> torch.Tensor:
    """Model outputs come as tensors, tuples (``return_dict=False``) or output objects."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"model must return a tensor, a tuple whose first item is one, or an object with .sample; "
                    f"got {type(out).__name__}")


def _merge(name: str, branches: Sequence[dict], path: str = "") -> dict:
    """Keyword inputs of several branches as one batched call: tensors concatenated along
    dim 0, nested dicts merged, anything else required to be equal."""
    merged = {}
    keys = list(branches[0])
    for other in branches[1:]:
        if list(other) != keys and set(other) != set(keys):
            raise ValueError(f"{name}: branch inputs must have the same keys, got {sorted(keys)} and {sorted(other)}")
    for key in keys:
        values = [b[key] for b in branches]
        where = f"{path}{key}"
        if isinstance(values[0], torch.Tensor):
            if not all(isinstance(v, torch.Tensor) and v.shape[1:] == values[0].shape[1:] for v in values):
                raise ValueError(f"{name}: input {where!r} must have the same shape after the batch dim in every branch")
            merged[key] = torch.cat(values, dim=0)
        elif isinstance(values[0], dict):
            merged[key] = _merge(name, values, f"{where}.")
        else:
            if any(v is not values[0] and v != values[0] for v in values[1:]):
                raise ValueError(f"{name}: non-tensor input {where!r} differs between branches")
            merged[key] = values[0]
    return merged


_BRANCH_NAMES = ("cond", "uncond", "extra")


def _step_sigmas(scheduler, timesteps: torch.Tensor) -> np.ndarray:
    """The noise level of each loop step on the host (sigma; t for flow matching)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= len(timesteps):
        return sigmas.detach().to("cpu", torch.float64).numpy()[: len(timesteps)]
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor):
        a = alphas.detach().to("cpu", torch.float64)[timesteps.to("cpu").long()].numpy()
        return np.sqrt((1.0 - a) / a)
    return np.full(len(timesteps), np.nan)


class CapturedLoop:
    """A whole sampling loop captured as one CUDA graph: :meth:`replay` copies new
    latents in and returns the (static) output tensor."""

    def __init__(self, graph, static_latents: torch.Tensor, static_output: torch.Tensor):
        self.graph = graph
        self.static_latents = static_latents
        self.static_output = static_output

    def replay(self, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        if latents is not None:
            if latents.shape != self.static_latents.shape:
                raise ValueError(f"latents must have the captured shape {tuple(self.static_latents.shape)}, "
                                 f"got {tuple(latents.shape)}")
            self.static_latents.copy_(latents)
        self.graph.replay()
        return self.static_output


class Sampler:
    """Runs ``scheduler`` over a denoiser with guidance fused into each step.

    Args:
        scheduler: a scheduler whose ``set_timesteps`` has been called (a stepfuse drop-in
            fuses guidance into its step; any diffusers scheduler works).
        guidance: a :mod:`stepfuse.guidance` config, or None (conditional branch only).
        batch_branches: evaluate the branches a step needs in one batched model call
            (faster) or one after the other (less memory).
        progress: show a tqdm progress bar (a dict: tqdm keyword arguments, as a pipeline's
            ``set_progress_bar_config``; ``{"disable": True}`` hides it).
    """

    def __init__(self, scheduler, guidance: Optional[Guidance] = None, *, batch_branches: bool = True,
                 progress=False):
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "timesteps"):
            raise TypeError(f"scheduler must be a diffusers-style scheduler with step() and timesteps, "
                            f"got {type(scheduler).__name__}")
        if guidance is not None and not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a stepfuse.guidance config or None, got {type(guidance).__name__}")
        self.scheduler = scheduler
        self.guidance = guidance
        self.batch_branches = bool(batch_branches)
        if not isinstance(progress, (bool, dict)):
            raise TypeError(f"progress must be a bool or a dict of tqdm options, got {type(progress).__name__}")
        self.progress = progress

    # -- one run ---------------------------------------------------------------------------------
    def __call__(
        self,
        model: Callable,
        latents: torch.Tensor,
        cond: Optional[dict] = None,
        uncond: Optional[dict] = None,
        extra: Optional[dict] = None,
        shared: Optional[dict] = None,
        callback: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample from ``latents``; returns the final latents.

        ``model(x, t, **inputs)`` returns the raw output the scheduler expects; ``t`` is the
        step's timestep expanded to ``x``'s batch.  ``cond`` / ``uncond`` / ``extra`` are the
        keyword inputs of each branch (batched along dim 0 like ``latents``), ``shared`` those
        common to all (not concatenated).  ``callback(i, t, latents)`` may return new latents.
        """
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        sched = self.scheduler
        timesteps = sched.timesteps
        if timesteps is None or len(timesteps) == 0:
            raise ValueError("scheduler has no timesteps: call set_timesteps before sampling")
        branch_inputs = self._branch_inputs(cond, uncond, extra)
        guidance = self.guidance if self.guidance is not None and self.guidance.enabled else None
        sigmas = self._host_sigmas(timesteps)
        if getattr(sched, "begin_index", 0) is None and hasattr(sched, "set_begin_index"):
            # The loop runs every timestep from the first: saying so spares the scheduler its
            # first-step timestep lookup, a host sync (and illegal under CUDA graph capture).
            sched.set_begin_index(0)
        num_steps = int(getattr(sched, "num_inference_steps", None) or len(timesteps))
        if guidance is not None:
            guidance.check_schedule([float(s) for s in sigmas if np.isfinite(s)])
        fused = guidance is not None and callable(getattr(sched, "fuses_guidance", None)) and sched.fuses_guidance()
        if guidance is not None and guidance.target == "denoised" and not (
                callable(getattr(sched, "has_data_conversion", None)) and sched.has_data_conversion()):
            raise ValueError(f"guidance target='denoised' needs a stepfuse scheduler with a data-prediction "
                             f"conversion; {type(sched).__name__} has none (use target='output')")
        step_kwargs = self._step_kwargs(generator)
        scale_input = getattr(sched, "scale_model_input", None)
        shared = dict(shared or {})
        merged: Dict[int, dict] = {}
        momentum = zeros = None
        x = latents
        bar = self._progress_bar(len(timesteps))
        for i, t in enumerate(timesteps):
            if self.guidance is not None and self.guidance.zero_step(i):
                # CFG-Zero*'s zero-init: the step's output is zero, no model evaluation at all.
                if zeros is None:
                    zeros = torch.zeros_like(x)
                if scale_input is not None:
                    scale_input(x, t)  # schedulers that track the call expect it before every step
                x = sched.step(zeros, t, x, **step_kwargs)[0]
            else:
                active = guidance is not None and guidance.active(i, num_steps, float(sigmas[i]))
                count = guidance.num_branches if active else 1
                x_in = scale_input(x, t) if scale_input is not None else x
                outputs = self._evaluate(model, x_in, t, branch_inputs[:count], shared, merged, i)
                if not active:
                    x = sched.step(outputs[0], t, x, **step_kwargs)[0]
                else:
                    if guidance.uses_momentum and momentum is None:
                        momentum = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                    conversion = sched.guidance_conversion(t) if guidance.target == "denoised" else (0.0, 1.0)
                    if fused:
                        guided = prepare_guided(guidance, x, outputs, momentum, conversion)
                        x = sched.guided_step(guided, t, x, **step_kwargs)[0]
                    else:
                        out = guided_output(guidance, x, outputs, momentum, conversion)
                        x = sched.step(out, t, x, **step_kwargs)[0]
            if callback is not None:
                replaced = callback(i, t, x)
                if replaced is not None:
                    x = replaced
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return x

    def _host_sigmas(self, timesteps: torch.Tensor) -> np.ndarray:
        """Each step's noise level on the host, read once per schedule (not per run: a
        captured run must not copy from the device)."""
        cached = getattr(self, "_sigma_cache", None)
        if cached is None or cached[0] is not timesteps:
            cached = self._sigma_cache = (timesteps, _step_sigmas(self.scheduler, timesteps.detach().to("cpu")))
        return cached[1]

    def _branch_inputs(self, cond, uncond, extra) -> List[dict]:
        for name, value in (("cond", cond), ("uncond", uncond), ("extra", extra)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of model keyword inputs or None, got {type(value).__name__}")
        guidance = self.guidance
        if guidance is not None and guidance.enabled:
            if uncond is None:
                raise ValueError(f"{type(guidance).__name__} needs the unconditional inputs (uncond)")
            if guidance.num_branches == 3 and extra is None:
                raise ValueError(f"{type(guidance).__name__} needs the extra condition's inputs (extra)")
        branches = [cond or {}, uncond or {}]
        if guidance is not None and guidance.num_branches == 3:
            branches.append(extra or {})
        return branches

    def _evaluate(self, model, x, t, inputs: Sequence[dict], shared: dict, merged: Dict[int, dict],
                  step: int) -> List[torch.Tensor]:
        """The branches' raw outputs, batched into one call when ``batch_branches``.

        Each call is named for the feature caches (``stepfuse.cache.branch``): a separate cache per
        CFG branch, and one for each batched composition (guided and unguided steps differ).
        """
        count = len(inputs)
        if count == 1 or not self.batch_branches:
            outputs = []
            for name, kw in zip(_BRANCH_NAMES, inputs):
                with cache_branch(name, step=step):
                    outputs.append(self._call(model, x, t, {**shared, **kw}))
            return outputs
        batched = merged.get(count)
        if batched is None:  # the branches' inputs are the same every step: concatenate once
            batched = merged[count] = {**shared, **_merge("Sampler", list(inputs))}
        with cache_branch(f"batch{count}", step=step):
            out = self._call(model, torch.cat([x] * count, dim=0), t, batched)
        return list(out.chunk(count, dim=0))

    @staticmethod
    def _call(model, x, t, kwargs) -> torch.Tensor:
        timestep = t.to(x.device).expand(x.shape[0]) if isinstance(t, torch.Tensor) else t
        out = _as_tensor(model(x, timestep, **kwargs))
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"model returned batch {out.shape[0]} for an input batch of {x.shape[0]}")
        return out

    def _step_kwargs(self, generator) -> dict:
        kwargs = {"return_dict": False}
        if generator is not None:
            if "generator" not in inspect.signature(self.scheduler.step).parameters:
                raise ValueError(f"{type(self.scheduler).__name__}.step takes no generator")
            kwargs["generator"] = generator
        return kwargs

    def _shows_progress(self) -> bool:
        options = self.progress if isinstance(self.progress, dict) else {}
        return bool(self.progress) and not options.get("disable", False)

    def _progress_bar(self, total: int):
        if not self._shows_progress():
            return None
        from tqdm.auto import tqdm

        options = self.progress if isinstance(self.progress, dict) else {}
        return tqdm(total=total, **{"desc": "stepfuse", **options})

    # -- CUDA graphs -------------------------------------------------------------------------------
    def capture(self, model: Callable, latents: torch.Tensor, **inputs) -> CapturedLoop:
        """Capture a whole run as one CUDA graph (stepfuse schedulers on a CUDA device).

        Runs the loop once on a side stream to warm up, resets the scheduler's run state,
        then records the loop; ``inputs`` are :meth:`__call__`'s keyword arguments.
        """
        if latents.device.type != "cuda":
            raise ValueError(f"capture needs latents on a CUDA device, got {latents.device}")
        reset = getattr(self.scheduler, "_reset_run", None)
        if reset is None:
            raise ValueError(f"capture needs a stepfuse scheduler (its run state resets without a host sync); "
                             f"got {type(self.scheduler).__name__}")
        if self._shows_progress():
            raise ValueError("capture records no progress bar: use progress=False")
        static = latents.clone()
        side = torch.cuda.Stream(device=latents.device)
        side.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(side):
            self(model, static, **inputs)
        torch.cuda.current_stream(latents.device).wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self(model, static, **inputs)
        reset()
        return CapturedLoop(graph, static, output)


def sample(model: Callable, latents: torch.Tensor, scheduler, cond: Optional[dict] = None,
           uncond: Optional[dict] = None, guidance: Optional[Guidance] = None, *, extra: Optional[dict] = None,
           shared: Optional[dict] = None, batch_branches: bool = True, progress=False,
           callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One-call form of :class:`Sampler`: ``Sampler(scheduler, guidance, ...)(model, latents, ...)``."""
    return Sampler(scheduler, guidance, batch_branches=batch_branches, progress=progress)(
        model, latents, cond, uncond, extra, shared, callback, generator)
