"""Tiny, randomly initialised diffusers pipelines built from configs (no downloads).

They are saved with ``save_pretrained`` and loaded back with ``from_pretrained`` from a
local folder, so tests exercise the loading path users' checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A byte-pair vocabulary just large enough for test prompts: every lowercase letter as
# a word-final and a word-inner symbol, plus CLIP's two special tokens.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_clip_tokenizer(folder: Path) -> None:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in [*_LETTERS, *(c + "</w>" for c in _LETTERS)]:
        vocab[symbol] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def save_tiny_ddpm(folder: Path, seed: int = 0) -> Path:
    """A ``DDPMPipeline`` with a 2-level ``UNet2DModel`` on 3x16x16 images."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return Path(folder)


def _tiny_sd_components(seed: int) -> dict:
    """UNet (cross-attention width 16), VAE and DDIM scheduler of the tiny Stable Diffusion (32x32 images)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    vae = _tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "scheduler": scheduler}


def _tiny_vae(latent_channels: int = 4, **kwargs):
    """A two-level ``AutoencoderKL`` (spatial factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32, **kwargs,
    )


def save_tiny_stable_diffusion(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` with a tiny UNet, VAE and CLIP text encoder (32x32 images)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    components = _tiny_sd_components(seed)
    tokenizer_dir = Path(folder) / "_tokenizer_src"
    _write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    pipe = StableDiffusionPipeline(**components, text_encoder=text_encoder, tokenizer=tokenizer,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


# -- in-memory pipelines called with prompt embeddings (no tokenizer or text encoder) ---------------
#
# Each factory returns ``(pipe, call_kwargs)``: the call kwargs hold the prompt embeddings (positive and
# negative), the image size and fixed initial ``latents``, so two pipelines called with them start from
# the same noise.

def _embeds(generator: torch.Generator, batch: int, *shape: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=generator)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_class_conditional(seed: int = 0, batch: int = 2, flow: bool = False):
    """A :class:`~stepfuse.models.pipeline.ClassConditionalPipeline` with a 3-class ``UNet2DModel`` (8x8 images)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    from ..models.pipeline import ClassConditionalPipeline

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0) if flow else DDIMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {"class_labels": list(range(batch)), "latents": _embeds(g, batch, 3, 8, 8)}
    return _quiet(ClassConditionalPipeline(scheduler=scheduler, unet=unet)), kwargs


def tiny_stable_diffusion(seed: int = 0, batch: int = 1):
    """A ``StableDiffusionPipeline`` (32x32 images) without tokenizer and text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**_tiny_sd_components(seed), text_encoder=None, tokenizer=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt_embeds": _embeds(g, batch, 8, 16), "negative_prompt_embeds": _embeds(g, batch, 8, 16),
              "height": 32, "width": 32, "latents": _embeds(g, batch, 4, 16, 16)}
    return _quiet(pipe), kwargs


def tiny_stable_diffusion_xl(seed: int = 0, batch: int = 1):
    """A ``StableDiffusionXLPipeline`` (32x32 images, text-time added conditioning) without text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    time_dim, pooled_dim = 4, 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), unet=unet, scheduler=scheduler, text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None, add_watermarker=False)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt_embeds": _embeds(g, batch, 8, 16), "negative_prompt_embeds": _embeds(g, batch, 8, 16),
              "pooled_prompt_embeds": _embeds(g, batch, pooled_dim),
              "negative_pooled_prompt_embeds": _embeds(g, batch, pooled_dim),
              "height": 32, "width": 32, "latents": _embeds(g, batch, 4, 16, 16)}
    return _quiet(pipe), kwargs


def tiny_flux(seed: int = 0, batch: int = 1, guidance_embeds: bool = True):
    """A ``FluxPipeline`` (16x16 images, packed 2x2 latents) without text encoders; ``guidance_embeds`` as in FLUX.1-dev."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    vae = _tiny_vae(latent_channels=4, shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False,
                    use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    g = torch.Generator().manual_seed(seed + 1)
    # 16x16 images -> 8x8 latents of 4 channels -> 16 tokens of 2x2 patches (16 features).
    kwargs = {"prompt_embeds": _embeds(g, batch, 6, 16), "negative_prompt_embeds": _embeds(g, batch, 6, 16),
              "pooled_prompt_embeds": _embeds(g, batch, 8), "negative_pooled_prompt_embeds": _embeds(g, batch, 8),
              "height": 16, "width": 16, "latents": _embeds(g, batch, 16, 16)}
    return _quiet(pipe), kwargs


def tiny_wan(seed: int = 0, batch: int = 1):
    """A ``WanPipeline`` (one 32x32 frame) with a flow UniPC scheduler as Wan 2.1 ships, without text encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.0, 0.2],
                           latents_std=[1.5, 2.0, 1.0, 0.5])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt_embeds": _embeds(g, batch, 6, 16), "negative_prompt_embeds": _embeds(g, batch, 6, 16),
              "height": 32, "width": 32, "num_frames": 1, "latents": _embeds(g, batch, 4, 1, 4, 4)}
    return _quiet(pipe), kwargs
