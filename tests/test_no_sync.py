"""``step()`` of every drop-in scheduler makes no host synchronisation and no coefficient math on tensors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stepfuse.schedulers as sf
from stepfuse.testing.devices import device_params

DEVICES = device_params()
# Ops that read a tensor's value on the host: each one waits for the device.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "allclose"}
# Ops that are allowed inside step(): the fused kernel, noise drawing, allocation.
ALLOWED = {"solver_step", "empty", "empty_like", "empty_strided", "normal_", "randn", "zeros", "_to_copy", "copy_",
           "clone", "slice", "view", "alias", "detach", "lift_fresh", "new_empty", "new_empty_strided", "_unsafe_view"}


class NoSyncMode(TorchDispatchMode):
    """Fails on host-reading ops and device-to-host copies; records every other op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            raise AssertionError(f"host sync in step(): {func}")
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if torch.device(dst_device).type == "cpu" and src.device.type != "cpu":
                raise AssertionError(f"device-to-host copy in step(): {func}")
        self.ops.append(name)
        return func(*args, **kwargs)


# (class, config, step() keyword arguments)
CASES = [
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 0.5}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 0.5}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("DDPMScheduler", {"clip_sample": False}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_small_log", "clip_sample": False}, {}),
    ("LCMScheduler", {"clip_sample": False}, {}),
    ("TCDScheduler", {}, {"eta": 0.3}),
    ("LMSDiscreteScheduler", {}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("EDMEulerScheduler", {}, {"s_churn": 1.0}),
    ("EDMDPMSolverMultistepScheduler", {}, {}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}),
    ("IPNDMScheduler", {}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
    ("PNDMScheduler", {}, {}),
    ("DEISMultistepScheduler", {}, {}),
    ("DEISMultistepScheduler", {"solver_order": 3, "prediction_type": "v_prediction"}, {}),
    ("DPMSolverSinglestepScheduler", {}, {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("SASolverScheduler", {}, {}),
    ("SASolverScheduler", {"predictor_order": 3, "corrector_order": 4, "algorithm_type": "noise_prediction"}, {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, config, step_kwargs", CASES, ids=lambda v: str(v))
def test_step_makes_no_host_sync(device, name, config, step_kwargs):
    if not hasattr(sf, name):
        pytest.skip(f"{name} not available")
    scheduler = getattr(sf, name)(**config)
    scheduler.set_timesteps(8, device=device)
    scheduler.set_begin_index(0)
    # Only the stochastic schedulers take a generator, as in diffusers.
    extra = dict(step_kwargs)
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 4, 16, 16, device=device) * scheduler.init_noise_sigma
    timesteps = list(scheduler.timesteps)  # iterating the schedule is the pipeline's business
    mode = NoSyncMode()
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = torch.tanh(model_input)
        with mode:
            x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
    arithmetic = sorted(set(mode.ops) - ALLOWED)
    assert not arithmetic, f"step() ran tensor ops besides the fused kernel: {arithmetic}"
    assert "solver_step" in mode.ops


def test_first_step_without_begin_index_looks_up_once():
    """Without set_begin_index the first step finds its index on the host copy of the schedule."""
    scheduler = sf.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x), t, x).prev_sample
    assert scheduler.step_index == 5
