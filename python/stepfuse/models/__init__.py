"""Bundled tiny diffusion models (diffusers folder format) and their loader.

Trained by ``benchmarks/train_tiny.py`` on scikit-learn's handwritten digits at 16x16:

======================  =======================  ==========================================
name                    denoiser                 objective / default scheduler
======================  =======================  ==========================================
``digits-unet``         ``UNet2DModel``          epsilon, DDPM linear VP / ``DDIMScheduler``
``digits-dit``          ``DiTTransformer2DModel``  epsilon, DDPM linear VP / ``DDIMScheduler``
``digits-dit-flow``     ``DiTTransformer2DModel``  flow matching / ``FlowMatchEulerDiscreteScheduler``
======================  =======================  ==========================================

Each is a pipeline folder loaded by diffusers' own ``from_pretrained``: exactly the path users'
checkpoints take.  Labels 0-9 are digits; label 10 is the null class of classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Union

import torch

MODELS_DIR = Path(__file__).resolve().parent
CLASSIFIER = "digits-classifier"


def list() -> List[str]:  # noqa: A001 - the public name the loader is documented with
    """Names of the bundled diffusion models."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/model_index.json"))


def path(name: str) -> Path:
    """The folder of a bundled model (diffusion model or ``digits-classifier``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    folder = MODELS_DIR / name
    if name != CLASSIFIER and not (folder / "model_index.json").is_file():
        raise ValueError(f"unknown model {name!r}; bundled models: {', '.join(list())}")
    if name == CLASSIFIER and not (folder / "config.json").is_file():
        raise ValueError(f"the {CLASSIFIER!r} weights are missing from {MODELS_DIR}")
    return folder


def info(name: str) -> dict:
    """What the model is and how it was trained (from its ``<name>.train.json``)."""
    folder = path(name)
    record = MODELS_DIR / f"{name}.train.json"
    return json.loads(record.read_text()) if record.is_file() else {"name": folder.name}


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype`` in from_pretrained (0.36+); speak whichever it knows."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load(
    name: str,
    scheduler=None,
    torch_dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
):
    """Load a bundled model as a :class:`~stepfuse.models.pipeline.ClassConditionalPipeline`.

    Args:
        name: one of :func:`list`.
        scheduler: a scheduler instance to use instead of the shipped one (e.g.
            ``stepfuse.schedulers.DPMSolverMultistepScheduler.from_config(...)``).
        torch_dtype: dtype of the denoiser weights (they are stored in float16).
        device: where to move the pipeline.
    """
    from .pipeline import ClassConditionalPipeline

    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    pipe = ClassConditionalPipeline.from_pretrained(str(path(name)), **_dtype_kwargs(torch_dtype), **kwargs)
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device) if device is not None else pipe


def load_classifier(device: Optional[Union[str, torch.device]] = None):
    """The shipped digit classifier (float32, eval mode)."""
    from .classifier import DigitClassifier

    model = DigitClassifier.from_pretrained(str(path(CLASSIFIER)), **_dtype_kwargs(torch.float32)).eval()
    return model.to(device) if device is not None else model


__all__ = ["list", "path", "info", "load", "load_classifier", "MODELS_DIR"]
