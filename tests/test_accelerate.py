"""stepfuse.accelerate / stepfuse.restore on tiny, randomly initialised diffusers pipelines.

Each accelerated run is compared with the unmodified pipeline running diffusers' own scheduler of
the same class and config, from the same initial latents and prompt embeddings.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import stepfuse
import stepfuse.schedulers
from stepfuse.integrations.accelerate import SUPPORTED_PIPELINES
from stepfuse.testing import pipelines as tiny
from stepfuse.testing.parity import relative_error

STEPS = 3


def _flux_embedded():
    pipe, kwargs = tiny.tiny_flux()
    for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        kwargs.pop(name)
    return pipe, {**kwargs, "guidance_scale": 4.0}


def _flux_true_cfg():
    pipe, kwargs = tiny.tiny_flux(guidance_embeds=False)
    return pipe, {**kwargs, "true_cfg_scale": 3.0}


# name -> factory returning (pipe, call kwargs with guidance arguments)
CASES = {
    "class_conditional": lambda: (lambda p, k: (p, {**k, "guidance_scale": 3.0}))(*tiny.tiny_class_conditional()),
    "class_conditional_flow": lambda: (lambda p, k: (p, {**k, "guidance_scale": 2.0}))(
        *tiny.tiny_class_conditional(flow=True)),
    "sd": lambda: (lambda p, k: (p, {**k, "guidance_scale": 5.0, "guidance_rescale": 0.5}))(
        *tiny.tiny_stable_diffusion(batch=2)),
    "sdxl": lambda: (lambda p, k: (p, {**k, "guidance_scale": 4.0}))(*tiny.tiny_stable_diffusion_xl()),
    "flux_embedded": _flux_embedded,
    "flux_true_cfg": _flux_true_cfg,
    "wan": lambda: (lambda p, k: (p, {**k, "guidance_scale": 5.0}))(*tiny.tiny_wan()),
}

PARITY = [(case, "dpmpp_2m") for case in CASES] + [
    ("class_conditional", "deis"), ("class_conditional", "dpmpp_3m"), ("class_conditional_flow", "euler"),
    ("sd", "unipc"), ("sd", "euler"), ("sd", "ddim"), ("sdxl", "euler"),
    ("flux_true_cfg", "euler"), ("flux_embedded", "unipc"), ("wan", "unipc"), ("wan", "euler"),
]


def _output(result):
    images = result[0] if isinstance(result, tuple) else getattr(result, "images", None)
    if images is None:
        images = result.frames
    return torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images


def _run(pipe, kwargs, **extra):
    return _output(pipe(**kwargs, **{"num_inference_steps": STEPS, "output_type": "latent", **extra}))


def _diffusers_twin(scheduler):
    """diffusers' scheduler of the same class and config as a stepfuse drop-in."""
    return getattr(diffusers, type(scheduler).__name__).from_config(scheduler.config)


