"""``stepfuse.accelerate(pipe)`` / ``stepfuse.restore(pipe)``: stepfuse inside an existing diffusers pipeline.

``accelerate`` keeps the pipeline object and its components and changes two things: ``pipe.scheduler``
becomes a stepfuse drop-in scheduler for the chosen solver, and ``pipe.__class__`` becomes a subclass
whose ``__call__`` prepares inputs with the pipeline's own helpers (``encode_prompt``,
``prepare_latents``, Flux's packed latents and dynamic shift, SDXL's added time ids), runs the
denoising loop on :class:`stepfuse.Sampler` (guidance fused into the solver step, branches batched
into one model call) and decodes as the pipeline does.  ``restore`` puts both back.

Pipelines other than those in :data:`SUPPORTED_PIPELINES` are refused with a list of the supported
ones; they still run stepfuse's solvers through the drop-in schedulers
(``pipe.scheduler = stepfuse.schedulers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

# -- solvers -----------------------------------------------------------------------------------------

VP, FLOW = "vp", "flow"

#: solver name -> {model type: (drop-in scheduler class name, its config overrides)}
SOLVERS: Dict[str, Dict[str, Tuple[str, dict]]] = {
    "dpmpp_2m": {kind: ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"})
                 for kind in (VP, FLOW)},
    "dpmpp_3m": {kind: ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"})
                 for kind in (VP, FLOW)},
    "unipc": {kind: ("UniPCMultistepScheduler", {}) for kind in (VP, FLOW)},
    "deis": {kind: ("DEISMultistepScheduler", {}) for kind in (VP, FLOW)},
    "euler": {VP: ("EulerDiscreteScheduler", {}), FLOW: ("FlowMatchEulerDiscreteScheduler", {})},
    "ddim": {VP: ("DDIMScheduler", {})},
}


def _model_type(pipe, scheduler) -> str:
    """``"flow"`` for rectified-flow models (Flux, Wan, flow-matching schedulers), else ``"vp"``."""
    if type(pipe).__name__ in ("FluxPipeline", "WanPipeline"):
        return FLOW
    cfg = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch") or cfg.get("use_flow_sigmas", False) \
            or cfg.get("prediction_type") == "flow_prediction":
        return FLOW
    return VP


def _flow_shift(cfg) -> float:
    """The static time shift of a flow scheduler config (``shift`` of FlowMatch*, ``flow_shift`` of the others)."""
    if "flow_shift" in cfg and cfg.get("use_flow_sigmas", False):
        return float(cfg["flow_shift"])
    return float(cfg.get("shift", cfg.get("flow_shift", 1.0)))


def build_scheduler(solver: str, scheduler, model_type: str, **overrides):
    """The stepfuse drop-in for ``solver`` built from ``scheduler``'s config (``model_type`` ``"vp"``/``"flow"``)."""
    from .. import schedulers

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    choices = SOLVERS[solver]
    if model_type not in choices:
        supported = sorted(s for s, kinds in SOLVERS.items() if model_type in kinds)
        raise ValueError(f"solver {solver!r} does not support {model_type} models; choose one of {supported}")
    name, kwargs = choices[model_type]
    cfg = scheduler.config
    kwargs = dict(kwargs)
    if model_type == FLOW:
        dynamic = bool(cfg.get("use_dynamic_shifting", False))
        if name == "FlowMatchEulerDiscreteScheduler":
            kwargs.update(shift=_flow_shift(cfg), use_dynamic_shifting=dynamic)
        else:
            kwargs.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=_flow_shift(cfg),
                          use_dynamic_shifting=dynamic)
    kwargs.update(overrides)
    cls = getattr(schedulers, name)
    # Keys of another scheduler family (a FlowMatch config's shift range, ...) would only draw diffusers' warning.
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in cfg.items() if k in accepted}, **kwargs)


# -- state kept on an accelerated pipeline ------------------------------------------------------------

