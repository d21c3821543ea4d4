"""Sampling plans: JSON, validation, D-ODE folding, loading into samplers and schedulers, optimisers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import stepfuse.schedulers as sf
from stepfuse import k_diffusion as kd
from stepfuse import plans, schedules
from stepfuse.solvers.plan import SamplingPlan, extrapolate_denoised
from stepfuse.solvers.program import OUTPUT, StepProgram
from stepfuse.testing.accuracy import default_gmm

SIGMA_MAX, SIGMA_MIN = 14.6, 0.03


@pytest.fixture(scope="module")
def gmm():
    return default_gmm()


def _start(gmm, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(batch, generator=g)
    return (x0 + SIGMA_MAX * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


def _error(gmm, out, x):
    ref = gmm.ode_solution(x.double(), SIGMA_MAX, 0.0)
    return float((out.double() - ref).square().mean().sqrt())


# -- the plan object ---------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    plan = SamplingPlan(sigmas=[10.0, 2.0, 0.5, 0.0], scales=[0.0, 0.25, -0.1], shifted_sigmas=[10.0, 2.1, 0.52],
                        solver="dpmpp_2m", metadata={"teacher": "heun"})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = plans.load_plan(path)
    assert loaded == plan and loaded.metadata == plan.metadata
    assert SamplingPlan.from_dict(json.loads(path.read_text())) == plan
    assert loaded.num_steps == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"sigmas": [1.0]}, "at least 2"),
    ({"sigmas": [1.0, 2.0, 0.0]}, "decreasing"),
    ({"sigmas": [1.0, -0.5]}, "positive"),
    ({"sigmas": [float("nan"), 0.0]}, "finite"),
    ({"sigmas": [2.0, 1.0, 0.0], "scales": [0.0, float("inf")]}, "finite"),
    ({"sigmas": [2.0, 1.0, 0.0], "scales": [0.3, 0.1]}, r"scales\[0\]"),
    ({"sigmas": [2.0, 1.0, 0.0], "shifted_sigmas": [2.0]}, "shifted_sigmas must have 2"),
    ({"sigmas": [2.0, 1.0, 0.0], "shifted_sigmas": [2.0, 0.0]}, "shifted_sigmas must be positive"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingPlan(**kwargs)


def test_bad_plan_json():
    with pytest.raises(ValueError, match="JSON"):
        SamplingPlan.from_json("{not json")
    with pytest.raises(ValueError, match="format"):
        SamplingPlan.from_dict({"sigmas": [1.0, 0.0]})
    good = SamplingPlan(sigmas=[1.0, 0.0]).to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        SamplingPlan.from_dict({**good, "extra": 1})
    with pytest.raises(TypeError, match="sigmas"):
        SamplingPlan(sigmas="1, 0")
    with pytest.raises(TypeError, match="plan"):
        kd.sample_euler(lambda x, s: x, torch.zeros(1, 2), None, plan=3)


# -- D-ODE folded into programs ----------------------------------------------------------------
def _dode_model(model, scales):
    """Reference: the model's D replaced by D + l_k (D - mean of earlier D), in plain torch."""
    seen = []

    def wrapped(x, sigma, **kw):
        d = model(x, sigma, **kw).double()
        k = len(seen)
        out = d if k == 0 else d + scales[k] * (d - torch.stack(seen).mean(0))
        seen.append(d)
        return out.to(x.dtype)
    return wrapped


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "lms", "dpmpp_2s_ancestral"])
def test_scales_match_reference(gmm, sampler):
    sigmas = kd.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX)
    n_eval = {"heun": 9, "dpmpp_2s_ancestral": 9}.get(sampler, 5)
    scales = [0.0] + [0.3 * (-1) ** k / (k + 1) for k in range(1, n_eval)]
    plan = SamplingPlan(sigmas=sigmas.tolist(), scales=scales)
    x = _start(gmm, 64, 0)
    extra = {"eta": 0.0} if sampler == "dpmpp_2s_ancestral" else {}
    fn = getattr(kd, f"sample_{sampler}")
    ours = fn(gmm.denoise, x, None, disable=True, plan=plan, **extra)
    ref = fn(_dode_model(gmm.denoise, scales), x, sigmas, disable=True, **extra)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, fn(gmm.denoise, x, sigmas, disable=True, **extra))


