"""Device parametrisation for tests: CPU always, CUDA when a GPU is visible (marked ``cuda``)."""

from __future__ import annotations

import pytest
import torch


def device_params() -> list:
    """``[cpu, cuda]`` pytest params; the CUDA one carries the ``cuda`` mark and skips without a GPU."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
    ]
