"""What was built and what this process can use."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _C


def registered_ops() -> list[str]:
    """Names of the ``torch.ops.stepfuse`` operators this build registered."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(name.split("::", 1)[1] for name in names if name.startswith("stepfuse::"))


def build_info() -> dict:
    """Versions, compiled backends and what the current process can run."""
    built = dict(_C.build_info)
    return {
        "stepfuse": built["version"],
        "torch": torch.__version__,
        "torch_built_against": built["torch_version"],
        "cuda_kernels": built["cuda_kernels"],
        "cuda_version": built["cuda_version"],
        "cuda_architectures": built["cuda_architectures"],
        "gpu_visible": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": importlib.util.find_spec("triton") is not None,
        "compiler": built.get("compiler"),
        "ops": registered_ops(),
        **_sparse_attention(),
    }


def _sparse_attention() -> dict:
    """Where block-sparse attention runs here, and why it fell back to dense SDPA in this process."""
    from .attention.runtime import FALLBACKS, SUPPORTED

    cpu = "C++ kernel" if "block_sparse_attention" in registered_ops() else "dense SDPA (the C++ kernel is not built)"
    if importlib.util.find_spec("triton") is None:
        cuda = "dense SDPA (Triton is not installed)"
    else:
        cuda = "Triton kernel" + ("" if torch.cuda.is_available() else " (no GPU visible)")
        if os.environ.get("STEPFUSE_ATTENTION_GLUON") == "1":
            cuda += ", and on Hopper the Gluon kernels where measured faster (STEPFUSE_ATTENTION_GLUON=1)"
    fallbacks = "; ".join(f"{reason} ({count} calls)" for reason, count in FALLBACKS.most_common()) or "none"
    return {"sparse_attention": f"cpu: {cpu}; cuda: {cuda}; {SUPPORTED}", "sparse_attention_fallbacks": fallbacks}
