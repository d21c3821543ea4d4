"""Drive two schedulers over the same trajectory to compare them (parity tests, benchmarks)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Error a low-precision run may have against fp32, relative to the reference implementation's own.
LOW_PRECISION_SLACK = 2.0
FP32_RTOL = 1e-5


def smooth_model(x: torch.Tensor, t) -> torch.Tensor:
    """A cheap deterministic stand-in for a network: smooth in ``x``, varying with ``t``.

    Output scale ~1 like an epsilon/velocity prediction, so trajectories stay bounded.
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).float()
    phase = torch.cos(t / 250.0)
    xf = x.float()
    return (0.6 * torch.tanh(xf) * phase + 0.3 * torch.sin(1.7 * xf + t / 100.0)).to(x.dtype)


def run_trajectory(
    scheduler,
    sample: torch.Tensor,
    num_inference_steps: Optional[int] = None,
    model: Callable = smooth_model,
    seed: Optional[int] = None,
    set_timesteps_kwargs: Optional[dict] = None,
    step_kwargs: Optional[dict] = None,
    begin_index: Optional[int] = None,
) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline: returns the final sample.

    ``seed`` seeds one ``torch.Generator`` passed to every ``step`` (stochastic schedulers
    then draw identical noise when both use diffusers' ``randn_tensor``).
    """
    kwargs = dict(set_timesteps_kwargs or {})
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    scheduler.set_timesteps(device=sample.device, **kwargs)
    timesteps = scheduler.timesteps
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
        timesteps = timesteps[begin_index:]
    generator = torch.Generator(device=sample.device).manual_seed(seed) if seed is not None else None
    # Flow-matching schedulers have neither init_noise_sigma nor scale_model_input: no scaling.
    x = sample * getattr(scheduler, "init_noise_sigma", 1.0) if begin_index is None else sample
    scale_model_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in timesteps:
        model_input = scale_model_input(x, t)
        out = model(model_input, t)
        extra = dict(step_kwargs or {})
        if generator is not None:
            extra["generator"] = generator
        x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
    return x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def assert_scheduler_parity(
    ours_cls,
    theirs_cls,
    config: dict,
    num_inference_steps: Optional[int] = 10,
    shape=(2, 4, 8, 8),
    dtype: torch.dtype = torch.float32,
    seed: Optional[int] = None,
    set_timesteps_kwargs: Optional[dict] = None,
    begin_index: Optional[int] = None,
    model: Callable = smooth_model,
    step_kwargs: Optional[dict] = None,
    device: str = "cpu",
) -> None:
    """Run diffusers' scheduler and stepfuse's with the same model over a whole trajectory.

    fp32: final states agree to :data:`FP32_RTOL` relative. Low precision: stepfuse's error
    against diffusers' fp32 run is at most :data:`LOW_PRECISION_SLACK` times diffusers' own.
    ``seed`` shares the noise of stochastic schedulers; ``step_kwargs`` go to every ``step`` call.
    """
    ours = ours_cls(**config)
    theirs = theirs_cls.from_config(ours.config)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    run = dict(num_inference_steps=num_inference_steps, seed=seed, model=model,
               set_timesteps_kwargs=set_timesteps_kwargs, begin_index=begin_index, step_kwargs=step_kwargs)
    assert torch.equal(_timesteps_after(ours, num_inference_steps, set_timesteps_kwargs),
                       _timesteps_after(theirs, num_inference_steps, set_timesteps_kwargs))
    reference = run_trajectory(theirs, x_T.clone(), **run)
    if dtype == torch.float32:
        got = run_trajectory(ours, x_T.clone(), **run)
        err = relative_error(got, reference)
        if err <= FP32_RTOL:
            return
        # Ill-conditioned trajectories (one step from sigma_max in noise-prediction form, say)
        # amplify fp32 rounding in both implementations: there stepfuse must be at most twice
        # as far from diffusers' float64 run as diffusers' own fp32 run is.
        exact = run_trajectory(theirs, x_T.double(), **run)
        err64, their_err64 = relative_error(got, exact), relative_error(reference, exact)
        assert err64 <= LOW_PRECISION_SLACK * their_err64, (
            f"relative error {err:.2e} vs diffusers > {FP32_RTOL}, and {err64:.2e} vs its float64 run "
            f"> {LOW_PRECISION_SLACK} x its own fp32 error {their_err64:.2e}"
        )
        return
    theirs_low = run_trajectory(theirs, x_T.to(dtype), **run)
    got = run_trajectory(ours, x_T.to(dtype), **run)
    assert got.dtype == dtype
    err, their_err = relative_error(got, reference), relative_error(theirs_low, reference)
    bound = LOW_PRECISION_SLACK * their_err + 1e-6
    assert err <= bound, f"{dtype} error {err:.2e} > {LOW_PRECISION_SLACK} x diffusers' own {their_err:.2e}"


def _timesteps_after(scheduler, num_inference_steps, set_timesteps_kwargs) -> torch.Tensor:
    kwargs = dict(set_timesteps_kwargs or {})
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    scheduler.set_timesteps(**kwargs)
    return scheduler.timesteps.detach().cpu().double()


def assert_same_construction(ours_cls, theirs_cls, ours):
    """``from_config`` both ways, the same order and length, identical beta tables.

    Returns diffusers' scheduler built from ``ours.config`` for further comparisons.
    """
    theirs = theirs_cls.from_config(ours.config)
    back = ours_cls.from_config(theirs.config)
    assert type(back) is ours_cls
    assert dict(back.config) == dict(ours.config)
    assert ours.order == theirs.order and len(ours) == len(theirs)
    for attr in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, attr), getattr(theirs, attr)), attr
    return theirs