@dataclass
class _State:
    base: type
    scheduler: Any  # the scheduler the pipeline had before accelerate()
    adapter: "_Adapter"
    solver: str
    steps: Optional[int]
    guidance: Any
    batch_branches: bool
    scheduler_kwargs: dict = field(default_factory=dict)
    cache: Any = None  # the stepfuse.cache policy installed on the denoiser
    attention: Any = None  # the stepfuse.attention.SparseAttention config installed on the denoiser


_STATE = "_stepfuse_state"
_CLASSES: Dict[type, type] = {}


def accelerate(pipe, solver: str = "dpmpp_2m", steps: Optional[int] = None, guidance=None,
               batch_branches: bool = True, cache=None, attention=None, **scheduler_kwargs):
    """Install stepfuse into ``pipe`` (in place) and return it.

    Args:
        pipe: one of :data:`SUPPORTED_PIPELINES`, with its denoiser and VAE present.
        solver: one of :data:`SOLVERS` (``"ddim"`` only for VP models).
        steps: ``num_inference_steps`` used when a call does not pass one.
        guidance: a :mod:`stepfuse.guidance` config (e.g. ``ClassifierFreeGuidance``); ``None`` builds
            classifier-free guidance from each call's own ``guidance_scale``/``guidance_rescale``
            (Flux: ``true_cfg_scale`` with negative prompt embeddings; its ``guidance_scale`` stays the
            embedded guidance the transformer reads).
        batch_branches: run the conditional and unconditional branches as one model call.
        cache: a :mod:`stepfuse.cache` policy installed on the denoiser (``DeepCache`` for UNets,
            the block caches for transformers); each call sets its step count and releases its
            memory at the end.
        attention: a :class:`stepfuse.attention.SparseAttention` config: the transformer's
            self-attention runs block-sparse (its schedule gets each call's step count).
        **scheduler_kwargs: config overrides for the drop-in scheduler (e.g. ``use_karras_sigmas=True``).

    Calling it again replaces the settings; :func:`restore` undoes it.
    """
    state = getattr(pipe, _STATE, None)
    base = state.base if state is not None else type(pipe)
    adapter = _ADAPTERS.get(base.__name__)
    if adapter is None or not adapter.matches(base):
        raise ValueError(
            f"stepfuse.accelerate does not support {base.__name__}; supported pipelines: "
            f"{', '.join(SUPPORTED_PIPELINES)}. Other pipelines can use a drop-in scheduler: pipe.scheduler = "
            "stepfuse.schedulers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)"
        )
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a str, got {type(solver).__name__}")
    if steps is not None and (not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be None or a positive int, got {steps!r}")
    if not isinstance(batch_branches, bool):
        raise TypeError(f"batch_branches must be a bool, got {type(batch_branches).__name__}")
    from ..guidance import Guidance

    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be None or a stepfuse.guidance config, got {type(guidance).__name__}")
    if guidance is not None and guidance.num_branches > 2:
        # The supported pipelines have one condition (text or class); a third branch has nothing to read.
        raise ValueError(f"guidance {type(guidance).__name__} needs a second condition, which {base.__name__} "
                         "does not have; use ClassifierFreeGuidance, AdaptiveProjectedGuidance or "
                         "ClassifierFreeZeroStarGuidance")
    from ..cache import CachePolicy

    if cache is not None and not isinstance(cache, CachePolicy):
        raise TypeError(f"cache must be None or a stepfuse.cache policy, got {type(cache).__name__}")
    from ..attention import SparseAttention

    if attention is not None and not isinstance(attention, SparseAttention):
        raise TypeError(f"attention must be None or a stepfuse.attention.SparseAttention, got "
                        f"{type(attention).__name__}")
    if attention is not None and getattr(pipe, "transformer", None) is None:
        raise ValueError(f"attention: sparse attention needs a transformer denoiser; {base.__name__} has a UNet")
    adapter.check_components(pipe)
    original = state.scheduler if state is not None else pipe.scheduler
    if original is None:
        raise ValueError(f"{base.__name__} has no scheduler (pipe.scheduler is None)")
    scheduler = build_scheduler(solver, original, _model_type(pipe, original), **scheduler_kwargs)
    new_state = _State(base, original, adapter, solver, None if steps is None else int(steps), guidance,
                       batch_branches, dict(scheduler_kwargs))
    _install_attention(pipe, state, None)  # attention wraps the cache's forward: off first, back on last
    _install_cache(pipe, state, cache)
    _install_attention(pipe, None, attention)
    new_state.cache, new_state.attention = cache, attention
    pipe.scheduler = scheduler
    pipe.__class__ = _accelerated_class(base)
    setattr(pipe, _STATE, new_state)
    return pipe


def _denoiser(pipe) -> torch.nn.Module:
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet


def _install_cache(pipe, state: Optional[_State], cache) -> None:
    from .. import cache as sc

    if state is not None and state.cache is not None and getattr(_denoiser(pipe), "_stepfuse_cache", None):
        sc.remove(_denoiser(pipe))
    if cache is not None:
        sc.apply(_denoiser(pipe), cache)


def _install_attention(pipe, state: Optional[_State], attention) -> None:
    from .. import attention as sa

    if state is not None and state.attention is not None and getattr(_denoiser(pipe), "_stepfuse_attention", None):
        sa.remove(_denoiser(pipe))
    if attention is not None:
        sa.apply(_denoiser(pipe), attention)


def restore(pipe):
    """Undo :func:`accelerate`: the original class and scheduler come back. Returns ``pipe``."""
    state = getattr(pipe, _STATE, None)
    if state is None:
        raise ValueError(f"pipe ({type(pipe).__name__}) was not accelerated by stepfuse.accelerate")
    _install_attention(pipe, state, None)
    _install_cache(pipe, state, None)
    pipe.__class__ = state.base
    pipe.scheduler = state.scheduler
    delattr(pipe, _STATE)
    return pipe


def _accelerated_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        def __call__(self, *args, **kwargs):
            return _call(self, args, kwargs)

        functools.update_wrapper(__call__, base.__call__)
        # Same name and module as the pipeline class, so name-based checks (save_pretrained, from_pipe) still hold.
        cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
        cls.__qualname__ = base.__qualname__
        _CLASSES[base] = cls
    return cls


# -- one call ------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What an adapter hands to the sampling loop."""
    model: Callable
    latents: torch.Tensor
    cond: dict
    uncond: Optional[dict] = None
    shared: Optional[dict] = None


@torch.no_grad()
def _call(pipe, args, kwargs):
    state: _State = getattr(pipe, _STATE)
    signature = inspect.signature(state.base.__call__)
    try:
        bound = signature.bind(pipe, *args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{state.base.__name__}.__call__: {err}") from None
    given = dict(bound.arguments)
    given.pop(next(iter(signature.parameters)))  # self
    var_keyword = [n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = given.pop(var_keyword[0], {}) if var_keyword else {}
    if extra:  # the deprecated callback / callback_steps of the SD pipelines
        raise ValueError(f"accelerated {state.base.__name__} does not take {sorted(extra)}; "
                         "call stepfuse.restore(pipe) to use them")
    call = {name: p.default for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty}
    call.update(given)
    if "num_inference_steps" not in given and state.steps is not None:
        call["num_inference_steps"] = state.steps
    unsupported = sorted(name for name, value in given.items()
                         if name in state.adapter.unsupported and value is not None
                         and value is not signature.parameters[name].default)
    if unsupported:
        raise ValueError(f"accelerated {state.base.__name__} does not support {unsupported}; "
                         "call stepfuse.restore(pipe) to use them")
    if call.get("output_type", "pil") not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {call['output_type']!r}")
    state.adapter.check_components(pipe)
    return state.adapter.call(pipe, state, call)


def _guidance(state: _State, default_scale: float, default_rescale: float, default_on: bool):
    """The guidance for this call: the accelerate() config, else CFG from the call's own arguments."""
    from ..guidance import ClassifierFreeGuidance

    guidance = state.guidance
    if guidance is None:
        if not default_on:
            return None
        guidance = ClassifierFreeGuidance(guidance_scale=float(default_scale), guidance_rescale=float(default_rescale))
    return guidance if guidance.enabled else None


def _step_callback(pipe, call) -> Optional[Callable]:
    """diffusers' ``callback_on_step_end(pipe, i, t, {"latents": ...})`` as the Sampler's ``callback(i, t, latents)``."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    fn = call.get("callback_on_step_end")
    if fn is None:
        return None
    names = call.get("callback_on_step_end_tensor_inputs") or ["latents"]
    if isinstance(fn, (PipelineCallback, MultiPipelineCallbacks)):
        names = fn.tensor_inputs
    if any(name != "latents" for name in names):
        raise ValueError(f"callback_on_step_end_tensor_inputs may only name 'latents' in an accelerated pipeline, "
                         f"got {list(names)}")

    def callback(i, t, latents):
        replaced = fn(pipe, i, t, {"latents": latents} if "latents" in names else {}) or {}
        return replaced.get("latents")

    return callback


def _sample(pipe, state: _State, run: _Run, guidance, call) -> torch.Tensor:
    from ..solvers.sampler import Sampler

    pipe._num_timesteps = len(pipe.scheduler.timesteps)  # the pipelines' num_timesteps property, read by callbacks
    progress = dict(getattr(pipe, "_progress_bar_config", {}))  # the pipeline's set_progress_bar_config
    sampler = Sampler(pipe.scheduler, guidance=guidance, batch_branches=state.batch_branches, progress=progress)
    # As the pipelines' prepare_extra_step_kwargs: the generator reaches only schedulers whose step takes one.
    generator = call.get("generator")
    if "generator" not in inspect.signature(pipe.scheduler.step).parameters:
        generator = None
    from .. import attention as sa
    from .. import cache as sc

    denoiser = _denoiser(pipe)
    # A new run: caches and masks are reset, told the step count, and hold memory only while the call lasts.
    runs = [m for m, on in ((sc, state.cache is not None), (sa, state.attention is not None)) if on]
    for module in runs:
        module.reset(denoiser)
        module.set_num_inference_steps(denoiser, len(pipe.scheduler.timesteps))
    try:
        return sampler(run.model, run.latents, run.cond, uncond=run.uncond if guidance is not None else None,
                       shared=run.shared, callback=_step_callback(pipe, call), generator=generator)
    finally:
        for module in runs:
            module.reset(denoiser)


def _output(pipe, call, output_cls, images, **fields):
    pipe.maybe_free_model_hooks()
    if not call.get("return_dict", True):
        return (images, *fields.values())
    return output_cls(images, *fields.values())


def _without_none(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _forward(module, **fixed) -> Callable:
    """``model(x, t, **kw)`` for a diffusers denoiser returning a tuple; the output takes ``x``'s dtype."""
    def model(x, t, **kw):
        return module(x.to(module.dtype), t, return_dict=False, **fixed, **kw)[0].to(x.dtype)

    return model


class _Adapter:
    """How one pipeline class runs under stepfuse: required components, refused arguments, the call."""

    name: str = ""
    module: str = "diffusers"
    components: Tuple[Tuple[str, ...], ...] = ()  # each entry: one of these must be present
    unsupported: Tuple[str, ...] = ()

    def matches(self, cls: type) -> bool:
        import importlib

        return getattr(importlib.import_module(self.module), self.name, None) is cls

    def check_components(self, pipe) -> None:
        for names in self.components:
            if all(getattr(pipe, n, None) is None for n in names):
                missing = " or ".join(f"pipe.{n}" for n in names)
                raise ValueError(f"{self.name} needs {missing}, which is None")

    def call(self, pipe, state: _State, call: dict):
        raise NotImplementedError


# -- the bundled class-conditional pipeline -----------------------------------------------------------------

class _ClassConditional(_Adapter):
    name = "ClassConditionalPipeline"
    module = "stepfuse.models.pipeline"
    components = (("unet", "transformer"),)

    def call(self, pipe, state, call):
        device = pipe._execution_device
        denoiser = pipe.denoiser
        labels = pipe._labels(call["class_labels"], call["num_images_per_label"])
        scale = call["guidance_scale"]
        guidance = _guidance(state, scale, 0.0, scale > 1.0)
        pipe._set_timesteps(call["num_inference_steps"], call["timesteps"], call["sigmas"], device)
        shape = (labels.shape[0], *pipe.sample_shape)
        latents = call["latents"]
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=call["generator"], device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)

        def model(x, t, class_labels):
            return denoiser(x.to(denoiser.dtype), t, class_labels=class_labels).sample.to(x.dtype)

        run = _Run(model, latents, {"class_labels": labels},
                   {"class_labels": torch.full_like(labels, pipe.null_class_label)})
        latents = _sample(pipe, state, run, guidance, call)
        images = latents
        if call["output_type"] != "latent":
            images = (latents / 2 + 0.5).clamp(0, 1)
            if call["output_type"] != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if call["output_type"] == "pil":
                    images = pipe.numpy_to_pil(images)
        from diffusers import ImagePipelineOutput

        return _output(pipe, call, ImagePipelineOutput, images)


# -- Stable Diffusion 1.x / 2.x and SDXL -------------------------------------------------------------------

class _StableDiffusion(_Adapter):
    name = "StableDiffusionPipeline"
    components = (("unet",), ("vae",))
    unsupported = ("ip_adapter_image", "ip_adapter_image_embeds", "callback", "callback_steps")

    def _guidance(self, pipe, state, call):
        # diffusers turns CFG off for guidance-distilled UNets (LCM's time_cond_proj_dim).
        scale = call["guidance_scale"]
        default_on = scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        return _guidance(state, scale, call["guidance_rescale"], default_on)

    def _size(self, pipe, call) -> tuple:
        size = pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size[:2]
        return (call["height"] or height * pipe.vae_scale_factor, call["width"] or width * pipe.vae_scale_factor)

    def _timestep_cond(self, pipe, batch, dtype, device):
        """The guidance-scale embedding that guidance-distilled UNets take (as the pipeline builds it)."""
        if pipe.unet.config.time_cond_proj_dim is None:
            return None
        w = torch.tensor(pipe.guidance_scale - 1).repeat(batch)
        return pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(
            device=device, dtype=dtype)

    def _prepare(self, pipe, state, call, height, width, dtype, device):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        retrieve_timesteps(pipe.scheduler, call["num_inference_steps"], device, call["timesteps"], call["sigmas"])
        batch = call["batch"]
        latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, device,
                                       call["generator"], call["latents"])
        return latents, self._timestep_cond(pipe, batch, latents.dtype, device)

    def _set_call_state(self, pipe, call):
        pipe._guidance_scale = call["guidance_scale"]
        pipe._guidance_rescale = call["guidance_rescale"]
        pipe._clip_skip = call["clip_skip"]
        pipe._cross_attention_kwargs = call["cross_attention_kwargs"]
        pipe._interrupt = False

    def call(self, pipe, state, call):
        height, width = self._size(pipe, call)
        pipe.check_inputs(call["prompt"], height, width, None, call["negative_prompt"], call["prompt_embeds"],
                          call["negative_prompt_embeds"], None, None, call["callback_on_step_end_tensor_inputs"])
        self._set_call_state(pipe, call)
        device = pipe._execution_device
        guidance = self._guidance(pipe, state, call)
        cak = call["cross_attention_kwargs"]
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            call["prompt"], device, call["num_images_per_prompt"], guidance is not None, call["negative_prompt"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            lora_scale=(cak or {}).get("scale"), clip_skip=call["clip_skip"])
        call["batch"] = prompt_embeds.shape[0]
        latents, timestep_cond = self._prepare(pipe, state, call, height, width, prompt_embeds.dtype, device)
        branch = _without_none(timestep_cond=timestep_cond)
        run = _Run(_forward(pipe.unet), latents, {"encoder_hidden_states": prompt_embeds, **branch},
                   {"encoder_hidden_states": negative_embeds, **branch}, _without_none(cross_attention_kwargs=cak))
        latents = _sample(pipe, state, run, guidance, call)
        if call["output_type"] == "latent":
            image, nsfw = latents, None
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=call["generator"])[0]
            image, nsfw = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=call["output_type"], do_denormalize=denormalize)
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return _output(pipe, call, StableDiffusionPipelineOutput, image, nsfw_content_detected=nsfw)


