"""Guidance variants, each a small config object that the fused guided step runs.

Every variant here turns the branch predictions into a guided prediction that is, per
sample, a linear combination of the branches (and of the sample, and of the APG
momentum buffer); its weights depend on at most a few inner products.  stepfuse computes
those in one reduction pass (``torch.ops.stepfuse.guidance_stats``) and folds the
combination into the solver step (``torch.ops.stepfuse.guided_step``): at most two
passes over the latent per step, whatever the variant (``csrc/include/stepfuse/guidance.h``).

The variants and their papers:

* :class:`ClassifierFreeGuidance` — Ho & Salimans 2022: ``u + w (c - u)`` (diffusers'
  formulation; the paper's original ``c + w (c - u)`` with ``use_original_formulation``).
* ``guidance_rescale`` (every variant) — Lin et al. 2024, "Common Diffusion Noise
  Schedules and Sample Steps are Flawed", eq. 15-16:
  ``g <- phi * g * std(c) / std(g) + (1 - phi) * g``.
* :class:`AdaptiveProjectedGuidance` — Sadat et al. 2025, "Eliminating Oversaturation and
  Artifacts of High Guidance Scales in Diffusion Models", Alg. 1: the update
  ``d = c - u`` (plus momentum ``beta`` times the previous one) clipped to norm ``r`` and
  split into parts parallel and orthogonal to ``c``; ``g = u + w (d_perp + eta d_par)``.
* :class:`ClassifierFreeZeroStarGuidance` — Fan et al. 2025, "CFG-Zero*", eq. 7: the
  unconditional branch scaled by ``s* = <c, u> / ||u||^2``, and the first
  ``zero_init_steps`` steps output zero (no model evaluation at all here).
* :class:`DualClassifierFreeGuidance` — Brooks et al. 2023 (InstructPix2Pix), eq. 3:
  ``u + s_I (c_I - u) + s_T (c_TI - c_I)``.
* A limited guidance interval (every variant) — Kynkäänniemi et al. 2024, "Applying
  Guidance in a Limited Interval Improves Sample and Distribution Quality": guidance only
  for ``sigma_lo < sigma <= sigma_hi`` (``sigma_interval``) or for the steps in
  ``[start, stop)`` as fractions of the run (diffusers' guiders); elsewhere the
  unconditional pass is skipped.
* ``target``: guidance on the raw model output (``"output"``, as diffusers pipelines) or
  on the solver's data prediction (``"denoised"``, as APG and CFG++-style samplers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Guidance",
    "ClassifierFreeGuidance",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeZeroStarGuidance",
    "DualClassifierFreeGuidance",
    "CFG",
    "APG",
    "CFGZeroStar",
    "DualCFG",
    "RULE_SIZE",
    "GuidedInputs",
    "prepare_guided",
    "guided_output",
]

# Layout of the rule list the ops take; mirrors GuideParam in csrc/include/stepfuse/guidance.h.
(_KIND, _EXTRA, _STATS_X, _MOMENTUM, _P, _Q, _A0, _A1, _A2, _THRESHOLD, _BETA, _RESCALE) = range(12)
RULE_SIZE = 12
_LINEAR, _ZERO_STAR, _PROJECTED = 0, 1, 2
_TARGETS = ("output", "denoised")


def _check_real(cls: str, name: str, value, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cls}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{cls}: {name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{cls}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{cls}: {name} must be <= {maximum}, got {value}")
    return value


@dataclass(frozen=True)
class Guidance:
    """Options every variant shares; see the module docstring for the formulas.

    Args:
        guidance_scale: the guidance weight ``w``.
        guidance_rescale: ``phi`` of guidance_rescale (0 turns it off).
        start, stop: guidance only on steps ``int(start * N) <= i < int(stop * N)`` of an
            ``N``-step run, as diffusers' guiders.
        sigma_interval: ``(sigma_lo, sigma_hi)``: guidance only where
            ``sigma_lo < sigma <= sigma_hi`` (sigma as the scheduler's, ``t`` for flow matching).
        target: ``"output"`` (the raw model output) or ``"denoised"`` (the data prediction).
    """

    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    sigma_interval: Optional[Tuple[float, float]] = None
    target: str = "output"

    # Scale at which the variant reduces to the conditional prediction alone.
    _identity_scale = 1.0

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                object.__setattr__(self, f.name, _check_real(cls, f.name, value))
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise TypeError(f"{cls}: {f.name} must be a bool, got {type(value).__name__}")
        _check_real(cls, "guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _check_real(cls, "start", self.start, 0.0, 1.0)
        _check_real(cls, "stop", self.stop, 0.0, 1.0)
        if self.start > self.stop:
            raise ValueError(f"{cls}: start must be <= stop, got start={self.start}, stop={self.stop}")
        if self.sigma_interval is not None:
            if not isinstance(self.sigma_interval, (tuple, list)) or len(self.sigma_interval) != 2:
                raise ValueError(f"{cls}: sigma_interval must be a (sigma_lo, sigma_hi) pair, got {self.sigma_interval!r}")
            lo = _check_real(cls, "sigma_interval[0]", self.sigma_interval[0], 0.0)
            hi = _check_real(cls, "sigma_interval[1]", self.sigma_interval[1], 0.0)
            if not lo < hi:
                raise ValueError(f"{cls}: sigma_interval must have sigma_lo < sigma_hi, got {self.sigma_interval!r}")
            object.__setattr__(self, "sigma_interval", (lo, hi))
        if self.target not in _TARGETS:
            raise ValueError(f"{cls}: target must be one of {_TARGETS}, got {self.target!r}")

    # -- what a step needs (host-side, from the schedule alone) -------------------------------
    @property
    def enabled(self) -> bool:
        """Whether any step can need the unconditional branch."""
        return not math.isclose(self.guidance_scale, self._identity_scale) and self.start < self.stop

    @property
    def num_branches(self) -> int:
        """Branches a guided step evaluates: cond, uncond (and extra for two conditions)."""
        return 2

    def zero_step(self, step_index: int) -> bool:
        """Whether step ``step_index`` outputs zero without evaluating the model (CFG-Zero*)."""
        return False

    def active(self, step_index: int, num_steps: int, sigma: Optional[float] = None) -> bool:
        """Whether step ``step_index`` of ``num_steps`` applies guidance (else: cond only)."""
        if not self.enabled:
            return False
        if not int(self.start * num_steps) <= step_index < int(self.stop * num_steps):
            return False
        if self.sigma_interval is not None:
            if sigma is None:
                raise ValueError(f"{type(self).__name__}: sigma_interval needs the step's sigma")
            lo, hi = self.sigma_interval
            return lo < sigma <= hi
        return True

    def check_schedule(self, sigmas: Sequence[float]) -> None:
        """Reject a ``sigma_interval`` that no step of the schedule falls in."""
        if self.sigma_interval is None or not self.enabled:
            return
        lo, hi = self.sigma_interval
        if not any(lo < s <= hi for s in sigmas):
            raise ValueError(
                f"{type(self).__name__}: sigma_interval {self.sigma_interval} is outside the schedule "
                f"(sigmas {min(sigmas):.4g} .. {max(sigmas):.4g}): guidance would never apply"
            )

    # -- the fused step's rule ----------------------------------------------------------------
    def rule(self, conversion: Tuple[float, float] = (0.0, 1.0)) -> list:
        """The ``rule`` list of ``guided_step``: ``conversion`` is the step's ``(p, q)`` with
        data prediction ``p * sample + q * output`` (used when ``target="denoised"``)."""
        r = [0.0] * RULE_SIZE
        if self.target == "denoised":
            p, q = (float(v) for v in conversion)
            if q == 0.0 or not (math.isfinite(p) and math.isfinite(q)):
                raise ValueError(f"{type(self).__name__}: target='denoised' needs a finite conversion with q != 0, "
                                 f"got {conversion}")
            r[_P], r[_Q], r[_STATS_X] = p, q, float(p != 0.0)
        else:
            r[_Q] = 1.0
        r[_RESCALE] = self.guidance_rescale
        self._fill_rule(r)
        return r

    def _fill_rule(self, r: list) -> None:
        raise NotImplementedError

    @property
    def uses_momentum(self) -> bool:
        return False


@dataclass(frozen=True)
class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance: ``u + w (c - u)``, or ``c + w (c - u)`` with
    ``use_original_formulation`` (diffusers' ``ClassifierFreeGuidance`` semantics)."""

    use_original_formulation: bool = False

    @property
    def _identity_scale(self) -> float:
        return 0.0 if self.use_original_formulation else 1.0

    def _fill_rule(self, r: list) -> None:
        w = self.guidance_scale
        r[_KIND] = _LINEAR
        r[_A0], r[_A1] = (1.0 + w, -w) if self.use_original_formulation else (w, 1.0 - w)


@dataclass(frozen=True)
class ClassifierFreeZeroStarGuidance(ClassifierFreeGuidance):
    """CFG-Zero* (Fan et al. 2025): optimised scale ``s*`` on the unconditional branch and
    zero output for the first ``zero_init_steps`` steps (diffusers'
    ``ClassifierFreeZeroStarGuidance`` semantics).

    The zero-init step is a zero velocity, meant for flow-matching models (the sample stays
    put); for epsilon- or v-prediction models a zero output is not a neutral step, so use
    ``zero_init_steps=0`` there."""

    zero_init_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.zero_init_steps, bool) or not isinstance(self.zero_init_steps, int) or self.zero_init_steps < 0:
            raise ValueError(f"ClassifierFreeZeroStarGuidance: zero_init_steps must be an int >= 0, "
                             f"got {self.zero_init_steps!r}")

    def zero_step(self, step_index: int) -> bool:
        return step_index < self.zero_init_steps

    def _fill_rule(self, r: list) -> None:
        r[_KIND] = _ZERO_STAR
        r[_A0], r[_A1] = self.guidance_scale, float(self.use_original_formulation)


