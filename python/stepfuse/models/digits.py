"""The handwritten-digits data the bundled models are trained and judged on.

scikit-learn's ``load_digits`` (UCI optical digits: 1797 grey 8x8 images, 17 levels) is the
training set.  Images are mapped to [-1, 1] and bilinearly upsampled to 16x16, the resolution of
every bundled model.  A fixed, seeded 20% of the images is held out: it is never trained on, and is
shipped (as the original 8x8 values) so that metrics compare generated samples with real digits
without scikit-learn or a download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F

RESOLUTION = 16
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
HELDOUT_FILE = Path(__file__).resolve().parent / "digits-heldout.safetensors"


def to_pixels(images8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) or (N, 64) values in [0, 16] -> (N, 1, 16, 16) float32 in [-1, 1]."""
    x = torch.as_tensor(images8, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = x / 8.0 - 1.0
    return F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)


def split_indices(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed (train, held-out) split of ``n`` images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_heldout = int(round(n * HELDOUT_FRACTION))
    return perm[n_heldout:].sort().values, perm[:n_heldout].sort().values


def load_sklearn_digits(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] at 16x16, labels) of the train or held-out split; needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits training data comes from scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype("float32"))
    labels = torch.from_numpy(data.target.astype("int64"))
    train, heldout = split_indices(len(labels))
    idx = train if split == "train" else heldout
    return to_pixels(images[idx]), labels[idx]


def heldout_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """The shipped held-out real digits: (N, 1, 16, 16) float32 in [-1, 1] and int64 labels."""
    from safetensors.torch import load_file

    tensors = load_file(str(HELDOUT_FILE))
    return to_pixels(tensors["images"]), tensors["labels"].long()


def save_heldout(path: Path = HELDOUT_FILE) -> Path:
    """Write the held-out split (8x8 uint8 values and labels) from scikit-learn's copy."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    data = load_digits()
    _, idx = split_indices(len(data.target))
    images = torch.from_numpy(data.images.astype("uint8"))[idx].contiguous()
    labels = torch.from_numpy(data.target.astype("uint8"))[idx].contiguous()
    save_file({"images": images, "labels": labels}, str(path))
    return path
