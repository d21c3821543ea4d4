"""Tiny randomly initialised diffusers transformers (Flux, Wan, SD3) with a sequence of inputs
that drifts slowly from step to step, as a denoising loop's inputs do.

Each factory returns ``(model, inputs)``: ``inputs(i)`` are the keyword arguments of the model call
at step ``i``.  ``head_dim`` and the latent size set the attention shapes (the sparse-attention
tests need head dims the kernels take and sequences of several blocks).
"""

from __future__ import annotations

import torch

__all__ = ["drift", "run_steps", "tiny_flux", "tiny_wan", "tiny_sd3"]


def drift(shape, seed=1):
    """``inputs(i)``: a fixed tensor plus ``0.02 i`` times fixed noise (adjacent steps nearly equal)."""
    g = torch.Generator().manual_seed(seed)
    base, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return lambda i: base + 0.02 * i * noise


def run_steps(model, inputs, steps: int, branch=None) -> list:
    """The model's outputs over ``steps`` calls on ``inputs(i)``, without gradients; with
    ``branch``, each call is named as that CFG branch at its step (``stepfuse.cache.branch``)."""
    from ..cache.runtime import branch as named

    outputs = []
    with torch.no_grad():
        for i in range(steps):
            if branch is None:
                outputs.append(model(**inputs(i)).sample)
            else:
                with named(branch, step=i):
                    outputs.append(model(**inputs(i)).sample)
    return outputs


def _text(batch: int, tokens: int, dim: int, pooled_dim: int = 0):
    g = torch.Generator().manual_seed(2)
    text = torch.randn(batch, tokens, dim, generator=g)
    return text, (torch.randn(batch, pooled_dim, generator=g) if pooled_dim else None)


def tiny_flux(head_dim: int = 8, side: int = 4, rope=(2, 2, 4), text_tokens: int = 6):
    """Flux: 2 dual-stream and 2 single-stream blocks, 2 heads, a ``side`` x ``side`` packed latent."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=tuple(rope))
    text, pooled = _text(2, text_tokens, 16, 8)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(-1, 3), torch.zeros(text_tokens, 3)
    hidden = drift((2, side * side, 8))
    return model, lambda i: dict(hidden_states=hidden(i), encoder_hidden_states=text, pooled_projections=pooled,
                                 timestep=torch.full((2,), 1.0 - 0.01 * i), img_ids=img_ids, txt_ids=txt_ids)


def tiny_wan(head_dim: int = 8, frames: int = 1, side: int = 4):
    """Wan: 3 blocks, 2 heads, a ``frames`` x ``side`` x ``side`` latent (patches of 1 x 2 x 2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=3,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    text, _ = _text(2, 6, 16)
    hidden = drift((2, 4, frames, side, side))
    return model, lambda i: dict(hidden_states=hidden(i), encoder_hidden_states=text,
                                 timestep=torch.full((2,), 900.0 - 5 * i))


def tiny_sd3(head_dim: int = 8, side: int = 8):
    """SD3: 3 joint blocks, 2 heads, a ``side`` x ``side`` latent (patches of 2 x 2)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=4, num_layers=3,
                                  attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=2 * head_dim, pooled_projection_dim=8, out_channels=4,
                                  pos_embed_max_size=side)
    text, pooled = _text(2, 6, 16, 8)
    hidden = drift((2, 4, side, side))
    return model, lambda i: dict(hidden_states=hidden(i), encoder_hidden_states=text, pooled_projections=pooled,
                                 timestep=torch.full((2,), 900.0 - 5 * i))