@dataclass(frozen=True)
class AdaptiveProjectedGuidance(ClassifierFreeGuidance):
    """APG (Sadat et al. 2025), with diffusers' ``AdaptiveProjectedGuidance`` options:
    ``eta`` (weight of the part parallel to ``c``), ``norm_threshold`` (diffusers'
    ``adaptive_projected_guidance_rescale``; 0 turns clipping off) and ``momentum``
    (``adaptive_projected_guidance_momentum``; None: no momentum buffer)."""

    eta: float = 1.0
    norm_threshold: float = 15.0
    momentum: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_real("AdaptiveProjectedGuidance", "eta", self.eta)
        _check_real("AdaptiveProjectedGuidance", "norm_threshold", self.norm_threshold, 0.0)
        if self.momentum is not None:
            object.__setattr__(self, "momentum", _check_real("AdaptiveProjectedGuidance", "momentum", self.momentum))

    @property
    def uses_momentum(self) -> bool:
        return self.momentum is not None

    def _fill_rule(self, r: list) -> None:
        r[_KIND] = _PROJECTED
        r[_A0], r[_A1], r[_A2] = self.guidance_scale, float(self.use_original_formulation), self.eta
        r[_THRESHOLD] = self.norm_threshold
        if self.momentum is not None:
            r[_MOMENTUM], r[_BETA] = 1.0, self.momentum


