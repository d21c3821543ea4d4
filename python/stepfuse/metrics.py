"""Sample-quality metrics for the bundled digit models.

- **class accuracy**: the shipped digit classifier's agreement with the requested labels;
- **Fréchet distance** (FD) between Gaussians fitted to the classifier's penultimate features of
  generated and of held-out real digits (Heusel et al. 2017, eq. 6 with the digit classifier in
  place of Inception-v3);
- **MSE / PSNR** against a reference run from the same initial noise with a high-NFE solver, which
  isolates the solver's discretisation error from the model's own error.

Images are NCHW tensors in [0, 1], as ``pipeline(..., output_type="pt")`` returns them.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, 1], got {images.dtype}")
    return images.float()


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    images, reference = _check_images(images), _check_images(reference, "reference")
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    return images, reference.to(images.device)


def mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error over all pixels, images in [0, 1]."""
    images, reference = _check_pair(images, reference)
    return float((images.double() - reference.double()).pow(2).mean())


def psnr(images: torch.Tensor, reference: torch.Tensor, eps: float = 1e-10) -> float:
    """Mean over images of 10 log10(1 / MSE_i) in dB, images in [0, 1] (capped at 100 dB)."""
    images, reference = _check_pair(images, reference)
    per_image = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / per_image.clamp_min(eps))).clamp(max=100.0).mean())


def gaussian_stats(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance in float64 of (N, D) features."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(stats_a: Tuple[torch.Tensor, torch.Tensor], stats_b: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b and avoids a general sqrtm.
    """
    (mu_a, s_a), (mu_b, s_b) = stats_a, stats_b
    evals, evecs = torch.linalg.eigh(s_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross
    return float(value.clamp_min(0))


class DigitMetrics:
    """Scores generated digits with the shipped classifier against the shipped held-out digits.

    >>> metrics = DigitMetrics()
    >>> metrics(images, labels, reference=reference_images)
    {'accuracy': 0.98, 'fd': 3.1, 'mse': 0.0004, 'psnr': 36.2}
    """

    def __init__(self, classifier: Optional[torch.nn.Module] = None, device=None, batch_size: int = 512):
        from .models import digits, load_classifier

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.classifier = (classifier if classifier is not None else load_classifier()).to(self.device).eval()
        self.batch_size = batch_size
        real, self.real_labels = digits.heldout_digits()
        self.real_images = (real + 1) / 2
        self.real_stats = gaussian_stats(self.features(self.real_images))

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn) -> torch.Tensor:
        images = _check_images(images)
        outs = [fn(chunk.to(self.device) * 2 - 1) for chunk in images.split(self.batch_size)]
        return torch.cat(outs).cpu()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate classifier features (N, D) of images in [0, 1]."""
        return self._run(images, self.classifier.features)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit of each image in [0, 1]."""
        return self._run(images, self.classifier).argmax(1)

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of images the classifier assigns to the requested label."""
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != images.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
        return float((self.predict(images) == labels).float().mean())

    def fd(self, images: torch.Tensor) -> float:
        """Fréchet distance to the held-out real digits in classifier-feature space."""
        return frechet_distance(gaussian_stats(self.features(images)), self.real_stats)

    def real_baseline(self, seed: int = 0) -> Dict[str, float]:
        """What real digits score: classifier accuracy on the held-out set, and the FD between two
        disjoint random halves of it (the floor a perfect generator reaches at that sample size;
        FD is biased upwards for small samples)."""
        perm = torch.randperm(len(self.real_labels), generator=torch.Generator().manual_seed(seed))
        half_a, half_b = perm.chunk(2)
        fd = frechet_distance(gaussian_stats(self.features(self.real_images[half_a])),
                              gaussian_stats(self.features(self.real_images[half_b])))
        return {"accuracy": self.accuracy(self.real_images, self.real_labels), "fd": fd,
                "fd_samples": int(len(half_a))}

    def __call__(self, images: torch.Tensor, labels, reference: Optional[torch.Tensor] = None) -> Dict[str, float]:
        scores = {"accuracy": self.accuracy(images, labels), "fd": self.fd(images)}
        if reference is not None:
            scores["mse"] = mse(images, reference)
            scores["psnr"] = psnr(images, reference)
        return scores


__all__ = ["DigitMetrics", "frechet_distance", "gaussian_stats", "mse", "psnr"]
