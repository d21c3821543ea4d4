"""A small convolutional digit classifier: the judge behind ``stepfuse.metrics``.

Its penultimate activations are the feature space of the Fréchet distance, the way Inception-v3
pool features are for FID on natural images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class DigitClassifier(ModelMixin, ConfigMixin):
    """(N, 1, 16, 16) images in [-1, 1] -> logits over ``num_classes`` digits."""

    @register_to_config
    def __init__(self, num_classes: int = 10, channels: tuple = (32, 64), feature_dim: int = 64):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # 16 -> 8
        self.conv3 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)  # 8 -> 4
        self.features_proj = nn.Linear(c2 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        h = F.gelu(self.conv1(images))
        h = F.gelu(self.conv2(h))
        h = F.gelu(self.conv3(h))
        return F.gelu(self.features_proj(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
