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


def save_tiny_stable_diffusion(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` with a tiny UNet, VAE and CLIP text encoder (32x32 images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
    )
    tokenizer_dir = Path(folder) / "_tokenizer_src"
    _write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)
