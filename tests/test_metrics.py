"""Quality metrics: Fréchet distance math, PSNR/MSE, and sanity on real digits and noise."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from stepfuse.metrics import DigitMetrics, frechet_distance, gaussian_stats, mse, psnr  # noqa: E402


def _random_spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(0)
    for d in (1, 3, 17):
        mu_a, mu_b = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
        s_a, s_b = _random_spd(d, gen), _random_spd(d, gen)
        covmean = scipy_linalg.sqrtm(s_a.numpy() @ s_b.numpy()).real
        expected = ((mu_a - mu_b) ** 2).sum().item() + np.trace(s_a.numpy() + s_b.numpy() - 2 * covmean)
        assert frechet_distance((mu_a, s_a), (mu_b, s_b)) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_frechet_distance_of_identical_gaussians_is_zero():
    gen = torch.Generator().manual_seed(1)
    stats = gaussian_stats(torch.randn(50, 8, generator=gen))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)


def test_gaussian_stats_checks_shape():
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(torch.randn(1, 4))


def test_psnr_and_mse():
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(4, 1, 16, 16, generator=gen)
    noisy = (ref + 0.01 * torch.randn(ref.shape, generator=gen)).clamp(0, 1)
    assert mse(ref, ref) == 0.0
    assert psnr(ref, ref) == 100.0
    per_image = ((noisy - ref) ** 2).flatten(1).mean(1).double()
    assert psnr(noisy, ref) == pytest.approx(float((10 * torch.log10(1 / per_image)).mean()), rel=1e-9)
    assert mse(noisy, ref) == pytest.approx(float(((noisy.double() - ref.double()) ** 2).mean()), rel=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(ref, ref[:2])
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        mse(ref[0], ref[0])
    with pytest.raises(TypeError, match="images"):
        mse(ref.numpy(), ref)


@pytest.fixture(scope="module")
def metrics():
    return DigitMetrics()


def test_real_digits_score_near_perfect(metrics):
    real = metrics.real_baseline()
    assert real["accuracy"] >= 0.97 and real["fd_samples"] == (len(metrics.real_labels) + 1) // 2
    # Two disjoint halves of the held-out real digits are close in feature space; noise is far.
    noise = torch.rand(real["fd_samples"], 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert metrics.fd(noise) > 10 * real["fd"]


def test_noise_scores_badly(metrics):
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(200, 1, 16, 16, generator=gen)
    labels = torch.arange(200) % 10
    scores = metrics(noise, labels)
    assert scores["accuracy"] <= 0.3
    single_class = metrics.real_images[metrics.real_labels == 3]
    # A generator that ignores the requested label is caught by accuracy even if its images are real.
    assert metrics.accuracy(single_class, torch.zeros(len(single_class))) <= 0.05


def test_metrics_bad_input(metrics):
    with pytest.raises(ValueError, match="labels has"):
        metrics.accuracy(metrics.real_images[:4], [1, 2])
    with pytest.raises(TypeError, match="floating point"):
        metrics.fd(torch.zeros(4, 1, 16, 16, dtype=torch.uint8))