def test_scales_with_churn_noise(gmm):
    """Churn adds noise before the first model call; the scales still count only model evaluations."""
    sigmas = kd.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    scales = [0.0, 0.2, -0.1, 0.1]
    x = _start(gmm, 16, 0)
    torch.manual_seed(3)
    ours = kd.sample_euler(gmm.denoise, x, None, s_churn=1.0, disable=True,
                           plan=SamplingPlan(sigmas=sigmas.tolist(), scales=scales))
    torch.manual_seed(3)
    ref = kd.sample_euler(_dode_model(gmm.denoise, scales), x, sigmas, s_churn=1.0, disable=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_extrapolate_program_layout():
    prog = StepProgram.build(1, [(0, {"out": 1.0}), (OUTPUT, {"x": 0.5, "out": 0.5, 0: 0.1})])
    first = extrapolate_denoised(prog, 0.0, 0, 1)
    assert first.num_slots == 3 and first.targets == (2, 0, OUTPUT)
    later = extrapolate_denoised(prog, 0.5, 3, 2, conversion=(1.0, -2.0))
    assert later.num_slots == 4 and later.targets[0] == 2  # reads slot 3, writes slot 2
    with pytest.raises(ValueError, match="evaluation 0"):
        extrapolate_denoised(prog, 0.5, 0, 1)
    with pytest.raises(ValueError, match="slots"):
        extrapolate_denoised(StepProgram.build(7, [(OUTPUT, {"x": 1.0})]), 0.1, 1, 7)


# -- plans that do not fit ---------------------------------------------------------------------
def test_plan_misfits_in_samplers(gmm):
    x = _start(gmm, 8, 0)
    plan = SamplingPlan(sigmas=kd.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).tolist(), scales=[0.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="3 scales but this sampler makes 4"):
        kd.sample_dpmpp_2m(gmm.denoise, x, None, plan=plan, disable=True)
    with pytest.raises(ValueError, match="do not fit"):
        kd.sample_euler(gmm.denoise, x, kd.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX), plan=plan.replace(scales=None))
    shifted = plan.replace(scales=None, shifted_sigmas=list(plan.sigmas[:-1]))
    with pytest.raises(ValueError, match="shifted_sigmas"):
        kd.sample_euler_ancestral(gmm.denoise, x, None, plan=shifted, disable=True)
    with pytest.raises(ValueError, match="s_churn"):
        kd.sample_euler(gmm.denoise, x, None, plan=shifted.replace(shifted_sigmas=[14.0, 5.0, 1.0, 0.1]),
                        s_churn=1.0, disable=True)


def test_plan_misfits_in_schedulers():
    plan = SamplingPlan(sigmas=[14.6, 3.0, 0.5, 0.0], scales=[0.0, 0.2, 0.1])
    with pytest.raises(ValueError, match="cannot install"):
        sf.DDIMScheduler.from_plan(plan)
    with pytest.raises(ValueError, match="shifted_sigmas"):
        sf.DPMSolverMultistepScheduler.from_plan(plan.replace(shifted_sigmas=[14.6, 3.1, 0.6]))
    scheduler = sf.DPMSolverMultistepScheduler.from_plan(plan)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="cannot take"):
        scheduler.set_timesteps(3, timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="2 scales but DPMSolverMultistepScheduler makes 3"):
        scheduler.set_timesteps(plan=plan.replace(scales=[0.0, 0.2]))
    with pytest.raises(ValueError, match="last sigma is positive"):
        sf.SASolverScheduler.from_plan(plan).set_timesteps(None)


# -- plans in the diffusers drop-ins -----------------------------------------------------------
@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "UniPCMultistepScheduler", "LMSDiscreteScheduler", "DEISMultistepScheduler",
                                  "DPMSolverSinglestepScheduler"])
def test_scheduler_installs_plan_sigmas(name):
    plan = SamplingPlan(sigmas=[14.0, 6.0, 2.0, 0.7, 0.2, 0.0])
    scheduler = getattr(sf, name).from_plan(plan, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(None)
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), plan.sigmas, rtol=1e-6)
    assert len(scheduler.timesteps) == 5
    train = schedules.vp_sigmas(scheduler.alphas_cumprod.double().numpy())
    expected = schedules.sigma_to_t(np.asarray(plan.sigmas[:-1]), np.log(train))
    np.testing.assert_allclose(scheduler.timesteps.double().numpy(), expected, atol=0.51)


