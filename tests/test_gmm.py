"""Tests of the analytic Gaussian-mixture diffusion model (stepfuse.testing.GaussianMixture)."""

import math

import pytest
import torch

from stepfuse.testing import GaussianMixture


def _mixture(name):
    if name == "1d_two":
        return GaussianMixture(torch.tensor([[-2.0], [1.5]]), [0.5, 0.8], [0.3, 0.7])
    if name == "3x4_three_with_point_mass":
        return GaussianMixture(torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1)), [0.7, 0.0, 1.2], [1, 2, 1])
    if name == "random_5x2x3":
        return GaussianMixture.random(5, (2, 3), seed=3)
    raise KeyError(name)


MIXTURES = ["1d_two", "3x4_three_with_point_mass", "random_5x2x3"]


def _points(gmm, batch, sigma, seed=0):
    return gmm.sample_noisy(batch, sigma, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- denoiser / score / log_prob
@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("sigma", [0.05, 0.7, 10.0, "per_batch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_denoise_is_tweedie(name, sigma, dtype):
    gmm = _mixture(name)
    batch = 7
    if sigma == "per_batch":
        sigma = torch.logspace(-1.5, 1.5, batch, dtype=torch.float64)
        sig_b = sigma
    else:
        sig_b = torch.full((batch,), sigma, dtype=torch.float64)
    x = _points(gmm, batch, sig_b).to(dtype)
    d = gmm.denoise(x, sigma)
    s = gmm.score(x, sigma)
    assert d.dtype == dtype and s.dtype == dtype and d.shape == x.shape
    expand = sig_b.reshape(-1, *[1] * len(gmm.data_shape))
    expected = x.double() + expand**2 * s.double()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(d.double(), expected, rtol=tol, atol=tol * (1 + float(expand.max()) ** 2))


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0])
def test_score_is_grad_log_prob(name, sigma):
    gmm = _mixture(name)
    x = _points(gmm, 6, sigma).requires_grad_(True)
    log_p = gmm.log_prob(x, sigma)
    assert log_p.shape == (6,)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(gmm.score(x.detach(), sigma), grad, rtol=1e-10, atol=1e-10)


def test_sigma_shapes_are_equivalent():
    gmm = _mixture("3x4_three_with_point_mass")
    x = _points(gmm, 4, 1.0)
    ref = gmm.denoise(x, 0.8)
    f64 = dict(dtype=torch.float64)
    for sigma in (torch.tensor(0.8, **f64), torch.tensor([0.8], **f64), torch.full((4,), 0.8, **f64), torch.full((4, 1, 1), 0.8, **f64)):
        torch.testing.assert_close(gmm.denoise(x, sigma), ref, rtol=0, atol=0)


def test_denoise_at_sigma_zero_is_identity():
    gmm = _mixture("3x4_three_with_point_mass")
    x = _points(gmm, 5, 1.0)
    torch.testing.assert_close(gmm.denoise(x, 0.0), x, rtol=0, atol=0)
    sigmas = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    d = gmm.denoise(x, sigmas)
    torch.testing.assert_close(d[sigmas == 0], x[sigmas == 0], rtol=0, atol=0)
    torch.testing.assert_close(d[1:2], gmm.denoise(x[1:2], 1.0))


def test_far_away_points_are_stable():
    gmm = _mixture("1d_two")
    x = torch.tensor([[-1e4], [1e4], [0.0]], dtype=torch.float64)
    for sigma in (1e-3, 1.0):
        d = gmm.denoise(x, sigma)
        assert torch.isfinite(d).all() and torch.isfinite(gmm.log_prob(x, sigma)).all()
    # Both tails belong to the wider component (s = 0.8).
    s2 = gmm.stds**2
    torch.testing.assert_close(d[0, 0], 1.5 + s2[1] / (s2[1] + 1) * (-1e4 - 1.5))
    torch.testing.assert_close(d[1, 0], 1.5 + s2[1] / (s2[1] + 1) * (1e4 - 1.5))


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_denoise_matches_monte_carlo_posterior_mean(sigma):
    gmm = _mixture("1d_two")
    x0 = gmm.sample(400_000, generator=torch.Generator().manual_seed(0))[:, 0]
    queries = torch.tensor([[-2.5], [-0.3], [0.4], [2.0]], dtype=torch.float64)
    # E[x0 | x] = E_{x0 ~ p0}[x0 N(x; x0, sigma^2)] / E_{x0 ~ p0}[N(x; x0, sigma^2)]
    log_lik = -0.5 * ((queries - x0[None, :]) / sigma) ** 2
    weight = torch.softmax(log_lik, dim=1)
    estimate = (weight * x0[None, :]).sum(1, keepdim=True)
    torch.testing.assert_close(gmm.denoise(queries, sigma), estimate, rtol=0, atol=2e-2)


@pytest.mark.parametrize("data_shape", [(1,), (2, 3)])
@pytest.mark.parametrize("sigma", [0.0, 0.3, 4.0])
def test_single_gaussian_closed_form(data_shape, sigma):
    mu = torch.randn(1, *data_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 0.6
    gmm = GaussianMixture(mu, s)
    x = torch.randn(5, *data_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    var = s**2 + sigma**2
    torch.testing.assert_close(gmm.denoise(x, sigma), mu + s**2 / var * (x - mu), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.score(x, sigma), -(x - mu) / var, rtol=1e-12, atol=1e-12)
    dim = math.prod(data_shape)
    expected = -0.5 * dim * math.log(2 * math.pi * var) - 0.5 * ((x - mu) ** 2).flatten(1).sum(1) / var
    torch.testing.assert_close(gmm.log_prob(x, sigma), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ["1d_two", "random_5x2x3"])
@pytest.mark.parametrize("sigma", [None, 1.5])
def test_sample_moments(name, sigma):
    gmm = _mixture(name)
    n = 200_000
    gen = torch.Generator().manual_seed(2)
    x = gmm.sample(n, generator=gen) if sigma is None else gmm.sample_noisy(n, sigma, generator=gen)
    assert x.shape == (n, *gmm.data_shape) and x.dtype == torch.float64
    var = gmm.variance + (0.0 if sigma is None else sigma**2)
    se = torch.sqrt(var / n)
    assert ((x.mean(0) - gmm.mean).abs() < 5 * se).all()
    # Var of the sample variance is <= (kurtosis) var^2 / n; 5% is many standard errors here.
    torch.testing.assert_close(x.var(0), var, rtol=0.05, atol=0)


def test_sample_is_reproducible_and_respects_dtype():
    gmm = _mixture("random_5x2x3")
    a = gmm.sample(10, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    b = gmm.sample(10, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert gmm.sample(0).shape == (0, 2, 3)


def test_random_is_reproducible_and_separated():
    a, b = GaussianMixture.random(4, 1, seed=7), GaussianMixture.random(4, 1, seed=7)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and torch.equal(a.weights, b.weights)
    assert torch.pdist(a.means.flatten(1)).min() >= 2 * a.stds.max()
    assert not torch.equal(a.means, GaussianMixture.random(4, 1, seed=8).means)
    torch.testing.assert_close(a.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------- VP / flow model outputs
def _vp(t):
    return math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)


# v-prediction inverts with alpha^2 + sigma^2 = 1, flow velocity with alpha = 1 - s, sigma = s.
SCHEDULED_TYPES = [("vp", "epsilon"), ("vp", "sample"), ("vp", "v_prediction")]
SCHEDULED_TYPES += [("flow", "epsilon"), ("flow", "sample"), ("flow", "flow_prediction")]


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("schedule,prediction_type", SCHEDULED_TYPES)
def test_model_output_inverts(name, t, schedule, prediction_type):
    gmm = _mixture(name)
    alpha, sigma = _vp(t) if schedule == "vp" else (1 - t, t)
    x0_true = gmm.sample(6, generator=torch.Generator().manual_seed(3))
    eps_true = torch.randn(x0_true.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_t = alpha * x0_true + sigma * eps_true
    out = gmm.model_output(x_t, alpha, sigma, prediction_type)
    # Invert the parameterisation the way a solver does.
    if prediction_type == "epsilon":
        x0 = (x_t - sigma * out) / alpha
    elif prediction_type == "sample":
        x0 = out
    elif prediction_type == "v_prediction":  # alpha^2 + sigma^2 = 1
        x0 = alpha * x_t - sigma * out
    else:  # x_t - s (eps - x0) = x0 for alpha = 1 - s, sigma = s
        x0 = x_t - sigma * out
    expected = gmm.denoise(x_t / alpha, sigma / alpha)
    torch.testing.assert_close(x0, expected, rtol=1e-9, atol=1e-9)
    # The noise prediction is consistent with the data prediction.
    eps = gmm.model_output(x_t, alpha, sigma, "epsilon")
    torch.testing.assert_close(alpha * expected + sigma * eps, x_t, rtol=1e-9, atol=1e-9)


def test_model_output_per_batch_and_dtype():
    gmm = _mixture("random_5x2x3")
    alphas = torch.tensor([0.9, 0.5, 0.1])
    sigmas = torch.sqrt(1 - alphas**2)
    x_t = gmm.sample_noisy(3, 1.0, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = gmm.model_output(x_t, alphas, sigmas, "v_prediction")
    assert out.dtype == torch.float32
    for i in range(3):
        row = gmm.model_output(x_t[i : i + 1], float(alphas[i]), float(sigmas[i]), "v_prediction")
        torch.testing.assert_close(out[i : i + 1], row)


@pytest.mark.parametrize("name", MIXTURES)
def test_flow_at_pure_noise(name):
    gmm = _mixture(name)
    x_t = gmm.sample_noisy(4, 1.0, generator=torch.Generator().manual_seed(0))
    x0 = gmm.model_output(x_t, 0.0, 1.0, "sample")
    torch.testing.assert_close(x0, gmm.mean.expand_as(x_t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.model_output(x_t, 0.0, 1.0, "epsilon"), x_t, rtol=1e-12, atol=1e-12)
    # Continuous in s -> 1.
    s = 1 - 1e-7
    near = gmm.model_output(x_t, 1 - s, s, "flow_prediction")
    torch.testing.assert_close(near, gmm.model_output(x_t, 0.0, 1.0, "flow_prediction"), rtol=1e-5, atol=1e-5)


def test_model_output_at_clean_input():
    gmm = _mixture("1d_two")
    x = gmm.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gmm.model_output(x, 1.0, 0.0, "sample"), x)
    torch.testing.assert_close(gmm.model_output(x, 1.0, 0.0, "epsilon"), torch.zeros_like(x))
    point_mass = _mixture("3x4_three_with_point_mass")
    y = point_mass.sample(2)
    torch.testing.assert_close(point_mass.model_output(y, 0.5, 0.0, "sample"), y / 0.5)
    with pytest.raises(ValueError, match="sigma"):
        point_mass.model_output(y, 1.0, 0.0, "epsilon")


# ---------------------------------------------------------------- probability-flow ODE
@pytest.mark.parametrize("data_shape", [(1,), (2, 3)])
@pytest.mark.parametrize("sigma_T,sigma_end", [(80.0, 0.0), (10.0, 0.3), (0.5, 0.0), (0.3, 10.0)])
def test_ode_single_gaussian_closed_form(data_shape, sigma_T, sigma_end):
    mu = torch.randn(1, *data_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 0.7
    gmm = GaussianMixture(mu, s)
    x_T = gmm.sample_noisy(5, sigma_T, generator=torch.Generator().manual_seed(1))
    out = gmm.ode_solution(x_T, sigma_T, sigma_end)
    # Karras et al. 2022 eq. 1 for a Gaussian: x - mu scales with the marginal std.
    expected = mu + (x_T - mu) * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_T**2)
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)


def test_ode_pushes_noise_to_data():
    gmm = _mixture("1d_two")
    sigma_T = 20.0
    x_T = gmm.sample_noisy(2000, sigma_T, generator=torch.Generator().manual_seed(0))
    x_0 = gmm.ode_solution(x_T, sigma_T, 0.0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x_0.mean(0), gmm.mean, rtol=0, atol=0.15)
    torch.testing.assert_close(x_0.var(0), gmm.variance, rtol=0.1, atol=0)
    # The ODE is a deterministic transport: the fraction ending in each mode matches the weights.
    right = (x_0[:, 0] > -0.25).double().mean()
    assert abs(float(right) - float(gmm.weights[1])) < 0.04


@pytest.mark.parametrize("name", MIXTURES)
def test_ode_tolerance_convergence(name):
    gmm = _mixture(name)
    sigma_T = 10.0
    x_T = gmm.sample_noisy(8, sigma_T, generator=torch.Generator().manual_seed(0))
    loose = gmm.ode_solution(x_T, sigma_T, 0.0, rtol=1e-6, atol=1e-6)
    tight = gmm.ode_solution(x_T, sigma_T, 0.0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loose, tight, rtol=0, atol=1e-5)


def test_ode_returns_like_input_and_is_reversible():
    gmm = _mixture("random_5x2x3")
    x_T = gmm.sample_noisy(3, 5.0, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = gmm.ode_solution(x_T, torch.tensor(5.0), 0.5)
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    back = gmm.ode_solution(out.double(), 0.5, 5.0)
    torch.testing.assert_close(back, x_T.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gmm.ode_solution(x_T, 5.0, 5.0), x_T)


# ---------------------------------------------------------------- bad input
def test_weights_are_normalised():
    gmm = GaussianMixture(torch.zeros(2, 1), 1.0, [1.0, 3.0])
    torch.testing.assert_close(gmm.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(GaussianMixture(torch.zeros(4, 1), 1.0).weights, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(means=torch.zeros(3), stds=1.0), "means"),
        (dict(means=torch.zeros(0, 2), stds=1.0), "means"),
        (dict(means=[[0.0], [float("nan")]], stds=1.0), "means"),
        (dict(means=torch.zeros(2, 1), stds=-1.0), "stds"),
        (dict(means=torch.zeros(2, 1), stds=[1.0, -0.1]), "stds"),
        (dict(means=torch.zeros(2, 1), stds=[1.0, 1.0, 1.0]), "stds"),
        (dict(means=torch.zeros(2, 1), stds=1.0, weights=[0.5]), "weights"),
        (dict(means=torch.zeros(2, 1), stds=1.0, weights=[1.5, -0.5]), "weights"),
        (dict(means=torch.zeros(2, 1), stds=1.0, weights=[0.0, 0.0]), "weights"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_constructor_rejects_non_numeric():
    with pytest.raises(TypeError, match="means"):
        GaussianMixture("abc", 1.0)


def test_methods_reject_bad_input():
    gmm = _mixture("3x4_three_with_point_mass")
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 4\]"):
        gmm.denoise(torch.zeros(2, 4, 3), 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        gmm.denoise(torch.zeros(3, 4), 1.0)
    with pytest.raises(TypeError, match="x"):
        gmm.denoise(torch.zeros(2, 3, 4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gmm.denoise(x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        gmm.denoise(x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        gmm.score(x, float("inf"))
    with pytest.raises(ValueError, match="sigma"):
        gmm.log_prob(x, 0.0)  # point-mass component has no density at sigma = 0
    with pytest.raises(ValueError, match="prediction_type"):
        gmm.model_output(x, 0.5, 0.5, "eps")
    with pytest.raises(ValueError, match="alpha_t"):
        gmm.model_output(x, -0.5, 0.5, "epsilon")
    with pytest.raises(ValueError, match="alpha_t and sigma_t"):
        gmm.model_output(x, 0.0, 0.0, "sample")
    with pytest.raises(ValueError, match="x_t must have shape"):
        gmm.model_output(torch.zeros(2, 12), 0.5, 0.5, "sample")
    with pytest.raises(ValueError, match="sigma_T"):
        gmm.ode_solution(x, 0.0)
    with pytest.raises(ValueError, match="sigma_T"):
        gmm.ode_solution(x, torch.ones(2))
    with pytest.raises(ValueError, match="sigma_end"):
        gmm.ode_solution(x, 1.0, -0.5)
    with pytest.raises(ValueError, match="x_T"):
        gmm.ode_solution(torch.full((2, 3, 4), float("nan")), 1.0)
    with pytest.raises(ValueError, match="n must"):
        gmm.sample(-1)
    with pytest.raises(ValueError, match="sigma"):
        gmm.sample_noisy(3, torch.ones(2))
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixture.random(0, 2)
    with pytest.raises(ValueError, match="spread"):
        GaussianMixture.random(50, 1, spread=0.1, std=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gmm = _mixture("random_5x2x3")
    x = _points(gmm, 4, 1.0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(gmm.denoise(x.cuda(), sigma.cuda()).cpu(), gmm.denoise(x, sigma))
    out = gmm.model_output(x.cuda().float(), 0.6, 0.8, "v_prediction")
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), gmm.model_output(x.float(), 0.6, 0.8, "v_prediction"))
    y = gmm.sample(8, generator=torch.Generator("cuda").manual_seed(0))
    assert y.is_cuda and y.shape == (8, 2, 3)
    assert gmm.ode_solution(x.cuda(), 1.0).is_cuda