class _StableDiffusionXL(_StableDiffusion):
    name = "StableDiffusionXLPipeline"
    unsupported = _StableDiffusion.unsupported + ("denoising_end",)

    def call(self, pipe, state, call):
        height, width = self._size(pipe, call)
        original_size = call["original_size"] or (height, width)
        target_size = call["target_size"] or (height, width)
        pipe.check_inputs(call["prompt"], call["prompt_2"], height, width, None, call["negative_prompt"],
                          call["negative_prompt_2"], call["prompt_embeds"], call["negative_prompt_embeds"],
                          call["pooled_prompt_embeds"], call["negative_pooled_prompt_embeds"], None, None,
                          call["callback_on_step_end_tensor_inputs"])
        self._set_call_state(pipe, call)
        pipe._denoising_end = None
        device = pipe._execution_device
        guidance = self._guidance(pipe, state, call)
        cak = call["cross_attention_kwargs"]
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], device=device,
            num_images_per_prompt=call["num_images_per_prompt"], do_classifier_free_guidance=guidance is not None,
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            lora_scale=(cak or {}).get("scale"), clip_skip=call["clip_skip"])
        batch = call["batch"] = prompt_embeds.shape[0]
        latents, timestep_cond = self._prepare(pipe, state, call, height, width, prompt_embeds.dtype, device)
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)

        def time_ids(original, crop, target):
            ids = pipe._get_add_time_ids(original, crop, target, dtype=prompt_embeds.dtype,
                                         text_encoder_projection_dim=projection_dim)
            return ids.to(device).repeat(batch, 1)

        add_time_ids = time_ids(original_size, call["crops_coords_top_left"], target_size)
        negative_time_ids = add_time_ids
        if call["negative_original_size"] is not None and call["negative_target_size"] is not None:
            negative_time_ids = time_ids(call["negative_original_size"], call["negative_crops_coords_top_left"],
                                         call["negative_target_size"])
        branch = _without_none(timestep_cond=timestep_cond)
        cond = {"encoder_hidden_states": prompt_embeds.to(device), **branch,
                "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": add_time_ids}}
        uncond = None
        if guidance is not None:
            uncond = {"encoder_hidden_states": negative_embeds.to(device), **branch,
                      "added_cond_kwargs": {"text_embeds": negative_pooled.to(device), "time_ids": negative_time_ids}}
        run = _Run(_forward(pipe.unet), latents, cond, uncond, _without_none(cross_attention_kwargs=cak))
        latents = _sample(pipe, state, run, guidance, call)
        image = latents if call["output_type"] == "latent" else self._decode(pipe, latents, call["output_type"])
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        return _output(pipe, call, StableDiffusionXLPipelineOutput, image)

    def _decode(self, pipe, latents, output_type):
        vae = pipe.vae
        # fp16 SDXL VAEs overflow; diffusers decodes those in fp32 (force_upcast).
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            view = dict(device=latents.device, dtype=latents.dtype)
            latents = (latents * torch.tensor(std).view(1, -1, 1, 1).to(**view) / vae.config.scaling_factor
                       + torch.tensor(mean).view(1, -1, 1, 1).to(**view))
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)


