"""A minimal class-conditional diffusers pipeline for the bundled digit models.

It follows diffusers' conventions (``DiTPipeline``, ``StableDiffusionPipeline``): latents prepared
with ``randn_tensor`` and scaled by ``init_noise_sigma``, ``scale_model_input`` before every model
call, classifier-free guidance on a doubled batch, ``num_inference_steps``/``timesteps``/``sigmas``,
``generator``, ``output_type``, a progress bar and ``callback_on_step_end``.  It works with any
diffusers scheduler and with stepfuse's drop-in schedulers.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class ClassConditionalPipeline(DiffusionPipeline):
    r"""Class-conditional sampling with a ``UNet2DModel`` (``unet``) or a ``DiTTransformer2DModel``
    (``transformer``) in pixel space.

    Args:
        scheduler: any diffusers-compatible scheduler (VP epsilon/v/sample or flow matching).
        unet: a class-conditional ``UNet2DModel`` whose last class embedding is the null class.
        transformer: a ``DiTTransformer2DModel``; its label embedder's extra row is the null class.
    """

    model_cpu_offload_seq = "transformer->unet"
    _optional_components = ["unet", "transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler, unet=None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("pass exactly one of unet and transformer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def num_classes(self) -> int:
        cfg = self.denoiser.config
        if self.unet is not None:
            return int(cfg.num_class_embeds) - 1
        return int(cfg.num_embeds_ada_norm)

    @property
    def null_class_label(self) -> int:
        """The label the model was trained to treat as "no class" (label dropout)."""
        return self.num_classes

    @property
    def sample_shape(self) -> tuple:
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def _labels(self, class_labels, num_images_per_label: int) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise TypeError(f"class_labels must be an int, a non-empty list of ints or a tensor, got {class_labels!r}")
        for c in class_labels:
            if not isinstance(c, (int, np.integer)) or not 0 <= int(c) < self.num_classes:
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got {c!r}")
        if not isinstance(num_images_per_label, int) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be a positive int, got {num_images_per_label!r}")
        labels = torch.tensor([int(c) for c in class_labels], dtype=torch.long)
        return labels.repeat_interleave(num_images_per_label).to(self._execution_device)

    def _set_timesteps(self, num_inference_steps, timesteps, sigmas, device) -> torch.Tensor:
        kwargs = {}
        if timesteps is not None:
            if not _accepts(self.scheduler.set_timesteps, "timesteps"):
                raise ValueError(f"{type(self.scheduler).__name__} does not accept custom timesteps")
            kwargs["timesteps"] = timesteps
        elif sigmas is not None:
            if not _accepts(self.scheduler.set_timesteps, "sigmas"):
                raise ValueError(f"{type(self.scheduler).__name__} does not accept custom sigmas")
            kwargs["sigmas"] = sigmas
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            kwargs["num_inference_steps"] = num_inference_steps
        self.scheduler.set_timesteps(device=device, **kwargs)
        return self.scheduler.timesteps

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int], torch.Tensor],
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_label: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["ClassConditionalPipeline", int, torch.Tensor, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        r"""Generate images of the requested classes.

        Args:
            class_labels: digit(s) to draw; each is drawn ``num_images_per_label`` times.
            num_inference_steps: denoising steps (ignored when ``timesteps`` or ``sigmas`` is given).
            guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w * (cond - uncond)``
                (Ho & Salimans 2022); ``<= 1`` turns guidance off and halves the model batch.
            generator: seeds the initial noise (and the scheduler's noise for stochastic samplers).
            latents: initial noise of shape (batch, C, H, W); drawn from ``generator`` when omitted.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or
                ``"latent"`` (the raw sample in [-1, 1]).
            callback_on_step_end: called as ``fn(pipe, i, t, {name: tensor})`` after every step; it
                may return replacements for the tensors named in ``callback_on_step_end_tensor_inputs``.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {name!r}")
        device = self._execution_device
        denoiser = self.denoiser
        labels = self._labels(class_labels, num_images_per_label)
        batch = labels.shape[0]
        do_cfg = guidance_scale > 1.0
        model_labels = torch.cat([labels, torch.full_like(labels, self.null_class_label)]) if do_cfg else labels

        timesteps = self._set_timesteps(num_inference_steps, timesteps, sigmas, device)
        shape = (batch, *self.sample_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # Flow-matching schedulers start at unit variance and have neither attribute (as in SD3's pipeline).
        latents = latents.to(device=device, dtype=torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_model_input = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)

        step_kwargs = {}
        if _accepts(self.scheduler.step, "generator"):
            step_kwargs["generator"] = generator
        if _accepts(self.scheduler.step, "eta"):
            step_kwargs["eta"] = eta
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                model_input = scale_model_input(model_input, t)
                t_batch = (t if torch.is_tensor(t) else torch.tensor(t)).to(device).expand(model_input.shape[0])
                output = denoiser(model_input.to(denoiser.dtype), t_batch, class_labels=model_labels).sample
                output = output.float()
                if do_cfg:
                    cond, uncond = output.chunk(2)
                    output = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(output, t, latents, return_dict=False, **step_kwargs)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    replaced = callback_on_step_end(self, i, t, tensors) or {}
                    latents = replaced.get("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            images = (latents / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