@pytest.mark.parametrize("case,solver", PARITY, ids=[f"{c}-{s}" for c, s in PARITY])
def test_matches_pipeline_with_diffusers_scheduler(case, solver):
    pipe, kwargs = CASES[case]()
    stepfuse.accelerate(pipe, solver=solver)
    twin = _diffusers_twin(pipe.scheduler)
    ours = _run(pipe, kwargs)
    stepfuse.restore(pipe)
    pipe.scheduler = twin
    theirs = _run(pipe, kwargs)
    assert torch.isfinite(ours).all()
    assert relative_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("solver,scheduler_kwargs", [("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}),
                                                     ("unipc", {"use_karras_sigmas": True})])
def test_generator_and_scheduler_kwargs(solver, scheduler_kwargs):
    """A stochastic solver draws its noise from the call's generator; a solver whose step takes none ignores it."""
    pipe, kwargs = CASES["sd"]()
    stepfuse.accelerate(pipe, solver=solver, **scheduler_kwargs)
    for key, value in scheduler_kwargs.items():
        assert pipe.scheduler.config[key] == value
    twin = _diffusers_twin(pipe.scheduler)
    ours = _run(pipe, kwargs, generator=torch.Generator().manual_seed(7))
    stepfuse.restore(pipe)
    pipe.scheduler = twin
    theirs = _run(pipe, kwargs, generator=torch.Generator().manual_seed(7))
    assert relative_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("case", ["class_conditional", "sd", "sdxl", "flux_true_cfg", "wan"])
def test_decoded_output_and_tuple_return(case):
    pipe, kwargs = CASES[case]()
    stepfuse.accelerate(pipe, batch_branches=False)
    twin = _diffusers_twin(pipe.scheduler)
    ours = _run(pipe, kwargs, output_type="np", return_dict=False)
    stepfuse.restore(pipe)
    pipe.scheduler = twin
    theirs = _run(pipe, kwargs, output_type="np", return_dict=False)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 1e-4


def test_restore_gives_back_class_scheduler_and_results():
    pipe, kwargs = CASES["sd"]()
    cls, scheduler = type(pipe), pipe.scheduler
    before = _run(pipe, kwargs)
    stepfuse.accelerate(pipe, solver="unipc")
    assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    assert isinstance(pipe.scheduler, stepfuse.schedulers.UniPCMultistepScheduler)
    assert stepfuse.restore(pipe) is pipe
    assert type(pipe) is cls and pipe.scheduler is scheduler
    assert torch.equal(_run(pipe, kwargs), before)
    with pytest.raises(ValueError, match="not accelerated"):
        stepfuse.restore(pipe)


def test_accelerate_twice_replaces_settings():
    pipe, kwargs = CASES["class_conditional"]()
    cls, scheduler = type(pipe), pipe.scheduler
    stepfuse.accelerate(pipe, solver="unipc")
    first_class = type(pipe)
    assert stepfuse.accelerate(pipe, solver="dpmpp_2m", steps=2) is pipe
    assert type(pipe) is first_class and type(pipe).__mro__[1] is cls  # one layer, not two
    assert isinstance(pipe.scheduler, stepfuse.schedulers.DPMSolverMultistepScheduler)
    steps = []
    pipe(**kwargs, output_type="latent", callback_on_step_end=lambda p, i, t, kw: steps.append(i))
    assert steps == [0, 1]  # accelerate's steps= is the default num_inference_steps
    stepfuse.restore(pipe)
    assert type(pipe) is cls and pipe.scheduler is scheduler


def test_callback_replaces_latents():
    pipe, kwargs = CASES["sd"]()
    stepfuse.accelerate(pipe)
    seen = []

    def zero_at_end(p, i, t, tensors):
        seen.append(tuple(tensors))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    out = _run(pipe, kwargs, callback_on_step_end=zero_at_end)
    assert seen == [("latents",)] * STEPS and torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipe, kwargs, callback_on_step_end=zero_at_end, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_guidance_config_replaces_call_scale():
    from stepfuse.guidance import ClassifierFreeGuidance

    pipe, kwargs = CASES["sd"]()
    stepfuse.accelerate(pipe, guidance=ClassifierFreeGuidance(guidance_scale=2.0))
    configured = _run(pipe, {**kwargs, "guidance_scale": 9.0, "guidance_rescale": 0.0})
    stepfuse.accelerate(pipe)
    from_call = _run(pipe, {**kwargs, "guidance_scale": 2.0, "guidance_rescale": 0.0})
    assert relative_error(configured, from_call) < 1e-6


def test_unsupported_pipeline_lists_supported_and_drop_in_still_works(tmp_path):
    pipe = diffusers.DDPMPipeline.from_pretrained(tiny.save_tiny_ddpm(tmp_path / "ddpm"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="DDPMPipeline") as err:
        stepfuse.accelerate(pipe)
    assert all(name in str(err.value) for name in SUPPORTED_PIPELINES)
    assert type(pipe) is diffusers.DDPMPipeline
    pipe.scheduler = stepfuse.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("case,component,match", [
    ("sd", "vae", "pipe.vae"), ("sd", "unet", "pipe.unet"), ("flux_embedded", "transformer", "pipe.transformer"),
    ("wan", "vae", "pipe.vae"), ("class_conditional", "unet", "pipe.unet or pipe.transformer"),
])
def test_missing_component(case, component, match):
    pipe, kwargs = CASES[case]()
    setattr(pipe, component, None)
    with pytest.raises(ValueError, match=match):
        stepfuse.accelerate(pipe)


def test_component_removed_after_accelerate():
    pipe, kwargs = CASES["sdxl"]()
    stepfuse.accelerate(pipe)
    pipe.vae = None
    with pytest.raises(ValueError, match="pipe.vae"):
        _run(pipe, kwargs)


@pytest.mark.parametrize("case,solver,match", [
    ("sd", "dpmpp_9m", "solver must be one of"), ("flux_embedded", "ddim", "does not support flow"),
    ("wan", "ddim", "does not support flow"),
])
def test_bad_solver(case, solver, match):
    pipe, _ = CASES[case]()
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match=match):
        stepfuse.accelerate(pipe, solver=solver)
    assert pipe.scheduler is scheduler  # nothing installed


@pytest.mark.parametrize("kwargs,error", [
    ({"steps": 0}, ValueError), ({"steps": 2.5}, ValueError), ({"solver": 3}, TypeError),
    ({"batch_branches": "yes"}, TypeError), ({"guidance": 7.5}, TypeError),
])
def test_bad_arguments(kwargs, error):
    pipe, _ = CASES["class_conditional"]()
    with pytest.raises(error):
        stepfuse.accelerate(pipe, **kwargs)


def test_unsupported_call_argument():
    pipe, kwargs = CASES["sd"]()
    stepfuse.accelerate(pipe)
    with pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        _run(pipe, kwargs, ip_adapter_image_embeds=[torch.zeros(2, 1, 4)])


def test_flow_solvers_use_the_pipeline_shift():
    """Flux's dynamic shift (mu from the image sequence length) and Wan's static flow_shift reach the drop-ins."""
    pipe, kwargs = CASES["flux_embedded"]()
    stepfuse.accelerate(pipe, solver="dpmpp_2m")
    cfg = pipe.scheduler.config
    assert cfg.use_flow_sigmas and cfg.prediction_type == "flow_prediction" and cfg.use_dynamic_shifting
    pipe, kwargs = CASES["wan"]()
    stepfuse.accelerate(pipe, solver="euler")
    assert isinstance(pipe.scheduler, stepfuse.schedulers.FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0


def test_two_condition_guidance_refused():
    from stepfuse.guidance import DualClassifierFreeGuidance

    pipe, _ = CASES["sd"]()
    with pytest.raises(ValueError, match="second condition"):
        stepfuse.accelerate(pipe, guidance=DualClassifierFreeGuidance(guidance_scale=5.0))
