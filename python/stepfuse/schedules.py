"""Noise schedules and step spacings, computed on the host in float64.

Everything here is a pure function of plain numbers and NumPy arrays: float64 in,
float64 out (integer timesteps come back as int64). The solver plans
(:mod:`stepfuse.solvers`) and the drop-in diffusers schedulers build on these.

Notation. A *VP* (variance-preserving) model has ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t**2 + sigma_t**2 = 1`` and ``alpha_t**2 = alphas_cumprod[t]``. Its *VE-equivalent*
sigma ``s = sigma_t / alpha_t = sqrt((1 - a) / a)`` is what diffusers' Euler family,
Karras-style schedules and k-diffusion call "sigma". A *flow* (rectified-flow) model has
``x_t = (1 - s) x_0 + s eps`` with ``s`` in [0, 1]. ``lambda = log(alpha_t / sigma_t)`` is
half the log-SNR (Lu et al. 2022, DPM-Solver).

Sources:

* Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (linear betas).
* Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 (cosine ``alpha_bar``, ``squaredcos_cap_v2``).
* Rombach et al. 2022, latent diffusion (``scaled_linear``).
* Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  Alg. 1 (zero terminal SNR) and Table 2 (``linspace`` / ``leading`` / ``trailing`` spacing).
* Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
  eq. 5 (rho schedule) and Table 1 (``c_noise = log(sigma) / 4``).
* Lu et al. 2022, "DPM-Solver" (steps uniform in lambda).
* Lee et al. 2024, "Beta Sampling is All You Need" (beta-quantile sigmas).
* Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3), eq. 23 (timestep shift);
  Flux's resolution-dependent ``mu`` (``calculate_shift``) and ``time_shift``.

Parity with diffusers. Each function reproduces the corresponding diffusers 0.42.1 code
path for the same configuration (see the docstrings). diffusers stores betas,
``alphas_cumprod`` and the VP sigmas in float32; near ``t = 0`` that rounding moves the
sigmas by up to ~3e-4 relative (``1 - alphas_cumprod`` cancels). The functions that build
those arrays therefore take ``precision``: ``"float64"`` (default) does the exact math,
``"float32"`` rounds the stored arrays exactly the way diffusers does (the few float32
operations that NumPy cannot reproduce bit for bit are evaluated with torch). Results are
float64 arrays either way. Where diffusers does arithmetic on float32 arrays
(:func:`sigma_to_t` against its float32 log-sigma table, the flow shifts of float32 custom
sigmas) a float32 input array is computed the same way; float64 inputs stay float64.
:func:`diffusers_set_timesteps` assembles the pieces into a complete ``set_timesteps`` for
each supported diffusers scheduler; with ``precision="float32"`` it matches diffusers'
integer timesteps exactly and its float arrays to float32 rounding.

Deliberate differences from diffusers (each would otherwise give a silently wrong result):

* ``trailing`` spacing: for some step counts (e.g. 61 of 1000) diffusers' float ``arange``
  yields one extra timestep equal to ``-1``; it is dropped here.
* Step counts that would repeat a timestep, or timesteps that leave ``[0, T - 1]``, raise
  ``ValueError`` instead of producing a degenerate schedule.
* ``shift_terminal`` with a single step (diffusers divides 0 by 0) raises ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "SPACING_VARIANTS",
    "SIGMA_SCHEDULES",
    "FINAL_SIGMAS_TYPES",
    "TIME_SHIFT_TYPES",
    "ZERO_SNR_ALPHA_CUMPROD",
    "SUPPORTED_SCHEDULERS",
    "betas_for_alpha_bar",
    "betas_for_schedule",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas",
    "vp_sigmas",
    "vp_lambdas",
    "last_timestep_for_lambda_min",
    "timesteps_from_spacing",
    "interpolate_sigmas",
    "log_linear_sigmas",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "uniform_lambda_sigmas",
    "edm_sigmas",
    "edm_noise_conditioning",
    "sigma_to_t",
    "sigma_to_alpha_sigma_t",
    "shift_sigmas",
    "time_shift",
    "stretch_shift_to_terminal",
    "calculate_shift",
    "flow_sigmas",
    "multistep_flow_sigmas",
    "append_final_sigma",
    "heun_interleave",
    "ScheduleArrays",
    "diffusers_set_timesteps",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
SPACING_VARIANTS = ("ddim", "euler", "multistep")
SIGMA_SCHEDULES = ("karras", "exponential", "beta")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")
PRECISIONS = ("float64", "float32")
#: What diffusers' Euler / Euler-ancestral / DPM-Solver / UniPC put in ``alphas_cumprod[-1]``
#: after zero-terminal-SNR rescaling, so that the last sigma stays finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def _check_float(
    name: str,
    value: Any,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if gt is not None and not value > gt:
        raise ValueError(f"`{name}` must be > {gt}, got {value}")
    if ge is not None and not value >= ge:
        raise ValueError(f"`{name}` must be >= {ge}, got {value}")
    if lt is not None and not value < lt:
        raise ValueError(f"`{name}` must be < {lt}, got {value}")
    if le is not None and not value <= le:
        raise ValueError(f"`{name}` must be <= {le}, got {value}")
    return value


def _check_array(
    name: str,
    value: Any,
    *,
    min_len: int = 1,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    allow_inf: bool = False,
) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a 1-D array of real numbers, got {type(value).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {arr.shape}")
    if arr.shape[0] < min_len:
        raise ValueError(f"`{name}` must have at least {min_len} entries, got {arr.shape[0]}")
    if np.isnan(arr).any() or (not allow_inf and not np.isfinite(arr).all()):
        raise ValueError(f"`{name}` must be finite, got non-finite entries")
    if ge is not None and (arr < ge).any():
        raise ValueError(f"`{name}` entries must be >= {ge}, got min {arr.min()}")
    if gt is not None and (arr <= gt).any():
        raise ValueError(f"`{name}` entries must be > {gt}, got min {arr.min()}")
    if le is not None and (arr > le).any():
        raise ValueError(f"`{name}` entries must be <= {le}, got max {arr.max()}")
    return arr


def _check_decreasing(name: str, arr: np.ndarray, strict: bool = True) -> None:
    d = np.diff(arr)
    if (d >= 0).any() if strict else (d > 0).any():
        kind = "strictly decreasing" if strict else "non-increasing"
        raise ValueError(f"`{name}` must be {kind} (from high noise to low noise), got {arr.tolist()}")


def _check_precision(precision: str) -> None:
    _check_choice("precision", precision, PRECISIONS)


def _f32(x) -> np.ndarray:
    """Round to float32 and widen back: the values diffusers stores, held in float64."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _torch():
    import torch  # deferred: only the float32 (diffusers-compatible) paths need it

    return torch


# --------------------------------------------------------------------------------------
# discrete VP schedules
# --------------------------------------------------------------------------------------


