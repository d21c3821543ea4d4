"""Feature caches on the GPU: the same decisions and outputs as on the CPU, and a cached loop
captured as one CUDA graph with the skip decided on the device (conditional nodes, no sync)."""

from __future__ import annotations

import pytest
import torch

import stepfuse
import stepfuse.cache as sc
import stepfuse.schedulers as sf
from stepfuse import models

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

POLICIES = [
    sc.FirstBlockCache(threshold=0.1),
    sc.DualBlockCache(front_blocks=2, back_blocks=1, threshold=0.12),
    sc.TeaCache(threshold=0.1),
    sc.FirstBlockCache(threshold=0.1, taylorseer=sc.TaylorSeer(order=2)),
    sc.StaticCache(preset="fast", front_blocks=1),
]
DEVICE_POLICIES = POLICIES[:3]


def _transformer(device):
    model = models.load("digits-dit").transformer.to(device).eval()
    return model


def _model_fn(transformer):
    def model(x, t, class_labels):
        return transformer(x, t, class_labels=class_labels).sample

    return model


def _run(device, policy, steps=20, capture=False):
    torch.manual_seed(0)
    transformer = _transformer(device)
    latents = torch.randn(4, 1, 16, 16).to(device)  # the same noise on every device
    cond = {"class_labels": torch.tensor([1, 3, 5, 7], device=device)}
    uncond = {"class_labels": torch.full((4,), 10, device=device)}
    scheduler = sf.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(steps, device=device)
    sampler = stepfuse.Sampler(scheduler, stepfuse.guidance.ClassifierFreeGuidance(3.0))
    sc.apply(transformer, policy, num_inference_steps=steps)
    if capture:
        loop = sampler.capture(_model_fn(transformer), latents, cond=cond, uncond=uncond)
        out = loop.replay(latents).clone()  # the captured calls' device flags now hold this replay's
    else:
        out = sampler(_model_fn(transformer), latents, cond, uncond)
    stats = sc.stats(transformer)
    sc.remove(transformer)
    return out.cpu(), [d[2] for d in stats.decisions]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@torch.no_grad()
def test_cache_on_cuda_matches_cpu(policy):
    cpu, cpu_decisions = _run("cpu", policy)
    gpu, gpu_decisions = _run("cuda", policy)
    assert any(cpu_decisions), "the policy should cache some steps"
    assert gpu_decisions == cpu_decisions
    torch.testing.assert_close(gpu, cpu, rtol=2e-3, atol=2e-3)


_CONDITIONAL_NODES = hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


@pytest.mark.parametrize("policy", DEVICE_POLICIES, ids=lambda p: type(p).__name__)
@torch.no_grad()
def test_cached_loop_captured_as_cuda_graph(policy):
    if not _CONDITIONAL_NODES:  # this torch cannot record the skip in a graph: it must say so
        with pytest.raises(RuntimeError, match="conditional nodes"):
            _run("cuda", policy, capture=True)
        return
    eager, eager_decisions = _run("cuda", policy)
    replayed, replay_decisions = _run("cuda", policy, capture=True)
    assert any(eager_decisions)
    torch.testing.assert_close(replayed, eager, rtol=2e-3, atol=2e-3)
    # The replay's decisions are the device flags, read only when the stats are asked for.
    assert replay_decisions[-len(eager_decisions):] == eager_decisions


@torch.no_grad()
def test_offload_matches_on_cuda():
    policy = sc.FirstBlockCache(threshold=0.1, taylorseer=sc.TaylorSeer(order=1))
    on_device, _ = _run("cuda", policy)
    offloaded, _ = _run("cuda", sc.FirstBlockCache(threshold=0.1, taylorseer=sc.TaylorSeer(order=1), offload=True))
    torch.testing.assert_close(offloaded, on_device, rtol=0, atol=0)


@torch.no_grad()
def test_memory_released_after_accelerated_call():
    pipe = models.load("digits-dit").to("cuda")
    pipe.set_progress_bar_config(disable=True)
    stepfuse.accelerate(pipe, cache=sc.FirstBlockCache(threshold=0.1))
    before = torch.cuda.memory_allocated()
    pipe(class_labels=[1, 2], num_inference_steps=10, generator=torch.Generator("cuda").manual_seed(0),
         output_type="pt")
    stats = sc.stats(pipe.transformer)
    assert stats.peak_memory_bytes > 0 and stats.memory_bytes == 0
    assert torch.cuda.memory_allocated() <= before + 1024 ** 2
    stepfuse.restore(pipe)
