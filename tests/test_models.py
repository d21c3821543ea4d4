"""Bundled tiny models: loading, the class-conditional pipeline, and the training script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from diffusers import DiTTransformer2DModel, UNet2DModel  # noqa: E402

from stepfuse import models  # noqa: E402
from stepfuse.models.pipeline import ClassConditionalPipeline  # noqa: E402
from stepfuse.schedulers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"digits-unet": UNet2DModel, "digits-dit": DiTTransformer2DModel, "digits-dit-flow": DiTTransformer2DModel}


def test_list_names_every_bundled_model():
    assert models.list() == sorted(EXPECTED)


def test_bundled_weights_fit_the_size_budget():
    files = [p for p in models.MODELS_DIR.rglob("*") if p.suffix in (".safetensors", ".json")]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_gives_a_working_pipeline(name):
    pipe = models.load(name)
    assert isinstance(pipe, ClassConditionalPipeline)
    assert isinstance(pipe.denoiser, EXPECTED[name])
    assert pipe.denoiser.dtype == torch.float32
    assert pipe.num_classes == 10 and pipe.null_class_label == 10
    assert pipe.sample_shape == (1, 16, 16)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 7], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    info = models.info(name)
    assert info["name"] == name and info["train_seconds"] <= 20 * 60


def test_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.load("nope")
    with pytest.raises(TypeError, match="name"):
        models.path(3)


@pytest.fixture(scope="module")
def unet_pipe():
    pipe = models.load("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_output_types_and_callback(unet_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"]}

    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    pt = unet_pipe(3, num_inference_steps=4, generator=gen(), output_type="pt", callback_on_step_end=callback).images
    assert seen == [0, 1, 2, 3]
    arr = unet_pipe(3, num_inference_steps=4, generator=gen(), output_type="np").images
    assert arr.shape == (1, 16, 16, 1)
    torch.testing.assert_close(torch.from_numpy(arr).permute(0, 3, 1, 2), pt)
    pil = unet_pipe(3, num_inference_steps=4, generator=gen()).images
    assert pil[0].size == (16, 16)
    raw = unet_pipe(3, num_inference_steps=4, generator=gen(), output_type="latent").images
    torch.testing.assert_close((raw / 2 + 0.5).clamp(0, 1), pt)
    two = unet_pipe([1, 2], num_images_per_label=2, num_inference_steps=2, output_type="pt").images
    assert two.shape[0] == 4


def test_pipeline_gives_the_same_images_with_diffusers_and_stepfuse_ddim(unet_pipe):
    config = unet_pipe.scheduler.config
    latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = {}
    for cls in (DiffusersDDIM, DDIMScheduler):
        unet_pipe.scheduler = cls.from_config(config)
        out[cls.__module__] = unet_pipe([0, 1, 2, 3], num_inference_steps=10, latents=latents, output_type="pt").images
    a, b = out.values()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pipeline_custom_timesteps_and_guidance_off(unet_pipe):
    unet_pipe.scheduler = DPMSolverMultistepScheduler.from_config(unet_pipe.scheduler.config)
    latents = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a = unet_pipe(5, timesteps=[999, 600, 300, 100], latents=latents, output_type="pt").images
    assert torch.isfinite(a).all()
    b = unet_pipe(5, guidance_scale=1.0, num_inference_steps=4, latents=latents, output_type="pt").images
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"class_labels": 10}, ValueError, "class_labels"),
        ({"class_labels": "3"}, TypeError, "class_labels"),
        ({"class_labels": 1, "output_type": "jpg"}, ValueError, "output_type"),
        ({"class_labels": 1, "num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"class_labels": 1, "num_images_per_label": 0}, ValueError, "num_images_per_label"),
        ({"class_labels": 1, "latents": torch.zeros(2, 1, 16, 16)}, ValueError, "latents"),
        ({"class_labels": 1, "callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback"),
    ],
)
def test_pipeline_bad_input(unet_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        unet_pipe(**kwargs)


def test_pipeline_needs_exactly_one_denoiser(unet_pipe):
    with pytest.raises(ValueError, match="exactly one"):
        ClassConditionalPipeline(scheduler=unet_pipe.scheduler)


def test_training_script_smoke(tmp_path):
    """A few optimiser steps of each recipe write loadable diffusers folders and a classifier."""
    pytest.importorskip("sklearn")
    script = REPO / "benchmarks" / "train_tiny.py"
    cmd = [sys.executable, str(script), "classifier", "digits-dit-flow", "--steps", "2", "--out", str(tmp_path),
           "--log-every", "1", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((tmp_path / "digits-dit-flow.train.json").read_text())
    assert log["steps"] == 2 and log["objective"] == "flow"
    pipe = ClassConditionalPipeline.from_pretrained(str(tmp_path / "digits-dit-flow"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (tmp_path / "digits-classifier" / "config.json").is_file()
    assert (tmp_path / "digits-heldout.safetensors").is_file()