# -- Flux ---------------------------------------------------------------------------------------------

class _Flux(_Adapter):
    name = "FluxPipeline"
    components = (("transformer",), ("vae",))
    unsupported = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                   "negative_ip_adapter_image_embeds")

    def call(self, pipe, state, call):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        height = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(call["prompt"], call["prompt_2"], height, width, negative_prompt=call["negative_prompt"],
                          negative_prompt_2=call["negative_prompt_2"], prompt_embeds=call["prompt_embeds"],
                          negative_prompt_embeds=call["negative_prompt_embeds"],
                          pooled_prompt_embeds=call["pooled_prompt_embeds"],
                          negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
                          callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
                          max_sequence_length=call["max_sequence_length"])
        pipe._guidance_scale = call["guidance_scale"]
        pipe._joint_attention_kwargs = call["joint_attention_kwargs"]
        pipe._current_timestep = None
        pipe._interrupt = False
        device = pipe._execution_device
        jak = call["joint_attention_kwargs"]
        has_negative = call["negative_prompt"] is not None or (
            call["negative_prompt_embeds"] is not None and call["negative_pooled_prompt_embeds"] is not None)
        # True CFG (the pipeline's true_cfg_scale); guidance_scale is FLUX.1-dev's embedded guidance.
        guidance = _guidance(state, call["true_cfg_scale"], 0.0, call["true_cfg_scale"] > 1 and has_negative)
        encode = functools.partial(pipe.encode_prompt, device=device, num_images_per_prompt=call["num_images_per_prompt"],
                                   max_sequence_length=call["max_sequence_length"], lora_scale=(jak or {}).get("scale"))
        prompt_embeds, pooled, text_ids = encode(prompt=call["prompt"], prompt_2=call["prompt_2"],
                                                 prompt_embeds=call["prompt_embeds"],
                                                 pooled_prompt_embeds=call["pooled_prompt_embeds"])
        uncond = None
        if guidance is not None:
            negative_prompt = call["negative_prompt"]
            if negative_prompt is None and call["negative_prompt_embeds"] is None:
                negative_prompt = ""
            negative_embeds, negative_pooled, negative_ids = encode(
                prompt=negative_prompt, prompt_2=call["negative_prompt_2"],
                prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["negative_pooled_prompt_embeds"])
            if negative_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds "
                                 f"{tuple(prompt_embeds.shape)}, got {tuple(negative_embeds.shape)}")
            uncond = {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled}
        batch = prompt_embeds.shape[0]
        latents, image_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width,
                                                  prompt_embeds.dtype, device, call["generator"], call["latents"])
        cfg = state.scheduler.config  # the shift range is the model's, kept in its own scheduler config
        sigmas = call["sigmas"]
        if sigmas is None and not pipe.scheduler.config.get("use_flow_sigmas", False):
            n = call["num_inference_steps"]
            sigmas = np.linspace(1.0, 1 / n, n)
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        retrieve_timesteps(pipe.scheduler, call["num_inference_steps"], device, sigmas=sigmas, mu=mu)
        branch = {}
        if pipe.transformer.config.guidance_embeds:
            branch["guidance"] = torch.full([batch], call["guidance_scale"], device=device, dtype=torch.float32)
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, **branch}
        if uncond is not None:
            uncond.update(branch)
        transformer = pipe.transformer

        def model(x, t, **kw):
            # Flux's transformer takes the flow time in [0, 1], the scheduler's timestep / 1000.
            return transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, return_dict=False, **kw)[0]

        shared = {"txt_ids": text_ids, "img_ids": image_ids, **_without_none(joint_attention_kwargs=jak)}
        latents = _sample(pipe, state, _Run(model, latents, cond, uncond, shared), guidance, call)
        image = latents
        if call["output_type"] != "latent":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=call["output_type"])
        from diffusers.pipelines.flux import FluxPipelineOutput

        return _output(pipe, call, FluxPipelineOutput, image)


