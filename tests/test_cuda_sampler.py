"""The stepfuse loop on the GPU: fused guidance against the CPU, and a whole loop as one CUDA graph."""

from __future__ import annotations

import pytest
import torch

import stepfuse
import stepfuse.schedulers as sf
from stepfuse import guidance as G

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class TinyDenoiser(torch.nn.Module):
    """A small convolutional denoiser with a class embedding (no host syncs in forward)."""

    def __init__(self, channels: int = 4, classes: int = 11):
        super().__init__()
        self.embed = torch.nn.Embedding(classes, channels)
        self.conv1 = torch.nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, channels, 3, padding=1)

    def forward(self, x, t, label):
        h = x + self.embed(label)[:, :, None, None] + (t.float() / 1000.0)[:, None, None, None]
        return self.conv2(torch.nn.functional.silu(self.conv1(h)))


GUIDANCES = [
    G.ClassifierFreeGuidance(4.0, guidance_rescale=0.5),
    G.AdaptiveProjectedGuidance(4.0, momentum=-0.5, norm_threshold=2.0),
    G.ClassifierFreeZeroStarGuidance(4.0),
    G.ClassifierFreeGuidance(4.0, start=0.2, stop=0.8),
]


def _setup(device, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyDenoiser().to(device=device, dtype=dtype).eval()
    latents = torch.randn(2, 4, 16, 16, dtype=dtype).to(device)  # the same noise on every device
    cond = {"label": torch.tensor([3, 7], device=device)}
    uncond = {"label": torch.tensor([10, 10], device=device)}
    return model, latents, cond, uncond


@pytest.mark.parametrize("guidance", GUIDANCES, ids=lambda g: type(g).__name__)
@torch.no_grad()
def test_sampler_cuda_matches_cpu(guidance):
    results = []
    for device in ("cpu", "cuda"):
        model, latents, cond, uncond = _setup(device)
        scheduler = sf.DPMSolverMultistepScheduler()
        scheduler.set_timesteps(10, device=device)
        results.append(stepfuse.sample(model, latents, scheduler, cond, uncond, guidance).cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("guidance", GUIDANCES, ids=lambda g: type(g).__name__)
@torch.no_grad()
def test_whole_loop_captured_as_cuda_graph(guidance):
    model, latents, cond, uncond = _setup("cuda")
    scheduler = sf.UniPCMultistepScheduler()
    scheduler.set_timesteps(8, device="cuda")
    sampler = stepfuse.Sampler(scheduler, guidance)
    eager = sampler(model, latents, cond, uncond).clone()
    scheduler.set_timesteps(8, device="cuda")
    captured = sampler.capture(model, latents, cond=cond, uncond=uncond)
    torch.testing.assert_close(captured.replay(latents).clone(), eager, rtol=1e-4, atol=1e-4)
    # Replays are the loop: new noise in, a new sample out, matching an eager run from it.
    fresh = torch.randn_like(latents)
    replayed = captured.replay(fresh).clone()
    scheduler.set_timesteps(8, device="cuda")
    torch.testing.assert_close(replayed, sampler(model, fresh, cond, uncond), rtol=1e-4, atol=1e-4)