def test_dpmsolver_plan_matches_k_diffusion(gmm):
    """DPM++(2M) with a plan (schedule + scales): the drop-in and stepfuse.k_diffusion agree."""
    sigmas = kd.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    plan = SamplingPlan(sigmas=sigmas.tolist(), scales=[0.0, 0.4, 0.2, 0.1, -0.1, 0.05])
    x = _start(gmm, 64, 0)
    ours_k = kd.sample_dpmpp_2m(gmm.denoise, x, None, plan=plan, disable=True)
    scheduler = sf.DPMSolverMultistepScheduler.from_plan(plan, beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012)
    scheduler.set_timesteps(6)
    sample = x.clone()  # VP sample at sigma: x_ve * alpha
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        if i == 0:
            sample = x * alpha
        x_ve = sample / alpha
        eps = (x_ve - gmm.denoise(x_ve, sigma)) / sigma
        sample = scheduler.step(eps, t, sample).prev_sample
    torch.testing.assert_close(sample, ours_k, rtol=1e-4, atol=1e-4)


# -- optimisers --------------------------------------------------------------------------------
def test_optimal_schedule_and_scales_cut_error(gmm):
    calibration, held_out = _start(gmm, 256, 1), _start(gmm, 128, 2)
    karras = kd.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX)
    base = _error(gmm, kd.sample_dpmpp_2m(gmm.denoise, held_out, karras, disable=True), held_out)
    dp = plans.optimal_schedule(gmm.denoise, calibration, 5, SIGMA_MIN, SIGMA_MAX, teacher_steps=60)
    assert dp.num_steps == 5 and dp.sigmas[-1] == 0.0 and dp.metadata["teacher_indices"][0] == 0
    distilled = plans.distill_scales(gmm.denoise, calibration, karras, solver="dpmpp_2m", teacher_substeps=8)
    assert distilled.scales[0] == 0.0 and len(distilled.scales) == 5
    err = _error(gmm, plans.run_plan(gmm.denoise, held_out, distilled, "dpmpp_2m"), held_out)
    assert err < 0.7 * base, (err, base)
    # The plan survives JSON and runs in the diffusers drop-in as well.
    again = SamplingPlan.from_json(distilled.to_json())
    assert again.scales == distilled.scales


def test_search_schedule_improves_end_point(gmm):
    calibration = _start(gmm, 128, 1)
    karras = kd.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    found = plans.search_schedule(gmm.denoise, calibration, karras, solver="dpmpp_2m", teacher_steps=40,
                                  max_evaluations=60)
    assert found.sigmas[0] == pytest.approx(float(karras[0])) and found.sigmas[-1] == 0.0
    assert found.metadata["mse_after"] < found.metadata["mse_before"]


def test_time_shift_stays_in_window(gmm):
    calibration = _start(gmm, 128, 1)
    karras = kd.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).tolist()
    shifted = plans.time_shift(gmm.denoise, calibration, karras, solver="euler", window=0.1, teacher_substeps=4)
    assert shifted.shifted_sigmas[0] == karras[0]
    for i in range(1, 5):
        s = shifted.shifted_sigmas[i]
        assert karras[i] * math.exp(-0.1) - 1e-9 <= s <= karras[i] * math.exp(0.1) + 1e-9 and s > karras[i + 1]
    out = plans.run_plan(gmm.denoise, calibration, shifted, "euler")
    assert torch.isfinite(out).all()