# -- Wan 2.1 text-to-video ---------------------------------------------------------------------------------

class _Wan(_Adapter):
    name = "WanPipeline"
    components = (("transformer",), ("vae",))

    def check_components(self, pipe) -> None:
        super().check_components(pipe)
        # Wan 2.2's two experts switch models and guidance scales mid-run, and its TI2V model takes per-token
        # timesteps: neither is one model under one schedule.
        if pipe.config.get("boundary_ratio") is not None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("WanPipeline with transformer_2 / boundary_ratio (Wan 2.2 A14B) is not supported by "
                             "stepfuse.accelerate; use a drop-in scheduler")
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("WanPipeline with expand_timesteps=True (per-token timesteps) is not supported by "
                             "stepfuse.accelerate; use a drop-in scheduler")

    def call(self, pipe, state, call):
        height, width, frames = call["height"], call["width"], call["num_frames"]
        pipe.check_inputs(call["prompt"], call["negative_prompt"], height, width, call["prompt_embeds"],
                          call["negative_prompt_embeds"], call["callback_on_step_end_tensor_inputs"],
                          call["guidance_scale_2"])
        temporal = pipe.vae_scale_factor_temporal
        if frames % temporal != 1:
            frames = frames // temporal * temporal + 1
        frames = max(frames, 1)
        patch = pipe.transformer.config.patch_size
        height = height // (pipe.vae_scale_factor_spatial * patch[1]) * pipe.vae_scale_factor_spatial * patch[1]
        width = width // (pipe.vae_scale_factor_spatial * patch[2]) * pipe.vae_scale_factor_spatial * patch[2]
        pipe._guidance_scale = call["guidance_scale"]
        pipe._attention_kwargs = call["attention_kwargs"]
        pipe._current_timestep = None
        pipe._interrupt = False
        device = pipe._execution_device
        guidance = _guidance(state, call["guidance_scale"], 0.0, call["guidance_scale"] > 1.0)
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=call["prompt"], negative_prompt=call["negative_prompt"],
            do_classifier_free_guidance=guidance is not None, num_videos_per_prompt=call["num_videos_per_prompt"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            max_sequence_length=call["max_sequence_length"], device=device)
        transformer = pipe.transformer
        pipe.scheduler.set_timesteps(call["num_inference_steps"], device=device)
        latents = pipe.prepare_latents(prompt_embeds.shape[0], transformer.config.in_channels, height, width, frames,
                                       torch.float32, device, call["generator"], call["latents"])
        uncond = None if negative_embeds is None else {"encoder_hidden_states": negative_embeds.to(transformer.dtype)}

        def model(x, t, **kw):
            return transformer(hidden_states=x.to(transformer.dtype), timestep=t, return_dict=False, **kw)[0].to(x.dtype)

        run = _Run(model, latents, {"encoder_hidden_states": prompt_embeds.to(transformer.dtype)}, uncond,
                   _without_none(attention_kwargs=call["attention_kwargs"]))
        latents = _sample(pipe, state, run, guidance, call)
        video = latents
        if call["output_type"] != "latent":
            vae = pipe.vae
            latents = latents.to(vae.dtype)
            view = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
            std = torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
            # Wan's latents are normalised per channel: undo it before decoding.
            video = vae.decode(latents * std + mean, return_dict=False)[0]
            video = pipe.video_processor.postprocess_video(video, output_type=call["output_type"])
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

        return _output(pipe, call, WanPipelineOutput, video)


_ADAPTERS: Dict[str, _Adapter] = {a.name: a for a in (_ClassConditional(), _StableDiffusion(), _StableDiffusionXL(),
                                                       _Flux(), _Wan())}
#: Pipeline classes :func:`accelerate` supports.
SUPPORTED_PIPELINES = tuple(_ADAPTERS)

__all__ = ["accelerate", "restore", "build_scheduler", "SOLVERS", "SUPPORTED_PIPELINES"]