@dataclass(frozen=True)
class DualClassifierFreeGuidance(Guidance):
    """Two-condition guidance (InstructPix2Pix, Brooks et al. 2023, eq. 3):
    ``u + s_I (c_I - u) + s_T (c_TI - c_I)`` with ``guidance_scale`` ``s_T`` on the full
    condition ``c_TI`` (the ``cond`` branch) and ``image_guidance_scale`` ``s_I`` on the
    partial one ``c_I`` (the ``extra`` branch)."""

    image_guidance_scale: float = 1.5

    @property
    def enabled(self) -> bool:
        return (not (math.isclose(self.guidance_scale, 1.0) and math.isclose(self.image_guidance_scale, 1.0))
                and self.start < self.stop)

    @property
    def num_branches(self) -> int:
        return 3

    def _fill_rule(self, r: list) -> None:
        s_t, s_i = self.guidance_scale, self.image_guidance_scale
        r[_KIND], r[_EXTRA] = _LINEAR, 1.0
        r[_A0], r[_A1], r[_A2] = s_t, 1.0 - s_i, s_i - s_t


CFG = ClassifierFreeGuidance
APG = AdaptiveProjectedGuidance
CFGZeroStar = ClassifierFreeZeroStarGuidance
DualCFG = DualClassifierFreeGuidance


@dataclass
class GuidedInputs:
    """Everything a fused guided step reads besides the solver program (``guided_step``)."""

    branches: List[torch.Tensor]
    rule: list
    stats: Optional[torch.Tensor]
    momentum: Optional[torch.Tensor]


def prepare_guided(guidance: Guidance, sample: torch.Tensor, branches: Sequence[torch.Tensor],
                   momentum: Optional[torch.Tensor] = None,
                   conversion: Tuple[float, float] = (0.0, 1.0)) -> GuidedInputs:
    """The rule of ``guidance`` at a step with ``conversion``, and the one reduction pass
    (``guidance_stats``) when the variant's weights depend on the data."""
    if len(branches) != guidance.num_branches:
        raise ValueError(f"{type(guidance).__name__} needs {guidance.num_branches} branches, got {len(branches)}")
    if guidance.uses_momentum and momentum is None:
        raise ValueError(f"{type(guidance).__name__} with momentum needs the momentum buffer")
    rule = _cached_rule(guidance, tuple(conversion))
    stats = None
    if rule[_KIND] != _LINEAR or rule[_RESCALE] != 0.0:
        operands = ([sample] if rule[_STATS_X] else []) + list(branches) + ([momentum] if rule[_MOMENTUM] else [])
        stats = _ops().guidance_stats(operands)
    return GuidedInputs(list(branches), rule, stats, momentum if rule[_MOMENTUM] else None)


def guided_output(guidance: Guidance, sample: torch.Tensor, branches: Sequence[torch.Tensor],
                  momentum: Optional[torch.Tensor] = None,
                  conversion: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The guided raw model output alone, for a scheduler that cannot fuse it into its step."""
    from .solvers.program import OUTPUT, StepProgram

    guided = prepare_guided(guidance, sample, branches, momentum, conversion)
    identity = StepProgram.build(0, [(OUTPUT, {"out": 1.0})])
    empty = sample.new_empty((0, *sample.shape))
    return _ops().guided_step(sample, guided.branches, guided.stats, guided.momentum, guided.rule, empty, identity)


@functools.lru_cache(maxsize=256)
def _cached_rule(guidance: Guidance, conversion: tuple) -> list:
    # Configs are frozen and hashable: a run computes each (config, conversion) rule once.
    return guidance.rule(conversion)


def _ops():
    # Imported on first use: this module is configuration and must import without the extension.
    from . import ops

    return ops
