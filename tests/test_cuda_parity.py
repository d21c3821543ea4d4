"""Every drop-in scheduler on the GPU: whole trajectories against diffusers' own, also on the GPU."""

from __future__ import annotations

import diffusers
import pytest
import torch

import stepfuse.schedulers as sf
from stepfuse.testing.parity import assert_scheduler_parity

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    ("DPMSolverMultistepScheduler", {}, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 7),
    ("UniPCMultistepScheduler", {"solver_order": 3}, None),
    ("EulerDiscreteScheduler", {}, None),
    ("EulerAncestralDiscreteScheduler", {}, 7),
    ("HeunDiscreteScheduler", {}, None),
    ("DDIMScheduler", {}, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, None),
    ("DEISMultistepScheduler", {"solver_order": 3}, None),
]


@pytest.mark.parametrize("name, config, seed", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_on_cuda(name, config, seed, dtype):
    assert_scheduler_parity(getattr(sf, name), getattr(diffusers, name), config, 12, shape=(2, 4, 32, 32),
                            dtype=dtype, seed=seed, device="cuda")
