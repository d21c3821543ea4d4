"""stepfuse schedulers inside unmodified diffusers pipelines loaded with from_pretrained."""

from __future__ import annotations

import diffusers
import pytest
import torch

import stepfuse.schedulers as sf
from stepfuse.testing.parity import relative_error
from stepfuse.testing.pipelines import save_tiny_ddpm, save_tiny_stable_diffusion

SWAPS = [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("DDIMScheduler", {}),
]


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


def _swap(pipe, name, config, ours: bool):
    module = sf if ours else diffusers
    pipe.scheduler = getattr(module, name).from_config(pipe.scheduler.config, **config)
    return pipe


# DDPMPipeline passes generator= to step(); diffusers' UniPC and Heun take none, so
# those two cannot run in it with diffusers' own classes either.
DDPM_SWAPS = [s for s in SWAPS if s[0] not in ("UniPCMultistepScheduler", "HeunDiscreteScheduler")]


@pytest.mark.parametrize("name, config", DDPM_SWAPS, ids=str)
def test_ddpm_pipeline(ddpm_folder, name, config):
    if not hasattr(sf, name):
        pytest.skip(f"{name} not available")
    pipe = diffusers.DDPMPipeline.from_pretrained(ddpm_folder)
    runs = {}
    for ours in (False, True):
        _swap(pipe, name, config, ours)
        assert isinstance(pipe.scheduler, getattr(sf, name)) == ours
        runs[ours] = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
    assert runs[True].shape == (2, 16, 16, 3)
    assert relative_error(torch.from_numpy(runs[True]), torch.from_numpy(runs[False])) < 1e-4


@pytest.mark.parametrize("name, config", SWAPS, ids=str)
def test_stable_diffusion_pipeline(sd_folder, name, config):
    if not hasattr(sf, name):
        pytest.skip(f"{name} not available")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    runs = {}
    for ours in (False, True):
        _swap(pipe, name, config, ours)
        runs[ours] = pipe("a cat", num_inference_steps=5, guidance_scale=5.0, height=32, width=32,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert runs[True].shape == (1, 3, 32, 32)
    assert relative_error(runs[True], runs[False]) < 1e-4


def test_scheduler_config_round_trip(tmp_path):
    """from_config both ways, and save_pretrained / from_pretrained of a stepfuse scheduler."""
    ours = sf.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    back = sf.DPMSolverMultistepScheduler.from_config(theirs.config)
    assert dict(back.config) == dict(ours.config)
    ours.save_pretrained(tmp_path)
    loaded = sf.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver_order == 3 and loaded.config.use_karras_sigmas