def _alpha_bar_fn(kind: str):
    if kind == "cosine":
        # Nichol & Dhariwal 2021 eq. 17 with s = 0.008.
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(t * -12.0)
    if kind == "laplace":

        def laplace(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

        return laplace
    raise ValueError(f"`alpha_transform_type` must be one of ['cosine', 'exp', 'laplace'], got {kind!r}")


def betas_for_alpha_bar(
    num_train_timesteps: int, alpha_transform_type: str = "cosine", max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a continuous ``alpha_bar(t)``, t in [0, 1] (Nichol & Dhariwal 2021).

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``; ``max_beta`` keeps
    the last steps away from beta = 1 where the cosine schedule collapses.
    """
    n = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    max_beta = _check_float("max_beta", max_beta, gt=0.0, le=1.0)
    fn = _alpha_bar_fn(alpha_transform_type)
    # Scalar math.* keeps the values bit-identical to diffusers' Python loop.
    return np.array([min(1 - fn((i + 1) / n) / fn(i / n), max_beta) for i in range(n)], dtype=np.float64)


def betas_for_schedule(
    beta_schedule: str,
    num_train_timesteps: Optional[int],
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Optional[Sequence[float]] = None,
    *,
    precision: str = "float64",
) -> np.ndarray:
    """Training betas for a named schedule, as diffusers' schedulers build them in ``__init__``.

    ``beta_schedule``: ``"linear"`` (Ho et al. 2020: betas linear in t), ``"scaled_linear"``
    (latent diffusion: sqrt(beta) linear in t), ``"squaredcos_cap_v2"`` (cosine ``alpha_bar``,
    betas capped at 0.999) or ``"exp"`` (``alpha_bar = exp(-12 t)``; only diffusers' Heun
    scheduler accepts it). ``trained_betas``, when given, is returned as is (after checks) and
    the other arguments are ignored; ``num_train_timesteps`` may then be ``None``, otherwise it
    must equal ``len(trained_betas)``.

    ``precision="float32"`` rounds like diffusers, which builds the ramps with
    ``torch.linspace(..., dtype=float32)``.
    """
    _check_precision(precision)
    if trained_betas is not None:
        betas = _check_array("trained_betas", trained_betas, ge=0.0, le=1.0)
        if num_train_timesteps is not None:
            t = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
            if t != betas.shape[0]:
                raise ValueError(
                    f"`trained_betas` has {betas.shape[0]} entries but `num_train_timesteps` is {t}; "
                    "they must agree (or pass num_train_timesteps=None)"
                )
        return _f32(betas) if precision == "float32" else betas

    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    n = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    if beta_schedule in ("linear", "scaled_linear"):
        beta_start = _check_float("beta_start", beta_start, ge=0.0, le=1.0)
        beta_end = _check_float("beta_end", beta_end, ge=0.0, le=1.0)
    if beta_schedule == "linear":
        if precision == "float32":
            torch = _torch()
            return torch.linspace(beta_start, beta_end, n, dtype=torch.float32).double().numpy()
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        if precision == "float32":
            torch = _torch()
            ramp = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32)
            return (ramp**2).double().numpy()
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    kind = "cosine" if beta_schedule == "squaredcos_cap_v2" else "exp"
    betas = betas_for_alpha_bar(n, kind)
    return _f32(betas) if precision == "float32" else betas


def rescale_zero_terminal_snr(betas: Sequence[float], *, precision: str = "float64") -> np.ndarray:
    """Rescale betas so that the terminal SNR is exactly zero (Lin et al. 2023, Alg. 1).

    ``sqrt(alphas_cumprod)`` is shifted so its last entry is 0 and scaled so its first entry is
    unchanged; betas are then recovered from the ratios. The last beta becomes 1, so
    ``alphas_cumprod[-1] == 0`` and the last VE sigma is infinite: diffusers' Euler-family and
    multistep schedulers then overwrite ``alphas_cumprod[-1]`` with ``2**-24``
    (see ``final_alpha_cumprod`` in :func:`alphas_cumprod_from_betas`).
    """
    _check_precision(precision)
    b = _check_array("betas", betas, min_len=2, ge=0.0, le=1.0)
    if precision == "float32":
        torch = _torch()
        bt = torch.from_numpy(b).to(torch.float32)
        abs_ = torch.cumprod(1.0 - bt, dim=0).sqrt()
        first, last = abs_[0].clone(), abs_[-1].clone()
        if not bool(first > last):
            raise ValueError("`betas` must decrease alphas_cumprod from first to last entry to be rescaled")
        abs_ = (abs_ - last) * (first / (first - last))
        ab = abs_**2
        alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
        return (1 - alphas).double().numpy()
    abs_ = np.sqrt(np.cumprod(1.0 - b))
    first, last = abs_[0], abs_[-1]
    if not first > last:
        raise ValueError("`betas` must decrease alphas_cumprod from first to last entry to be rescaled")
    abs_ = (abs_ - last) * (first / (first - last))
    ab = abs_**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(
    betas: Sequence[float], *, final_alpha_cumprod: Optional[float] = None, precision: str = "float64"
) -> np.ndarray:
    """``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` (Ho et al. 2020).

    ``final_alpha_cumprod`` replaces the last entry when given; pass
    :data:`ZERO_SNR_ALPHA_CUMPROD` after :func:`rescale_zero_terminal_snr` to match diffusers'
    Euler, Euler-ancestral, DPM-Solver and UniPC schedulers (DDIM keeps the 0).

    ``precision="float32"``: alphas rounded to float32, the product accumulated in double and
    each entry rounded to float32 (what ``torch.cumprod`` does on CPU).
    """
    _check_precision(precision)
    b = _check_array("betas", betas, ge=0.0, le=1.0)
    if precision == "float32":
        alphas = (np.float32(1.0) - b.astype(np.float32)).astype(np.float64)
        out = _f32(np.cumprod(alphas))
    else:
        out = np.cumprod(1.0 - b)
    if final_alpha_cumprod is not None:
        out[-1] = _check_float("final_alpha_cumprod", final_alpha_cumprod, gt=0.0, le=1.0)
    return out


def vp_sigmas(alphas_cumprod: Sequence[float], *, precision: str = "float64") -> np.ndarray:
    """VE-equivalent sigmas ``sqrt((1 - a) / a)`` of a VP schedule, ascending with t.

    These are the "sigmas" of diffusers' Euler family and of k-diffusion's discrete wrappers
    (before flipping to descending order for sampling).
    """
    _check_precision(precision)
    a = _check_array("alphas_cumprod", alphas_cumprod, le=1.0)
    if (a <= 0).any():
        raise ValueError(
            "`alphas_cumprod` entries must be > 0 (a zero gives an infinite sigma; after zero-terminal-SNR "
            "rescaling pass final_alpha_cumprod=ZERO_SNR_ALPHA_CUMPROD to alphas_cumprod_from_betas)"
        )
    if precision == "float32":
        torch = _torch()
        at = torch.from_numpy(a).to(torch.float32)
        # torch's float32 pow(0.5) differs from sqrt in the last bit for some inputs; use diffusers' op.
        return (((1 - at) / at) ** 0.5).double().numpy()
    return np.sqrt((1.0 - a) / a)


def vp_lambdas(alphas_cumprod: Sequence[float], *, precision: str = "float64") -> np.ndarray:
    """Half log-SNR ``lambda_t = log(alpha_t) - log(sigma_t)`` per training step (DPM-Solver)."""
    _check_precision(precision)
    a = _check_array("alphas_cumprod", alphas_cumprod, gt=0.0, le=1.0)
    if precision == "float32":
        torch = _torch()
        at = torch.from_numpy(a).to(torch.float32)
        return (torch.log(torch.sqrt(at)) - torch.log(torch.sqrt(1 - at))).double().numpy()
    with np.errstate(divide="ignore"):
        return 0.5 * np.log(a) - 0.5 * np.log1p(-a)


def last_timestep_for_lambda_min(
    alphas_cumprod: Sequence[float], lambda_min_clipped: float = -math.inf, *, precision: str = "float64"
) -> int:
    """Number of leading training steps whose lambda is above ``lambda_min_clipped``.

    DPMSolverMultistep's ``lambda_min_clipped`` cuts the noisiest steps (where lambda is
    smallest) from the spacing; the returned ``last_timestep`` is the ``T - clipped_idx`` that
    :func:`timesteps_from_spacing` takes. ``-inf`` (the default) clips nothing.
    """
    lam = vp_lambdas(alphas_cumprod, precision=precision)
    if isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, numbers.Real):
        raise TypeError(f"`lambda_min_clipped` must be a real number, got {lambda_min_clipped!r}")
    if math.isnan(lambda_min_clipped):
        raise ValueError("`lambda_min_clipped` must not be NaN")
    lmc = float(lambda_min_clipped)
    if precision == "float32":
        lmc = float(np.float32(lmc))
    clipped = int(np.searchsorted(lam[::-1], lmc, side="left"))
    last = lam.shape[0] - clipped
    if last < 1:
        raise ValueError(f"`lambda_min_clipped`={lambda_min_clipped} clips every training step")
    return last


# --------------------------------------------------------------------------------------
# timestep spacings
# --------------------------------------------------------------------------------------


def timesteps_from_spacing(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str,
    steps_offset: int = 0,
    variant: str = "ddim",
    last_timestep: Optional[int] = None,
) -> np.ndarray:
    """Inference timesteps for a spacing rule (Lin et al. 2023, Table 2), descending.

    ``spacing``: ``"linspace"`` (evenly spread over the range, endpoints included),
    ``"leading"`` (multiples of ``T // n`` from 0, plus ``steps_offset``) or ``"trailing"``
    (from ``T - 1`` down in strides of ``T / n``).

    ``variant`` picks which scheduler family's exact rule is reproduced:

    * ``"ddim"`` (DDIMScheduler): linspace = ``round(linspace(0, T-1, n))``; leading =
      ``arange(n) * (T // n) + steps_offset``; trailing = ``round(arange(T, 0, -T/n)) - 1``.
      Returns int64.
    * ``"euler"`` (EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete): as ``"ddim"`` but
      linspace keeps the fractional ``linspace(0, T-1, n)``. Returns float64 (diffusers holds
      these in float32).
    * ``"multistep"`` (DPMSolverMultistep, UniPCMultistep): linspace =
      ``round(linspace(0, L-1, n+1))`` without its last (lowest) point; leading =
      ``arange(n+1) * (L // (n+1))`` without its last point, plus ``steps_offset``; trailing =
      ``round(arange(L, 0, -T/n)) - 1`` (stride from ``T``, start from ``L``).
      ``L = last_timestep`` (DPM-Solver's ``lambda_min_clipped`` cut, see
      :func:`last_timestep_for_lambda_min`; ``T`` when omitted, which is UniPC's rule).
      Returns int64; trailing with ``L < T`` returns fewer than ``n`` steps, as diffusers does.

    Raises ``ValueError`` when the result would repeat a timestep or leave ``[0, T-1]``
    (diffusers silently produces such schedules, e.g. for ``n > T``).
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    _check_choice("spacing", spacing, TIMESTEP_SPACINGS)
    _check_choice("variant", variant, SPACING_VARIANTS)
    offset = _check_int("steps_offset", steps_offset, minimum=0)
    if n > T:
        raise ValueError(
            f"`num_inference_steps` ({n}) cannot be larger than `num_train_timesteps` ({T}): the model was "
            f"trained on {T} discrete timesteps"
        )
    if last_timestep is not None and variant != "multistep":
        raise ValueError("`last_timestep` is only used by variant='multistep'")
    L = T if last_timestep is None else _check_int("last_timestep", last_timestep, minimum=1, maximum=T)

    if variant == "multistep":
        if spacing == "linspace":
            ts = np.linspace(0, L - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (L // (n + 1))).round()[::-1][:-1] + offset
        else:
            ts = np.round(np.arange(L, 0, -T / n)) - 1
        ts = ts[ts >= 0]  # float arange can overshoot by one element that rounds to -1
        out = ts.astype(np.int64)
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n)[::-1]
            if variant == "ddim":
                ts = ts.round()
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1] + offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)) - 1
            ts = ts[ts >= 0]  # see above
        out = ts.astype(np.int64) if variant == "ddim" else ts.astype(np.float64)

    out = np.ascontiguousarray(out)
    if out.shape[0] == 0:
        raise ValueError(f"`num_inference_steps`={n} gives no timesteps for last_timestep={L}")
    if out.shape[0] > 1 and (np.diff(out) >= 0).any():
        raise ValueError(
            f"`num_inference_steps`={n} with spacing={spacing!r} (variant={variant!r}, T={T}, last_timestep={L}) "
            "repeats timesteps; use fewer steps"
        )
    if out[0] > T - 1 or out[-1] < 0:
        raise ValueError(
            f"`steps_offset`={offset} moves timesteps outside [0, {T - 1}] for num_inference_steps={n}"
        )
    return out


# --------------------------------------------------------------------------------------
# sigma schedules (VE sigmas, descending)
# --------------------------------------------------------------------------------------


def interpolate_sigmas(timesteps: Sequence[float], train_sigmas: Sequence[float]) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linear in t between training steps.

    ``train_sigmas[i]`` is the sigma of training step ``i`` (ascending). Timesteps outside
    ``[0, T-1]`` clamp to the end values (``np.interp``), as in diffusers.
    """
    s = _check_array("train_sigmas", train_sigmas, ge=0.0)
    t = _check_array("timesteps", timesteps)
    return np.interp(t, np.arange(0, s.shape[0]), s)


def log_linear_sigmas(num_inference_steps: int, train_sigmas: Sequence[float]) -> np.ndarray:
    """EulerDiscrete's ``interpolation_type="log_linear"``: sigmas uniform in log sigma.

    Runs from ``train_sigmas[-1]`` down to ``train_sigmas[0]`` with ``n + 1`` points; diffusers
    then still appends the final sigma, so its schedule has ``n + 2`` sigmas for ``n``
    timesteps. Reproduced as is.
    """
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    s = _check_array("train_sigmas", train_sigmas, gt=0.0, min_len=2)
    return np.exp(np.linspace(math.log(s[-1]), math.log(s[0]), n + 1))


def _check_sigma_range(sigma_min: float, sigma_max: float, positive: bool) -> tuple[float, float]:
    if positive:
        lo = _check_float("sigma_min", sigma_min, gt=0.0)
    else:
        lo = _check_float("sigma_min", sigma_min, ge=0.0)
    hi = _check_float("sigma_max", sigma_max, gt=0.0)
    if lo > hi:
        raise ValueError(f"`sigma_min` ({lo}) must not exceed `sigma_max` ({hi})")
    return lo, hi


def karras_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``.

    ``n`` descending sigmas from ``sigma_max`` to ``sigma_min`` (no final zero appended);
    ``n = 1`` gives ``[sigma_max]``. Same formula as diffusers' ``_convert_to_karras``.
    """
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    lo, hi = _check_sigma_range(sigma_min, sigma_max, positive=False)
    rho = _check_float("rho", rho, gt=0.0)
    ramp = np.linspace(0, 1, n)
    min_inv_rho = lo ** (1 / rho)
    max_inv_rho = hi ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """``n`` sigmas uniform in log sigma from ``sigma_max`` down to ``sigma_min``."""
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    lo, hi = _check_sigma_range(sigma_min, sigma_max, positive=True)
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def beta_sigmas(
    num_inference_steps: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """Lee et al. 2024: ``sigma_min + ppf_{Beta(alpha, beta)}(1 - i/(n-1)) (sigma_max - sigma_min)``.

    Concentrates steps at both ends of the range for alpha = beta < 1. Uses
    ``scipy.stats.beta.ppf`` like diffusers.
    """
    import scipy.stats  # deferred: scipy is only needed here

    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    lo, hi = _check_sigma_range(sigma_min, sigma_max, positive=False)
    alpha = _check_float("alpha", alpha, gt=0.0)
    beta = _check_float("beta", beta, gt=0.0)
    q = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.asarray(lo + q * (hi - lo), dtype=np.float64)


def _lu_from_log_bounds(n: int, log_sigma_min: float, log_sigma_max: float) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    return np.exp(log_sigma_max + ramp * (log_sigma_min - log_sigma_max))


def uniform_lambda_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Sigmas with uniformly spaced lambda = -log(sigma) (Lu et al. 2022's "logSNR" steps).

    What DPMSolverMultistep computes for ``use_lu_lambdas=True`` (there ``sigma_min`` /
    ``sigma_max`` are the first / last training sigmas). Mathematically equal to
    :func:`exponential_sigmas`; the interpolation is written the way diffusers writes it so
    the floats match.
    """
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    lo, hi = _check_sigma_range(sigma_min, sigma_max, positive=True)
    return _lu_from_log_bounds(n, math.log(lo), math.log(hi))


def edm_sigmas(
    num_inference_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    schedule: str = "karras",
    ramp: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """EDM sigmas (Karras et al. 2022) as diffusers' ``EDMEulerScheduler`` builds them.

    ``schedule="karras"``: eq. 5 evaluated at ``ramp`` (default ``linspace(0, 1, n)``; the
    scheduler's custom ``sigmas`` argument is such a ramp). ``schedule="exponential"``: uniform
    in log sigma (ignores ``rho``; a custom ramp only sets the count).
    """
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    lo, hi = _check_sigma_range(sigma_min, sigma_max, positive=(schedule == "exponential"))
    _check_choice("schedule", schedule, ("karras", "exponential"))
    rho = _check_float("rho", rho, gt=0.0)
    r = np.linspace(0, 1, n) if ramp is None else _check_array("ramp", ramp, ge=0.0, le=1.0)
    if r.shape[0] != n:
        raise ValueError(f"`ramp` has {r.shape[0]} entries but `num_inference_steps` is {n}")
    if schedule == "karras":
        min_inv_rho = lo ** (1 / rho)
        max_inv_rho = hi ** (1 / rho)
        return (max_inv_rho + r * (min_inv_rho - max_inv_rho)) ** rho
    return np.exp(np.linspace(math.log(lo), math.log(hi), r.shape[0]))[::-1].copy()


def edm_noise_conditioning(sigmas: Sequence[float]) -> np.ndarray:
    """EDM's ``c_noise(sigma) = log(sigma) / 4`` (Karras et al. 2022, Table 1).

    The timesteps of ``EDMEulerScheduler`` and of EulerDiscrete with
    ``timestep_type="continuous"`` and v-prediction.
    """
    s = _check_array("sigmas", sigmas, gt=0.0)
    return 0.25 * np.log(s)


# --------------------------------------------------------------------------------------
# sigma <-> timestep, sigma -> (alpha_t, sigma_t)
# --------------------------------------------------------------------------------------


def _float_array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype not in (np.float32, np.float64):
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"`{name}` must be an array of real numbers") from exc
    return arr


def sigma_to_t(sigmas, log_sigmas: Sequence[float]) -> np.ndarray:
    """Fractional training timesteps for sigmas, piecewise linear in log sigma.

    ``log_sigmas`` are the logs of the training sigmas, strictly increasing with t. Each sigma
    is placed between the training steps whose log sigmas bracket it; values beyond either end
    clamp to ``0`` / ``T-1``. Sigmas below ``1e-10`` (e.g. a final zero) are treated as
    ``1e-10``. Vectorised form of diffusers' ``_sigma_to_t``; keeps the shape of ``sigmas``.

    float64 inputs give a float64 computation. float32 inputs are honoured the way diffusers'
    per-sigma loop sees them (it holds ``log_sigmas`` in float32 and NumPy < 2 lets a float32
    array win over a float64 scalar): the bracketing and the weight are then computed in the
    dtype NumPy would pick there. This matters where ``t`` is truncated to an integer.
    """
    table = _float_array("log_sigmas", log_sigmas)
    if table.ndim != 1 or table.shape[0] < 2:
        raise ValueError(f"`log_sigmas` must be 1-D with at least 2 entries, got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError("`log_sigmas` must be finite")
    if (np.diff(table) <= 0).any():
        raise ValueError("`log_sigmas` must be strictly increasing (training sigmas ascending with t)")
    s = _float_array("sigmas", sigmas)
    if np.isnan(s).any() or np.isinf(s).any() or (s < 0).any():
        raise ValueError("`sigmas` must be finite and >= 0")
    shape = s.shape
    s = s.reshape(-1)
    log_sigma = np.log(np.maximum(s, s.dtype.type(1e-10)))
    # The dtype diffusers' scalar-vs-table arithmetic ends up in (see the docstring).
    work = np.result_type(table, log_sigma.dtype.type(1.0))
    ls = log_sigma.astype(work)
    tab = table.astype(work)
    # Index of the last table entry <= log_sigma, kept inside [0, T-2] so both neighbours exist.
    low_idx = np.clip(np.searchsorted(tab, ls, side="right") - 1, 0, tab.shape[0] - 2)
    high_idx = low_idx + 1
    low = tab[low_idx]
    high = tab[high_idx]
    w = np.clip((low - ls) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.astype(np.float64).reshape(shape)


def sigma_to_alpha_sigma_t(sigmas, kind: str = "vp") -> tuple[np.ndarray, np.ndarray]:
    """Signal and noise scales ``(alpha_t, sigma_t)`` for a schedule's sigmas.

    ``kind="vp"``: ``sigmas`` are VE-equivalent sigmas of a VP model,
    ``alpha_t = 1 / sqrt(1 + s^2)``, ``sigma_t = s alpha_t``. ``kind="flow"``: rectified flow,
    ``alpha_t = 1 - s``, ``sigma_t = s``. As DPMSolverMultistep / UniPC's
    ``_sigma_to_alpha_sigma_t``.
    """
    _check_choice("kind", kind, ("vp", "flow"))
    s = np.asarray(sigmas, dtype=np.float64)
    if np.isnan(s).any() or np.isinf(s).any() or (s < 0).any():
        raise ValueError("`sigmas` must be finite and >= 0")
    if kind == "flow":
        if (s > 1).any():
            raise ValueError("flow `sigmas` must lie in [0, 1]")
        return 1.0 - s, s.copy()
    alpha_t = 1.0 / (s**2 + 1.0) ** 0.5
    return alpha_t, s * alpha_t


# --------------------------------------------------------------------------------------
# flow matching
# --------------------------------------------------------------------------------------


def shift_sigmas(sigmas, shift: float) -> np.ndarray:
    """Static timestep shift ``shift s / (1 + (shift - 1) s)`` (Esser et al. 2024, eq. 23).

    ``shift > 1`` spends more steps at high noise (used for high resolutions). Like the other
    flow helpers, a float32 array is shifted in float32 (as diffusers does with float32 custom
    sigmas); anything else in float64.
    """
    shift = _check_float("shift", shift, gt=0.0)
    s = _float_array("sigmas", sigmas)
    if np.isnan(s).any() or (s < 0).any() or (s > 1).any():
        raise ValueError("`sigmas` must lie in [0, 1] to be shifted")
    return shift * s / (1 + (shift - 1) * s)


def time_shift(mu: float, sigma: float, t, kind: str = "exponential") -> np.ndarray:
    """Dynamic (resolution-dependent) shift of flow times ``t`` in [0, 1].

    ``kind="exponential"``: ``e^mu / (e^mu + (1/t - 1)^sigma)`` (Flux, SD3; with ``sigma = 1``
    it equals :func:`shift_sigmas` with ``shift = e^mu``). ``kind="linear"``:
    ``mu / (mu + (1/t - 1)^sigma)`` (requires ``mu > 0``). ``t = 0`` maps to 0.
    """
    _check_choice("kind", kind, TIME_SHIFT_TYPES)
    mu = _check_float("mu", mu, gt=0.0 if kind == "linear" else None)
    sigma = _check_float("sigma", sigma, gt=0.0)
    t = _float_array("t", t)
    if np.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise ValueError("`t` must lie in [0, 1]")
    with np.errstate(divide="ignore"):
        odds = (1 / t - 1) ** sigma  # t = 0 gives inf, hence a shifted value of 0
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    return mu / (mu + odds)


def stretch_shift_to_terminal(sigmas, shift_terminal: float) -> np.ndarray:
    """Rescale ``1 - s`` so that the last sigma becomes ``shift_terminal`` (LTX-Video).

    ``1 - s`` is divided by ``(1 - s[-1]) / (1 - shift_terminal)``; the first sigma moves
    proportionally less.
    """
    st = _check_float("shift_terminal", shift_terminal, ge=0.0, lt=1.0)
    s = _float_array("sigmas", sigmas)
    if s.ndim != 1 or s.shape[0] < 1 or np.isnan(s).any() or (s < 0).any() or (s > 1).any():
        raise ValueError("`sigmas` must be a non-empty 1-D array with entries in [0, 1]")
    one_minus = 1 - s
    if one_minus[-1] == 0:
        raise ValueError("the last of `sigmas` must be < 1 to stretch it to `shift_terminal`")
    scale = one_minus[-1] / (1 - st)
    return 1 - one_minus / scale


def calculate_shift(
    image_seq_len: float,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for :func:`time_shift`: linear in the image token count (Flux pipelines).

    Goes from ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len``.
    """
    image_seq_len = _check_float("image_seq_len", image_seq_len, ge=0.0)
    base_seq_len = _check_float("base_seq_len", base_seq_len)
    max_seq_len = _check_float("max_seq_len", max_seq_len)
    if max_seq_len == base_seq_len:
        raise ValueError("`max_seq_len` must differ from `base_seq_len`")
    base_shift = _check_float("base_shift", base_shift)
    max_shift = _check_float("max_shift", max_shift)
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _flow_sigma_bounds(num_train_timesteps: int, shift: float, dynamic: bool, precision: str) -> tuple[float, float]:
    """(sigma_max, sigma_min) of FlowMatchEulerDiscreteScheduler's training sigmas."""
    T = num_train_timesteps
    if precision == "float32":
        torch = _torch()
        s = torch.tensor([float(T), 1.0], dtype=torch.float32) / T
        if not dynamic:
            s = shift * s / (1 + (shift - 1) * s)
        return float(s[0].item()), float(s[1].item())
    s = np.array([1.0, 1.0 / T])
    if not dynamic:
        s = shift * s / (1 + (shift - 1) * s)
    return float(s[0]), float(s[1])


def _apply_sigma_schedule(
    kind: Optional[str],
    sigmas: np.ndarray,
    n: int,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
) -> np.ndarray:
    """diffusers' ``_convert_to_{karras,exponential,beta}``: bounds default to the input's ends."""
    if kind is None:
        return sigmas
    lo = float(sigmas[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas[0]) if sigma_max is None else sigma_max
    if kind == "karras":
        return karras_sigmas(n, lo, hi)
    if kind == "exponential":
        return exponential_sigmas(n, lo, hi)
    return beta_sigmas(n, lo, hi)


def _check_mu(mu, use_dynamic_shifting: bool) -> Optional[float]:
    if use_dynamic_shifting and mu is None:
        raise ValueError("`mu` must be given when `use_dynamic_shifting` is True")
    if mu is None:
        return None
    return _check_float("mu", mu)


def flow_sigmas(
    num_inference_steps: Optional[int],
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    *,
    use_dynamic_shifting: bool = False,
    mu: Optional[float] = None,
    time_shift_type: str = "exponential",
    shift_terminal: Optional[float] = None,
    sigma_schedule: Optional[str] = None,
    sigmas: Optional[Sequence[float]] = None,
    timesteps: Optional[Sequence[float]] = None,
    precision: str = "float64",
) -> np.ndarray:
    """Flow sigmas as FlowMatchEulerDiscreteScheduler.set_timesteps builds them (no final 0).

    Default path: ``t = linspace(sigma_max T, sigma_min T, n)`` where ``sigma_max`` / ``sigma_min``
    are the ends of the scheduler's *training* sigmas (which are already shifted by ``shift``
    unless dynamic shifting is on), ``s = t / T``; then ``s`` is shifted: by
    :func:`time_shift` ``(mu, 1, s)`` when ``use_dynamic_shifting``, else by
    :func:`shift_sigmas` ``(s, shift)``. Then optionally :func:`stretch_shift_to_terminal` and a
    Karras / exponential / beta re-spacing between the resulting ends (``sigma_schedule``).
    Custom ``sigmas`` (descending, in (0, 1]) replace the linspace; custom ``timesteps`` alone
    give ``s = timesteps / T``. The scheduler's timesteps are ``sigmas * T`` (or the custom
    timesteps).
    """
    _check_precision(precision)
    T = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    _check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    if sigma_schedule is not None:
        _check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    mu = _check_mu(mu, use_dynamic_shifting)
    shift = _check_float("shift", shift, gt=0.0)
    if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
        raise ValueError("`sigmas` and `timesteps` must have the same length")
    if num_inference_steps is None:
        if sigmas is None and timesteps is None:
            raise ValueError("pass `num_inference_steps`, `sigmas` or `timesteps`")
        n = len(sigmas) if sigmas is not None else len(timesteps)
    else:
        n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
        if (sigmas is not None and len(sigmas) != n) or (timesteps is not None and len(timesteps) != n):
            raise ValueError("`sigmas` / `timesteps` must have `num_inference_steps` entries")
    # diffusers casts custom sigmas / timesteps to float32 and then shifts them in float32.
    cast = (lambda x: x.astype(np.float32)) if precision == "float32" else (lambda x: x)

    if sigmas is not None:
        s = cast(_check_array("sigmas", sigmas, gt=0.0, le=1.0))
        _check_decreasing("sigmas", s)
    elif timesteps is not None:
        t = cast(_check_array("timesteps", timesteps, gt=0.0, le=float(T)))
        _check_decreasing("timesteps", t)
        s = t / T
    else:
        hi, lo = _flow_sigma_bounds(T, shift, use_dynamic_shifting, precision)
        s = np.linspace(hi * T, lo * T, n) / T
    if use_dynamic_shifting:
        s = time_shift(mu, 1.0, s, kind=time_shift_type)
    else:
        s = shift_sigmas(s, shift)
    if shift_terminal:
        s = stretch_shift_to_terminal(s, shift_terminal)
    return _apply_sigma_schedule(sigma_schedule, s, n).astype(np.float64)


def multistep_flow_sigmas(
    num_inference_steps: Optional[int],
    num_train_timesteps: int = 1000,
    flow_shift: float = 1.0,
    *,
    variant: str = "dpmsolver",
    use_dynamic_shifting: bool = False,
    mu: Optional[float] = None,
    time_shift_type: str = "exponential",
    shift_terminal: Optional[float] = None,
    sigmas: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Flow sigmas of DPMSolverMultistep / UniPCMultistep with ``use_flow_sigmas=True`` (no final).

    * ``variant="dpmsolver"``: ``s = linspace(1 - 1/T, 0, n + 1)[:-1]`` shifted by
      ``flow_shift``; a ``mu`` (requires ``use_dynamic_shifting`` and exponential type) sets
      ``flow_shift = e^mu``.
    * ``variant="unipc"``: ``s = linspace(1, 1/T, n + 1)[:-1]`` (or custom ``sigmas``), shifted
      by :func:`time_shift` ``(mu, 1, s)`` when ``use_dynamic_shifting`` else by ``flow_shift``,
      optionally stretched to ``shift_terminal``, and a first sigma within 1e-6 of 1 is
      lowered by 1e-6 (keeps ``alpha_t = 1 - s`` nonzero).

    The schedulers' integer timesteps are ``int(s * T)`` (truncation).
    """
    _check_choice("variant", variant, ("dpmsolver", "unipc"))
    T = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    flow_shift = _check_float("flow_shift", flow_shift, gt=0.0)
    _check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    if variant == "dpmsolver":
        if sigmas is not None:
            raise ValueError("custom `sigmas` are only supported by variant='unipc'")
        if shift_terminal is not None:
            raise ValueError("`shift_terminal` is only supported by variant='unipc'")
        n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
        if mu is not None:
            if not use_dynamic_shifting or time_shift_type != "exponential":
                raise ValueError("`mu` needs use_dynamic_shifting=True and time_shift_type='exponential'")
            flow_shift = math.exp(_check_float("mu", mu))
        s = 1.0 - np.linspace(1, 1 / T, n + 1)
        return np.flip(flow_shift * s / (1 + (flow_shift - 1) * s))[:-1].copy()

    mu = _check_mu(mu, use_dynamic_shifting)
    if sigmas is not None:
        s = _check_array("sigmas", sigmas, gt=0.0, le=1.0)
        _check_decreasing("sigmas", s)
    else:
        n = _check_int("num_inference_steps", num_inference_steps, minimum=1)
        s = np.linspace(1, 1 / T, n + 1)[:-1]
    if use_dynamic_shifting:
        s = time_shift(mu, 1.0, s, kind=time_shift_type)
    else:
        s = flow_shift * s / (1 + (flow_shift - 1) * s)
    if shift_terminal:
        s = stretch_shift_to_terminal(s, shift_terminal)
    s = np.array(s, dtype=np.float64)
    if np.fabs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return s


# --------------------------------------------------------------------------------------
# assembling
# --------------------------------------------------------------------------------------


def append_final_sigma(
    sigmas: Sequence[float], final_sigmas_type: str = "zero", sigma_min: Optional[float] = None
) -> np.ndarray:
    """Append the sigma the last step lands on.

    ``"zero"`` appends 0 (fully denoised). ``"sigma_min"`` appends ``sigma_min`` when given
    (diffusers passes the smallest *training* sigma), else repeats the last sigma.
    """
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    s = _check_array("sigmas", sigmas, ge=0.0)
    if final_sigmas_type == "zero":
        last = 0.0
    elif sigma_min is None:
        last = float(s[-1])
    else:
        last = _check_float("sigma_min", sigma_min, ge=0.0)
    return np.concatenate([s, [last]])


def heun_interleave(timesteps: Sequence[float], sigmas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Duplicate interior steps for a two-stage (Heun) sampler, as HeunDiscreteScheduler does.

    ``timesteps [t0, t1, ..., t_{n-1}] -> [t0, t1, t1, ..., t_{n-1}, t_{n-1}]`` and
    ``sigmas [s0, ..., s_n] -> [s0, s1, s1, ..., s_{n-1}, s_{n-1}, s_n]``; each step pair then
    uses the same sigma interval for predictor and corrector.
    """
    t = np.asarray(timesteps)
    s = _check_array("sigmas", sigmas, ge=0.0, min_len=2)
    if t.ndim != 1 or t.shape[0] != s.shape[0] - 1:
        raise ValueError(
            f"`timesteps` must be 1-D with len(sigmas) - 1 = {s.shape[0] - 1} entries, got shape {t.shape}"
        )
    t_out = np.concatenate([t[:1], np.repeat(t[1:], 2)])
    s_out = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
    return t_out, s_out


class ScheduleArrays(NamedTuple):
    """``timesteps`` and ``sigmas`` exactly as a diffusers scheduler holds them after set_timesteps.

    ``sigmas`` is ``None`` for DDIMScheduler, which has none. Both are NumPy arrays
    (int64 timesteps where diffusers uses int64, else float64).
    """

    timesteps: np.ndarray
    sigmas: Optional[np.ndarray]


_VP_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_SIGMA_FLAGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_MULTISTEP = {
    **_VP_COMMON,
    **_SIGMA_FLAGS,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_VP_COMMON, "timestep_spacing": "leading"},
    "EulerDiscreteScheduler": {
        **_VP_COMMON,
        **_SIGMA_FLAGS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": dict(_VP_COMMON),
    "HeunDiscreteScheduler": {
        **{k: v for k, v in _VP_COMMON.items() if k != "rescale_betas_zero_snr"},
        **_SIGMA_FLAGS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
    },
    "DPMSolverMultistepScheduler": {**_MULTISTEP, "use_lu_lambdas": False, "lambda_min_clipped": -math.inf},
    # Singlestep has no timestep spacing options, zero-SNR rescaling or Lu lambdas.
    "DPMSolverSinglestepScheduler": {
        **{k: v for k, v in _MULTISTEP.items() if k not in ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr")},
        "lambda_min_clipped": -math.inf,
    },
    "UniPCMultistepScheduler": {**_MULTISTEP, "sigma_min": None, "sigma_max": None, "shift_terminal": None},
    "SASolverScheduler": {
        **_VP_COMMON, **_SIGMA_FLAGS, "use_flow_sigmas": False, "flow_shift": 1.0, "lambda_min_clipped": -math.inf,
    },
    # DEIS has neither zero-SNR rescaling nor a final_sigmas_type.
    "DEISMultistepScheduler": {k: v for k, v in _MULTISTEP.items() if k not in ("rescale_betas_zero_snr", "final_sigmas_type")},
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "invert_sigmas": False,
        "shift_terminal": None,
        **_SIGMA_FLAGS,
        "time_shift_type": "exponential",
    },
    "EDMEulerScheduler": {
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "sigma_schedule": "karras",
        "num_train_timesteps": 1000,
        "rho": 7.0,
        "final_sigmas_type": "zero",
    },
}
#: Scheduler class names :func:`diffusers_set_timesteps` reproduces.
SUPPORTED_SCHEDULERS = tuple(_DEFAULTS)


def _sigma_flag(cfg: Mapping[str, Any]) -> Optional[str]:
    flags = [k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")]
    if len(flags) > 1:
        raise ValueError(
            "only one of `use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas` may be True, "
            f"got {['use_' + f + '_sigmas' for f in flags]}"
        )
    return flags[0] if flags else None


def _vp_tables(cfg: Mapping[str, Any], precision: str, allow_exp: bool = False):
    """(alphas_cumprod, train_sigmas, log_sigmas) as the scheduler's __init__ leaves them."""
    if cfg["trained_betas"] is None:
        allowed = BETA_SCHEDULES if allow_exp else BETA_SCHEDULES[:3]
        _check_choice("beta_schedule", cfg["beta_schedule"], allowed)
    betas = betas_for_schedule(
        cfg["beta_schedule"],
        None if cfg["trained_betas"] is not None else cfg["num_train_timesteps"],
        cfg["beta_start"],
        cfg["beta_end"],
        cfg["trained_betas"],
        precision=precision,
    )
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas, precision=precision)
    acp = alphas_cumprod_from_betas(
        betas, final_alpha_cumprod=ZERO_SNR_ALPHA_CUMPROD if rescale else None, precision=precision
    )
    sig = vp_sigmas(acp, precision=precision)
    # diffusers takes np.log of a float32 array and keeps the table in float32 (see sigma_to_t).
    log_sig = np.log(sig.astype(np.float32)) if precision == "float32" else np.log(sig)
    return acp, sig, log_sig


def _round_out(x: np.ndarray, precision: str) -> np.ndarray:
    return _f32(x) if precision == "float32" else np.asarray(x, dtype=np.float64)


def _int_timesteps(t: np.ndarray) -> np.ndarray:
    """What ``torch.from_numpy(t).to(torch.int64)`` gives: truncation toward zero."""
    return np.trunc(np.asarray(t, dtype=np.float64)).astype(np.int64)


def diffusers_set_timesteps(
    scheduler: str,
    num_inference_steps: Optional[int] = None,
    config: Optional[Mapping[str, Any]] = None,
    *,
    timesteps: Optional[Sequence[float]] = None,
    sigmas: Optional[Sequence[float]] = None,
    mu: Optional[float] = None,
    precision: str = "float32",
) -> ScheduleArrays:
    """The ``timesteps`` / ``sigmas`` a diffusers 0.42.1 scheduler holds after ``set_timesteps``.

    ``scheduler`` is the diffusers class name (see :data:`SUPPORTED_SCHEDULERS`); ``config`` is
    its config (a ``scheduler.config`` or any mapping; keys that do not affect the schedule
    are ignored, missing keys take that class's defaults). ``timesteps`` / ``sigmas`` / ``mu``
    are the ``set_timesteps`` arguments the class accepts.

    ``precision="float32"`` (default) reproduces diffusers' float32 storage, so values agree
    to float32 rounding and integer timesteps agree exactly; ``"float64"`` computes the same
    schedule without intermediate rounding.
    """
    _check_choice("scheduler", scheduler, SUPPORTED_SCHEDULERS)
    _check_precision(precision)
    cfg = dict(_DEFAULTS[scheduler])
    if config is not None:
        for k in cfg:
            if k in config:
                cfg[k] = config[k]
    if num_inference_steps is not None:
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, minimum=1)
    handler = {
        "DDIMScheduler": _ddim,
        "EulerDiscreteScheduler": _euler,
        "EulerAncestralDiscreteScheduler": _euler_ancestral,
        "HeunDiscreteScheduler": _heun,
        "DPMSolverMultistepScheduler": _dpmsolver,
        "DPMSolverSinglestepScheduler": _dpmsolver_singlestep,
        "UniPCMultistepScheduler": _unipc,
        "SASolverScheduler": _sasolver,
        "DEISMultistepScheduler": _deis,
        "FlowMatchEulerDiscreteScheduler": _flow_match_euler,
        "EDMEulerScheduler": _edm_euler,
    }[scheduler]
    return handler(cfg, num_inference_steps, timesteps, sigmas, mu, precision)


def _no_extras(name: str, **given) -> None:
    for k, v in given.items():
        if v is not None:
            raise ValueError(f"{name}.set_timesteps does not accept `{k}`")


def _need_steps(n: Optional[int]) -> int:
    if n is None:
        raise ValueError("`num_inference_steps` is required")
    return n


def _ddim(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("DDIMScheduler", timesteps=timesteps, sigmas=sigmas, mu=mu)
    n = _need_steps(n)
    _check_choice("timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    ts = timesteps_from_spacing(n, cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"], "ddim")
    return ScheduleArrays(ts, None)


def _custom_timesteps(name: str, timesteps, T: int) -> np.ndarray:
    t = _check_array(name, timesteps, ge=0.0, le=float(T - 1))
    _check_decreasing(name, t)
    return t


def _euler_family_timesteps(cfg, n, precision) -> np.ndarray:
    ts = timesteps_from_spacing(n, cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"], "euler")
    return _round_out(ts, precision)  # diffusers builds these arrays in float32


def _euler(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("EulerDiscreteScheduler", mu=mu)
    kind = _sigma_flag(cfg)
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass only one of `timesteps` and `sigmas`")
    if n is None and timesteps is None and sigmas is None:
        raise ValueError("pass one of `num_inference_steps`, `timesteps` or `sigmas`")
    if n is not None and (timesteps is not None or sigmas is not None):
        raise ValueError("pass only one of `num_inference_steps`, `timesteps` or `sigmas`")
    if timesteps is not None and kind is not None:
        raise ValueError(f"custom `timesteps` cannot be combined with use_{kind}_sigmas=True")
    continuous = cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction"
    if timesteps is not None and continuous:
        raise ValueError("custom `timesteps` cannot be combined with continuous v-prediction timesteps")
    _check_choice("interpolation_type", cfg["interpolation_type"], ("linear", "log_linear"))
    _check_choice("final_sigmas_type", cfg["final_sigmas_type"], FINAL_SIGMAS_TYPES)
    T = cfg["num_train_timesteps"]
    acp, train_sig, log_sig = _vp_tables(cfg, precision)

    if sigmas is not None:
        s = _round_out(_check_array("sigmas", sigmas, ge=0.0, min_len=2), precision)
        _check_decreasing("sigmas", s[:-1])
        # diffusers converts custom sigmas to float32 before taking their logs.
        ts = sigma_to_t(s[:-1].astype(np.float32) if precision == "float32" else s[:-1], log_sig)
    else:
        if timesteps is not None:
            ts = _round_out(_custom_timesteps("timesteps", timesteps, T), precision)
            n = ts.shape[0]
        else:
            ts = _euler_family_timesteps(cfg, n, precision)
        if cfg["interpolation_type"] == "linear":
            s = interpolate_sigmas(ts, train_sig)
        else:
            s = log_linear_sigmas(n, train_sig)
        if kind is not None:
            s = _apply_sigma_schedule(kind, s, n, cfg["sigma_min"], cfg["sigma_max"])
            ts = sigma_to_t(s, log_sig)
        s = append_final_sigma(s, cfg["final_sigmas_type"], train_sig[0])
    s = _round_out(s, precision)
    if continuous:
        ts = edm_noise_conditioning(s[:-1])
    return ScheduleArrays(_round_out(ts, precision), s)


def _euler_ancestral(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("EulerAncestralDiscreteScheduler", timesteps=timesteps, sigmas=sigmas, mu=mu)
    n = _need_steps(n)
    _, train_sig, _ = _vp_tables(cfg, precision)
    ts = _euler_family_timesteps(cfg, n, precision)
    s = append_final_sigma(interpolate_sigmas(ts, train_sig), "zero")
    return ScheduleArrays(ts, _round_out(s, precision))


def _heun(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("HeunDiscreteScheduler", sigmas=sigmas, mu=mu)
    kind = _sigma_flag(cfg)
    if (n is None) == (timesteps is None):
        raise ValueError("pass exactly one of `num_inference_steps` and `timesteps`")
    if timesteps is not None and kind is not None:
        raise ValueError(f"custom `timesteps` cannot be combined with use_{kind}_sigmas=True")
    T = cfg["num_train_timesteps"]
    _, train_sig, log_sig = _vp_tables(cfg, precision, allow_exp=True)
    if timesteps is not None:
        ts = _round_out(_custom_timesteps("timesteps", timesteps, T), precision)
        n = ts.shape[0]
    else:
        ts = _euler_family_timesteps(cfg, n, precision)
    s = interpolate_sigmas(ts, train_sig)
    if kind is not None:
        s = _apply_sigma_schedule(kind, s, n)
        ts = sigma_to_t(s, log_sig)
    s = _round_out(append_final_sigma(s, "zero"), precision)
    ts, s = heun_interleave(_round_out(ts, precision), s)
    return ScheduleArrays(ts, s)


def _multistep_common_checks(cfg) -> Optional[str]:
    kind = _sigma_flag(cfg)
    _check_choice("timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    _check_choice("final_sigmas_type", cfg["final_sigmas_type"], FINAL_SIGMAS_TYPES)
    _check_choice("time_shift_type", cfg["time_shift_type"], TIME_SHIFT_TYPES)
    return kind


def _dpmsolver(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("DPMSolverMultistepScheduler", sigmas=sigmas)
    kind = _multistep_common_checks(cfg)
    lu = bool(cfg["use_lu_lambdas"])
    if (n is None) == (timesteps is None):
        raise ValueError("pass exactly one of `num_inference_steps` and `timesteps`")
    if timesteps is not None and (kind is not None or lu):
        raise ValueError("custom `timesteps` cannot be combined with karras / lu / exponential / beta sigmas")
    if mu is not None and not (cfg["use_dynamic_shifting"] and cfg["time_shift_type"] == "exponential"):
        raise ValueError("`mu` needs use_dynamic_shifting=True and time_shift_type='exponential'")
    T = cfg["num_train_timesteps"]
    acp, train_sig, log_sig = _vp_tables(cfg, precision)
    cosine = cfg["beta_schedule"] == "squaredcos_cap_v2"

    if timesteps is not None:
        ts = _custom_timesteps("timesteps", timesteps, T).astype(np.int64)
        n = ts.shape[0]
    elif kind is None and not lu and not cfg["use_flow_sigmas"]:
        last = last_timestep_for_lambda_min(acp, cfg["lambda_min_clipped"], precision=precision)
        ts = timesteps_from_spacing(n, T, cfg["timestep_spacing"], cfg["steps_offset"], "multistep", last)

    if kind == "karras":
        s = karras_sigmas(n, float(train_sig[0]), float(train_sig[-1]))
        ts = sigma_to_t(s, log_sig)
        ts = ts if cosine else ts.round()
    elif lu:
        s = _lu_from_log_bounds(n, float(log_sig[0]), float(log_sig[-1]))
        ts = sigma_to_t(s, log_sig)
        ts = ts if cosine else ts.round()
    elif kind is not None:
        s = _apply_sigma_schedule(kind, train_sig[::-1], n)
        ts = sigma_to_t(s, log_sig)
    elif cfg["use_flow_sigmas"]:
        s = multistep_flow_sigmas(
            n,
            T,
            cfg["flow_shift"],
            variant="dpmsolver",
            use_dynamic_shifting=bool(cfg["use_dynamic_shifting"]),
            mu=mu,
            time_shift_type=cfg["time_shift_type"],
        )
        ts = s * T
    else:
        s = interpolate_sigmas(ts, train_sig)
    s = _round_out(append_final_sigma(s, cfg["final_sigmas_type"], train_sig[0]), precision)
    return ScheduleArrays(_int_timesteps(ts), s)


def _dpmsolver_singlestep(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    """DPMSolverMultistep's schedule with linspace spacing, but Karras timesteps are rounded for
    every beta schedule (the multistep class keeps them fractional for squaredcos_cap_v2)."""
    _no_extras("DPMSolverSinglestepScheduler", sigmas=sigmas)
    fixed = {"timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False, "use_lu_lambdas": False}
    arrays = _dpmsolver({**cfg, **fixed}, n, timesteps, None, mu, precision)
    if cfg["use_karras_sigmas"] and cfg["beta_schedule"] == "squaredcos_cap_v2":
        _, train_sig, log_sig = _vp_tables(cfg, precision)
        s = karras_sigmas(len(arrays.timesteps), float(train_sig[0]), float(train_sig[-1]))
        arrays = ScheduleArrays(_int_timesteps(sigma_to_t(s, log_sig).round()), arrays.sigmas)
    return arrays


def _unipc(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("UniPCMultistepScheduler", timesteps=timesteps)
    kind = _multistep_common_checks(cfg)
    flow = bool(cfg["use_flow_sigmas"])
    if cfg["shift_terminal"] is not None and not flow:
        raise ValueError("`shift_terminal` is only supported with use_flow_sigmas=True")
    if cfg["use_dynamic_shifting"] and mu is None:
        raise ValueError("`mu` must be given when `use_dynamic_shifting` is True")
    if sigmas is not None:
        if not flow or kind is not None:
            # diffusers also accepts them with karras / exponential / beta re-spacing, but then
            # reads them in the opposite order to the flow path; only the flow path is supported.
            raise ValueError("custom `sigmas` are only supported with use_flow_sigmas=True and no use_*_sigmas")
        sigmas = _check_array("sigmas", sigmas, gt=0.0)
        _check_decreasing("sigmas", sigmas)
        n = sigmas.shape[0]
    n = _need_steps(n)
    T = cfg["num_train_timesteps"]
    _, train_sig, log_sig = _vp_tables(cfg, precision)
    final = cfg["final_sigmas_type"]

    if kind is not None:
        s = _apply_sigma_schedule(kind, train_sig[::-1], n, cfg["sigma_min"], cfg["sigma_max"])
        if kind == "karras" and flow:
            s = s / (s + 1)
            ts = s * T
        else:
            ts = sigma_to_t(s, log_sig)
            if kind == "karras":
                ts = ts.round()
        s = append_final_sigma(s, final)
    elif flow:
        s = multistep_flow_sigmas(
            n,
            T,
            cfg["flow_shift"],
            variant="unipc",
            use_dynamic_shifting=bool(cfg["use_dynamic_shifting"]),
            mu=mu,
            time_shift_type=cfg["time_shift_type"],
            shift_terminal=cfg["shift_terminal"],
            sigmas=sigmas,
        )
        ts = s * T
        s = append_final_sigma(s, final)
    else:
        ts = timesteps_from_spacing(n, T, cfg["timestep_spacing"], cfg["steps_offset"], "multistep")
        s = append_final_sigma(interpolate_sigmas(ts, train_sig), final, train_sig[0])
    return ScheduleArrays(_int_timesteps(ts), _round_out(s, precision))


def _deis(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    """DPMSolverMultistep's spacings without lambda clipping; karras timesteps always rounded, and
    re-spaced or flow schedules end by repeating their last sigma (a zero-length final step)."""
    _no_extras("DEISMultistepScheduler", timesteps=timesteps, sigmas=sigmas)
    n = _need_steps(n)
    kind = _sigma_flag(cfg)
    _check_choice("timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    _check_choice("time_shift_type", cfg["time_shift_type"], TIME_SHIFT_TYPES)
    T = cfg["num_train_timesteps"]
    _, train_sig, log_sig = _vp_tables(cfg, precision)
    if kind is not None:
        s = _apply_sigma_schedule(kind, train_sig[::-1], n)
        ts = sigma_to_t(s, log_sig)
        ts = ts.round() if kind == "karras" else ts
        s = append_final_sigma(s, "sigma_min")
    elif cfg["use_flow_sigmas"]:
        s = multistep_flow_sigmas(n, T, cfg["flow_shift"], variant="dpmsolver", mu=mu,
                                  use_dynamic_shifting=bool(cfg["use_dynamic_shifting"]),
                                  time_shift_type=cfg["time_shift_type"])
        ts = s * T
        s = append_final_sigma(s, "sigma_min")
    else:
        ts = timesteps_from_spacing(n, T, cfg["timestep_spacing"], cfg["steps_offset"], "multistep")
        s = append_final_sigma(interpolate_sigmas(ts, train_sig), "sigma_min", train_sig[0])
    return ScheduleArrays(_int_timesteps(ts), _round_out(s, precision))


def _sasolver(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    # DEIS's schedule (karras timesteps rounded for every beta schedule; re-spaced and flow
    # schedules end with a zero-length step) plus DPM-Solver's lambda_min_clipped cut of the
    # spaced timesteps.
    _no_extras("SASolverScheduler", timesteps=timesteps, sigmas=sigmas, mu=mu)
    arrays = _deis({**cfg, "use_dynamic_shifting": False, "time_shift_type": "exponential"}, n, None, None, None,
                   precision)
    if _sigma_flag(cfg) is not None or cfg["use_flow_sigmas"] or cfg["lambda_min_clipped"] == -math.inf:
        return arrays
    acp, train_sig, _ = _vp_tables(cfg, precision)
    last = last_timestep_for_lambda_min(acp, cfg["lambda_min_clipped"], precision=precision)
    ts = timesteps_from_spacing(n, cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"],
                                "multistep", last)
    s = append_final_sigma(interpolate_sigmas(ts, train_sig), "sigma_min", train_sig[0])
    return ScheduleArrays(_int_timesteps(ts), _round_out(s, precision))


def _flow_match_euler(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    kind = _sigma_flag(cfg)
    T = cfg["num_train_timesteps"]
    s = flow_sigmas(
        n,
        T,
        cfg["shift"],
        use_dynamic_shifting=bool(cfg["use_dynamic_shifting"]),
        mu=mu,
        time_shift_type=cfg["time_shift_type"],
        shift_terminal=cfg["shift_terminal"],
        sigma_schedule=kind,
        sigmas=sigmas,
        timesteps=timesteps,
        precision=precision,
    )
    s = _round_out(s, precision)
    if timesteps is not None:
        ts = _round_out(np.asarray(timesteps, dtype=np.float64), precision)
    else:
        ts = s * T
    if cfg["invert_sigmas"]:
        s = 1.0 - s
        ts = s * T
        s = np.concatenate([s, [1.0]])
    else:
        s = np.concatenate([s, [0.0]])
    return ScheduleArrays(_round_out(ts, precision), _round_out(s, precision))


def _edm_euler(cfg, n, timesteps, sigmas, mu, precision) -> ScheduleArrays:
    _no_extras("EDMEulerScheduler", timesteps=timesteps, mu=mu)
    if sigmas is not None:
        ramp = _check_array("sigmas", sigmas, ge=0.0, le=1.0)
        n = ramp.shape[0]
    else:
        ramp = None
        n = _need_steps(n)
    s = edm_sigmas(n, cfg["sigma_min"], cfg["sigma_max"], cfg["rho"], cfg["sigma_schedule"], ramp=ramp)
    s = _round_out(s, precision)
    ts = edm_noise_conditioning(s)
    s = append_final_sigma(s, cfg["final_sigmas_type"])
    return ScheduleArrays(_round_out(ts, precision), s)