def test_bad_optimiser_input(gmm):
    x = _start(gmm, 8, 0)
    with pytest.raises(ValueError, match="solver"):
        plans.distill_scales(gmm.denoise, x, [10.0, 1.0, 0.0], solver="heun")
    with pytest.raises(ValueError, match="num_steps"):
        plans.optimal_schedule(gmm.denoise, x, 0, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="window"):
        plans.time_shift(gmm.denoise, x, [10.0, 1.0, 0.0], window=-1.0)
    with pytest.raises(TypeError, match="model"):
        plans.distill_scales(None, x, [10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="substeps"):
        plans.refine_sigmas([10.0, 1.0, 0.0], 0)


def test_refine_sigmas_keeps_points():
    fine = plans.refine_sigmas([10.0, 2.0, 0.0], 4)
    assert len(fine) == 9 and fine[0] == 10.0 and fine[4] == 2.0 and fine[-1] == 0.0
    assert np.all(np.diff(fine) < 0)


def test_discrete_vp_denoiser_matches_definition():
    acp = torch.from_numpy(schedules.alphas_cumprod_from_betas(
        schedules.betas_for_schedule("scaled_linear", 1000, 0.00085, 0.012, None))).float()
    net = lambda x, t: torch.tanh(x) * (1 + t.reshape(-1, 1, 1) / 1000)  # noqa: E731
    den = plans.DiscreteVPDenoiser(net, acp)
    x, sigma = torch.randn(2, 3, 4), torch.tensor([3.0, 0.5])
    t = torch.from_numpy(schedules.sigma_to_t(sigma.double().numpy(), np.log(((1 - acp.double()) / acp.double()).sqrt().numpy())))
    torch.testing.assert_close(den.sigma_to_t(sigma).double(), t, rtol=1e-6, atol=1e-6)
    c_in = (1 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1)
    expected = x - sigma.reshape(-1, 1, 1) * net(x * c_in, den.sigma_to_t(sigma).float())
    torch.testing.assert_close(den(x, sigma), expected)
    with pytest.raises(ValueError, match="prediction_type"):
        plans.DiscreteVPDenoiser(net, acp, prediction_type="flow")


def test_joint_search_fits_scales(gmm):
    calibration = _start(gmm, 128, 1)
    karras = kd.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    found = plans.search_schedule(gmm.denoise, calibration, karras, solver="dpmpp_2m", teacher_steps=40,
                                  max_evaluations=120, scales=True)
    assert found.scales is not None and len(found.scales) == 4 and found.scales[0] == 0.0
    assert found.metadata["mse_after"] < found.metadata["mse_before"]
    with pytest.raises(TypeError, match="scales"):
        plans.search_schedule(gmm.denoise, calibration, karras, scales=1)


def test_cma_es_minimises_a_rotated_ill_conditioned_quadratic():
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    hessian = rotation @ np.diag(10.0 ** np.arange(6)) @ rotation.T  # condition number 1e5
    target = rng.standard_normal(6)
    f = lambda v: float((v - target) @ hessian @ (v - target))  # noqa: E731
    found, value, evaluations = plans.cma_es(f, np.zeros(6), 0.5, 6000, seed=0)
    assert evaluations <= 6000 and value == pytest.approx(f(found))
    assert value < 1e-8 and np.allclose(found, target, atol=1e-3)
    # a non-finite objective value ranks last instead of breaking the update
    bounded = lambda v: math.inf if v[0] > 1.0 else f(v)  # noqa: E731
    found, value, _ = plans.cma_es(bounded, np.zeros(6), 0.5, 3000, seed=0)
    assert math.isfinite(value) and found[0] <= 1.0


def test_cma_es_search_fits_levels_scales_and_shifts(gmm):
    calibration = _start(gmm, 128, 1)
    held_out = _start(gmm, 256, 0)
    karras = kd.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    nelder = plans.search_schedule(gmm.denoise, calibration, karras, solver="dpmpp_2m", teacher_steps=40,
                                   max_evaluations=300, scales=True)
    found = plans.search_schedule(gmm.denoise, calibration, karras, solver="dpmpp_2m", teacher_steps=40,
                                  max_evaluations=300, scales=True, shifts=True, optimizer="cma-es")
    assert len(found.scales) == 4 and len(found.shifted_sigmas) == 4 and found.sigmas[-1] == 0.0
    assert found.metadata["schedule_search"] == "cma-es end-point error with d-ode scales with shifted levels"
    assert found.metadata["mse_after"] < 0.5 * nelder.metadata["mse_after"]
    # the fit carries over to noise it was not fitted on, and through JSON
    again = SamplingPlan.from_json(found.to_json())
    errors = [_error(gmm, plans.run_plan(gmm.denoise, held_out, p, "dpmpp_2m"), held_out) for p in (nelder, again)]
    assert errors[1] < errors[0], errors
    with pytest.raises(ValueError, match="optimizer"):
        plans.search_schedule(gmm.denoise, calibration, karras, optimizer="bfgs")
    with pytest.raises(TypeError, match="shifts"):
        plans.search_schedule(gmm.denoise, calibration, karras, shifts="yes")
