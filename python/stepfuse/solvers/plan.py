"""Sampling plans: an optimised schedule and per-evaluation solver adjustments, saved as JSON.

A :class:`SamplingPlan` holds what the optimisers in :mod:`stepfuse.plans` produce:

* ``sigmas``: the ``K + 1`` noise levels a sampler visits (k-diffusion's ``sigmas``; a diffusers
  scheduler's ``scheduler.sigmas``), e.g. an optimal schedule chosen by dynamic programming over
  a teacher trajectory ("Optimal Stepsize for Diffusion Sampling", Pei et al. 2025);
* ``scales``: one scalar ``lambda_k`` per model evaluation, the D-ODE adjustment ("Distilling
  ODE Solvers of Diffusion Models into Smaller Steps", Kim et al. 2024, eq. 7 applied to the
  data prediction): the solver sees ``D~_k = D_k + lambda_k (D_k - mean(D_0 .. D_{k-1}))``
  instead of the model's ``D_k``. ``lambda_0`` is 0 (there is no earlier output);
* ``shifted_sigmas``: the noise level each step's sample is taken to be at, where the model is
  evaluated and the step starts ("Alleviating Exposure Bias in Diffusion Models through
  Sampling with Shifted Time Steps", Li et al. 2024): the previous step still lands on
  ``sigmas[i]``.

The D-ODE adjustment is linear in the operands, so it folds into every step's
:class:`~stepfuse.solvers.program.StepProgram` (:func:`extrapolate_denoised`): two extra history
slots hold the running mean of the data predictions, alternating as read/write slot, and the
step stays one fused kernel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from .program import MAX_SLOTS, OUTPUT, StepProgram

PLAN_FORMAT = "stepfuse.sampling_plan/1"


def _floats(name: str, values, length: Optional[int] = None) -> Tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of floats, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"{name} must hold numbers, got {v!r}")
        out.append(float(v))
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(out)}")
    return tuple(out)


@dataclass(frozen=True)
class SamplingPlan:
    """An optimised sampling plan; see the module docstring for the fields' meaning.

    Args:
        sigmas: ``K + 1`` strictly decreasing noise levels, positive except possibly the last.
        scales: ``None`` or one D-ODE scale per model evaluation (``scales[0] == 0``).
        shifted_sigmas: ``None`` or ``K`` positive noise levels, where each step starts.
        solver: the sampler the plan was fitted for (e.g. ``"dpmpp_2m"``); informative.
        metadata: JSON-serialisable notes (teacher, fit errors, ...).
    """

    sigmas: Tuple[float, ...]
    scales: Optional[Tuple[float, ...]] = None
    shifted_sigmas: Optional[Tuple[float, ...]] = None
    solver: str = ""
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        sigmas = _floats("sigmas", self.sigmas)
        if len(sigmas) < 2:
            raise ValueError(f"sigmas must have at least 2 entries (one step), got {len(sigmas)}")
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be strictly decreasing, got {list(sigmas)}")
        if sigmas[-1] < 0.0 or any(s <= 0.0 for s in sigmas[:-1]):
            raise ValueError(f"sigmas must be positive (the last may be 0), got {list(sigmas)}")
        object.__setattr__(self, "sigmas", sigmas)
        if self.scales is not None:
            scales = _floats("scales", self.scales)
            if not scales:
                raise ValueError("scales must have one entry per model evaluation, got none")
            if scales[0] != 0.0:
                raise ValueError(f"scales[0] must be 0 (the first evaluation has no earlier output), got {scales[0]}")
            object.__setattr__(self, "scales", scales)
        if self.shifted_sigmas is not None:
            shifted = _floats("shifted_sigmas", self.shifted_sigmas, len(sigmas) - 1)
            if any(s <= 0.0 for s in shifted):
                raise ValueError(f"shifted_sigmas must be positive, got {list(shifted)}")
            object.__setattr__(self, "shifted_sigmas", shifted)
        if not isinstance(self.solver, str):
            raise TypeError(f"solver must be a str, got {type(self.solver).__name__}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(self.metadata).__name__}")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def replace(self, **changes) -> "SamplingPlan":
        """A copy with ``changes`` applied, validated like a new plan."""
        return dataclasses.replace(self, **changes)

    def check_scales(self, num_evaluations: int, who: str) -> None:
        """Raise unless the plan's scales fit ``num_evaluations`` model evaluations of ``who``."""
        if self.scales is not None and len(self.scales) != num_evaluations:
            raise ValueError(
                f"plan has {len(self.scales)} scales but {who} makes {num_evaluations} model evaluations"
            )

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "solver": self.solver,
            "sigmas": list(self.sigmas),
            "scales": None if self.scales is None else list(self.scales),
            "shifted_sigmas": None if self.shifted_sigmas is None else list(self.shifted_sigmas),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data) -> "SamplingPlan":
        if not isinstance(data, dict):
            raise TypeError(f"a plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format must be {PLAN_FORMAT!r}, got {data.get('format')!r}")
        unknown = set(data) - {"format", "solver", "sigmas", "scales", "shifted_sigmas", "metadata"}
        if unknown:
            raise ValueError(f"plan has unknown keys {sorted(unknown)}")
        if "sigmas" not in data:
            raise ValueError("plan needs 'sigmas'")
        return cls(sigmas=data["sigmas"], scales=data.get("scales"), shifted_sigmas=data.get("shifted_sigmas"),
                   solver=data.get("solver", ""), metadata=data.get("metadata") or {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SamplingPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "SamplingPlan":
        with open(os.fspath(path), encoding="utf-8") as f:
            return cls.from_json(f.read())


def as_plan(plan) -> SamplingPlan:
    """A :class:`SamplingPlan` from a plan, a dict, or the path of a saved plan."""
    if isinstance(plan, SamplingPlan):
        return plan
    if isinstance(plan, dict):
        return SamplingPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return SamplingPlan.load(plan)
    raise TypeError(f"plan must be a SamplingPlan, a dict or a path, got {type(plan).__name__}")


def extrapolate_denoised(program: StepProgram, scale: float, evaluation: int, num_slots: int,
                         conversion: Tuple[float, float] = (0.0, 1.0)) -> StepProgram:
    """``program`` run on the D-ODE output ``D~ = D + scale (D - Dbar)`` instead of the model's.

    ``conversion = (p, q)`` gives the step's data prediction ``D = p x + q out`` from its sample
    and raw model output (``(0, 1)`` when the model output is ``D``). ``evaluation`` (``k``)
    counts model evaluations from 0; the running mean ``Dbar`` of ``D_0 .. D_{k-1}`` lives in
    slot ``num_slots + k % 2`` and this program writes the mean including ``D_k`` into the
    other one, so the result has ``num_slots + 2`` slots (``program``'s own slots keep their
    indices; ``num_slots >= program.num_slots`` fixes the layout across a run).
    """
    p, q = float(conversion[0]), float(conversion[1])
    if q == 0.0:
        raise ValueError("conversion must use the model output (q != 0)")
    if num_slots < program.num_slots or num_slots + 2 > MAX_SLOTS:
        raise ValueError(
            f"a D-ODE plan needs 2 history slots beyond the solver's {program.num_slots}; at most {MAX_SLOTS} in all"
        )
    k = int(evaluation)
    read, write = num_slots + k % 2, num_slots + (k + 1) % 2
    if k == 0 and scale != 0.0:
        raise ValueError(f"the scale of evaluation 0 must be 0, got {scale}")
    # Running mean: Dbar_{k+1} = (k Dbar_k + D_k) / (k + 1).
    mean_row = {"x": p / (k + 1), "out": q / (k + 1)}
    if k:
        mean_row[read] = k / (k + 1)
    rows = [(write, mean_row)]
    width = program.width
    for r, target in enumerate(program.targets):
        coeffs = program.row(r)
        terms = {"x": coeffs[0], "noise": coeffs[width - 1]}
        terms.update({s: coeffs[2 + s] for s in range(program.num_slots)})
        a = coeffs[1]
        if a and scale:
            # a * out~ with p x + q out~ = (1 + scale)(p x + q out) - scale * Dbar.
            terms["out"] = a * (1.0 + scale)
            terms["x"] += a * scale * p / q
            terms[read] = terms.get(read, 0.0) - a * scale / q
        else:
            terms["out"] = a
        rows.append((target, terms))
    return StepProgram.build(num_slots + 2, rows)


def max_slots(programs: Sequence[Optional[StepProgram]]) -> int:
    return max((p.num_slots for p in programs if p is not None), default=0)


__all__ = ["PLAN_FORMAT", "SamplingPlan", "as_plan", "extrapolate_denoised"]
