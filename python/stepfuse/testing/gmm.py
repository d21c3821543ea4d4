"""Analytic Gaussian-mixture diffusion model: an exact denoiser to test solvers against.

The data distribution is an isotropic Gaussian mixture over tensors of any shape,

    p_0(x) = sum_k w_k N(x; mu_k, s_k^2 I),

and everything a perfect network would know about it is available in closed form.  Under the
variance-exploding (VE) parameterisation x = x_0 + sigma * eps (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", eq. 1 and Table 1),

    p_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I),

and the ideal denoiser is Tweedie's posterior mean (Karras et al. 2022, eq. 3),

    D(x, sigma) = E[x_0 | x] = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    r_k(x)      = w_k N(x; mu_k, (s_k^2+sigma^2) I) / p_sigma(x),

with D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Karras et al. 2022, eq. 3; Efron 2011).

All math runs in float64 whatever the input dtype; results are cast back to the input dtype and
device.  Weights only need to be non-negative with a positive sum: they are normalised.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["GaussianMixture"]

Scalar = Union[float, int, torch.Tensor]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _as_float64(value, name: str) -> torch.Tensor:
    try:
        # Python numbers and lists would otherwise become float32 and lose digits.
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or array-like of numbers, got {type(value).__name__}") from exc
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {tensor.dtype}")
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite")
    return tensor


class GaussianMixture:
    """Isotropic Gaussian mixture ``sum_k w_k N(mu_k, s_k^2 I)`` with exact diffusion quantities.

    Args:
        means: ``[K, *data_shape]`` component means (any real array-like; ``K >= 1``, at least
            one data dimension).
        stds: per-component scalar standard deviations ``s_k >= 0``: a number (shared by all
            components) or ``[K]``.  ``s_k = 0`` makes component k a point mass.
        weights: ``[K]`` non-negative mixture weights with a positive sum, or ``None`` for
            uniform.  They are normalised to sum to 1, so ``[1, 3]`` means ``[0.25, 0.75]``.

    Raises:
        ValueError / TypeError naming the offending argument.
    """

    def __init__(self, means, stds, weights=None):
        means = _as_float64(means, "means")
        if means.dim() < 2 or means.shape[0] < 1 or means[0].numel() < 1:
            raise ValueError(
                f"means must have shape [K, *data_shape] with K >= 1 and a non-empty data shape, "
                f"got {tuple(means.shape)}"
            )
        num_components = means.shape[0]

        stds = _as_float64(stds, "stds")
        if stds.dim() == 0:
            stds = stds.expand(num_components).clone()
        if stds.shape != (num_components,):
            raise ValueError(f"stds must be a number or have shape [{num_components}], got {tuple(stds.shape)}")
        if bool((stds < 0).any()):
            raise ValueError(f"stds must be >= 0, got {stds.tolist()}")

        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        else:
            weights = _as_float64(weights, "weights")
            if weights.shape != (num_components,):
                raise ValueError(f"weights must have shape [{num_components}], got {tuple(weights.shape)}")
            if bool((weights < 0).any()):
                raise ValueError(f"weights must be >= 0, got {weights.tolist()}")
            total = float(weights.sum())
            if not total > 0:
                raise ValueError("weights must have a positive sum")
            weights = weights / total

        self.means = means
        self.stds = stds
        self.weights = weights
        self.data_shape = tuple(means.shape[1:])
        self._flat_means = means.reshape(num_components, -1)
        self._cache = {}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def random(
        cls,
        num_components: int,
        data_shape: Union[int, Sequence[int]],
        seed: int = 0,
        spread: float = 3.0,
        std: Union[float, Tuple[float, float]] = (0.3, 0.8),
    ) -> "GaussianMixture":
        """A reproducible, well-separated but non-trivial mixture for tests.

        Mean coordinates are drawn from ``N(0, spread^2 / dim)`` so ``|mu_k| ~ spread`` in any
        dimension: how hard the components are to tell apart depends on distance / std, not on
        ``dim``.  Stds are ``std`` (a number) or uniform in ``std = (lo, hi)``; weights are uniform
        in [0.5, 1.5] then normalised.  Draws are repeated until every pair of means is at least
        ``2 * max(std)`` apart (so, for two equal 1-D components, the density is bimodal), which
        keeps posteriors informative at small sigma and mixed at sigma ~ spread.
        """
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"num_components must be a positive integer, got {num_components}")
        num_components = int(num_components)
        data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(int(d) for d in data_shape)
        if len(data_shape) == 0 or any(d < 1 for d in data_shape):
            raise ValueError(f"data_shape must be non-empty with positive sizes, got {data_shape}")
        if not spread > 0:
            raise ValueError(f"spread must be > 0, got {spread}")
        lo, hi = (float(std), float(std)) if isinstance(std, (int, float)) else (float(std[0]), float(std[1]))
        if not 0 <= lo <= hi:
            raise ValueError(f"std must be a number >= 0 or a pair 0 <= lo <= hi, got {std}")

        gen = torch.Generator().manual_seed(int(seed))
        dim = math.prod(data_shape)
        min_distance = 2.0 * hi
        for _ in range(1000):
            means = torch.randn((num_components, dim), generator=gen, dtype=torch.float64) * (spread / math.sqrt(dim))
            if num_components == 1 or float(torch.pdist(means).min()) >= min_distance:
                break
        else:
            raise ValueError(
                f"could not place {num_components} means at least {min_distance} apart with spread={spread}; "
                "increase spread or reduce std"
            )
        stds = lo + (hi - lo) * torch.rand(num_components, generator=gen, dtype=torch.float64)
        weights = 0.5 + torch.rand(num_components, generator=gen, dtype=torch.float64)
        return cls(means.reshape(num_components, *data_shape), stds, weights)

    # ------------------------------------------------------------------ properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """E[x_0], shape ``data_shape`` (float64)."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    @property
    def variance(self) -> torch.Tensor:
        """Per-coordinate Var[x_0] = sum_k w_k (s_k^2 + mu_k^2) - E[x_0]^2, shape ``data_shape``."""
        second = torch.einsum("k,k...->...", self.weights, self.means.square())
        second = second + (self.weights * self.stds.square()).sum()
        return second - self.mean.square()

    def __repr__(self) -> str:
        return (
            f"GaussianMixture(num_components={self.num_components}, data_shape={self.data_shape}, "
            f"stds={[round(s, 4) for s in self.stds.tolist()]}, weights={[round(w, 4) for w in self.weights.tolist()]})"
        )

    # ------------------------------------------------------------------ input handling
    def _params(self, device: torch.device):
        key = str(device)
        if key not in self._cache:
            log_w = torch.log(self.weights)  # -inf for zero weights drops the component from every softmax
            self._cache[key] = tuple(
                t.to(device) for t in (self._flat_means, self.stds.square(), log_w, self.weights, self.stds)
            )
        return self._cache[key]

    def _check_x(self, x, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dim() != len(self.data_shape) + 1 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"{name} must have shape [B, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")
        return x

    @staticmethod
    def _per_batch(value: Scalar, batch: int, name: str, device: torch.device) -> torch.Tensor:
        """A number, a one-element tensor, ``[B]`` or ``[B, 1, ..., 1]`` -> float64 ``[B]``."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=device) if not isinstance(value, torch.Tensor) else value
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {tensor.dtype}")
        tensor = tensor.to(device=device, dtype=torch.float64)
        if tensor.numel() == 1:
            tensor = tensor.reshape(1).expand(batch)
        elif tensor.dim() >= 1 and tensor.shape[0] == batch and tensor.numel() == batch:
            tensor = tensor.reshape(batch)
        else:
            raise ValueError(f"{name} must be a number or have shape [{batch}] (one per batch element), got {tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
        return tensor

    # ------------------------------------------------------------------ core math
    def _log_joint(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """log w_k + log N(x; alpha mu_k, V_k I) - const, with V_k = alpha^2 s_k^2 + sigma^2.

        Written for x_t = alpha x_0 + sigma eps so that alpha = 0 (pure noise) needs no division;
        the VE case is alpha = 1.  Returns ``(log_joint [B, K], V [B, K])``; entries with V = 0
        (point mass at sigma = 0) use V = 1 as a placeholder and callers must not rely on them.
        """
        mu, s2, log_w, _, _ = self._params(x.device)
        dim = x.shape[1]
        variance = alpha.square()[:, None] * s2[None, :] + sigma.square()[:, None]
        variance = torch.where(variance > 0, variance, torch.ones_like(variance))
        # One component at a time: exact squared distances (no |x|^2 - 2 x.mu + |mu|^2
        # cancellation) without a [B, K, D] temporary.
        sq = torch.stack([(x - alpha[:, None] * mu[k]).square().sum(1) for k in range(mu.shape[0])], dim=1)
        log_joint = log_w[None, :] - 0.5 * dim * torch.log(variance) - 0.5 * sq / variance
        return log_joint, variance

    def _posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, want_eps: bool):
        """E[x_0 | x_t] and (optionally) E[eps | x_t] for x_t = alpha x_0 + sigma eps, x [B, D] float64.

        Per component, x_t ~ N(alpha mu_k, V_k I) and (x_0, eps) are jointly Gaussian with x_t:
            E[x_0 | x_t, k] = mu_k + alpha s_k^2 / V_k (x_t - alpha mu_k)
            E[eps | x_t, k] = sigma / V_k (x_t - alpha mu_k)
        which equals Tweedie's D(x_t/alpha, sigma/alpha) (Karras et al. 2022, eq. 3) after
        multiplying through by alpha^2.
        """
        mu, s2, _, _, _ = self._params(x.device)
        log_joint, variance = self._log_joint(x, alpha, sigma)
        post = torch.softmax(log_joint, dim=1)  # log-sum-exp normalisation: stable for far-away x
        # x0 = sum_k r_k [sigma^2/V_k mu_k + alpha s_k^2/V_k x]  (1 - alpha^2 s^2/V = sigma^2/V)
        x0 = (post * sigma.square()[:, None] / variance) @ mu
        x0 = x0 + (post * alpha[:, None] * s2[None, :] / variance).sum(1, keepdim=True) * x
        # At sigma = 0 the posterior is a point mass at x/alpha even for std-0 components,
        # where the placeholder variance above would be wrong.
        clean = sigma == 0
        if bool(clean.any()):
            x0 = torch.where(clean[:, None], x / torch.where(clean, alpha, torch.ones_like(alpha))[:, None], x0)
        eps = None
        if want_eps:
            if bool(clean.any()) and bool((s2 == 0).any()):
                raise ValueError("sigma must be > 0 for the noise prediction / score when a component has std 0")
            # Residuals per component instead of c*x - P@mu: no cancellation when x is close to
            # alpha*mu_k and sigma is tiny (eps ~ (x - alpha mu_k) / sigma there).
            coeff = post * sigma[:, None] / variance
            eps = torch.zeros_like(x)
            for k in range(mu.shape[0]):
                eps = eps + coeff[:, k : k + 1] * (x - alpha[:, None] * mu[k])
        return x0, eps

    def _prepare(self, x, sigma, name="sigma"):
        x = self._check_x(x)
        batch = x.shape[0]
        sigma = self._per_batch(sigma, batch, name, x.device)
        return x.reshape(batch, -1).to(torch.float64), sigma

    # ------------------------------------------------------------------ public VE API
    def denoise(self, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """Exact denoiser D(x, sigma) = E[x_0 | x_0 + sigma eps = x] (Karras et al. 2022, eq. 3).

        Args:
            x: ``[B, *data_shape]``, any floating dtype and device.
            sigma: VE noise level(s) >= 0: a number, one-element tensor, ``[B]`` or ``[B, 1, ...]``.
                At sigma = 0, D(x, 0) = x.
        Returns ``[B, *data_shape]`` in ``x.dtype``.
        """
        flat, sigma = self._prepare(x, sigma)
        x0, _ = self._posterior(flat, torch.ones_like(sigma), sigma, want_eps=False)
        return x0.reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Karras et al. 2022, eq. 3).

        Computed as -sum_k r_k (x - mu_k) / (s_k^2 + sigma^2), which is finite at sigma = 0 when
        every s_k > 0 (sigma = 0 with a std-0 component raises ValueError).
        """
        flat, sigma = self._prepare(x, sigma)
        mu, s2, _, _, _ = self._params(flat.device)
        if bool((sigma == 0).any()) and bool((s2 == 0).any()):
            raise ValueError("sigma must be > 0 for the score when a component has std 0")
        log_joint, variance = self._log_joint(flat, torch.ones_like(sigma), sigma)
        coeff = torch.softmax(log_joint, dim=1) / variance
        score = torch.zeros_like(flat)
        for k in range(mu.shape[0]):
            score = score - coeff[:, k : k + 1] * (flat - mu[k])
        return score.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """log p_sigma(x) = logsumexp_k [log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I)], shape ``[B]``.

        Differentiable in x (autograd through float64).  sigma = 0 with a std-0 component
        raises ValueError (a point mass has no density).
        """
        flat, sigma = self._prepare(x, sigma)
        _, s2, _, _, _ = self._params(flat.device)
        if bool((sigma == 0).any()) and bool((s2 == 0).any()):
            raise ValueError("sigma must be > 0 for log_prob when a component has std 0 (point mass)")
        log_joint, _ = self._log_joint(flat, torch.ones_like(sigma), sigma)
        log_p = torch.logsumexp(log_joint, dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
        return log_p.to(x.dtype)

    # ------------------------------------------------------------------ VP / flow network output
    def model_output(self, x_t: torch.Tensor, alpha_t: Scalar, sigma_t: Scalar, prediction_type: str) -> torch.Tensor:
        """What a perfect network predicts for x_t = alpha_t x_0 + sigma_t eps.

        This is D(x_t / alpha_t, sigma_t / alpha_t) for x_0 (the VP/flow -> VE change of variables,
        Karras et al. 2022, Sec. 2 / eq. 4 with s(t) = alpha_t), evaluated without dividing by
        alpha_t so that alpha_t = 0 is exact; then eps = E[eps | x_t].

        prediction_type:
            ``'epsilon'``: E[eps | x_t].
            ``'sample'``: E[x_0 | x_t].
            ``'v_prediction'``: alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "Progressive
                distillation", Sec. 4 / Appendix D).
            ``'flow_prediction'``: eps - x_0, the velocity dx_t/ds of rectified flow with
                alpha_t = 1 - s, sigma_t = s (Liu et al. 2022; Esser et al. 2024, eq. 2-3).  Only
                the output formula is flow-specific; alpha_t, sigma_t are taken as given.

        Edge cases: alpha_t = 0 (flow s = 1, pure noise) is exact: x_0 = E[x_0] = sum_k w_k mu_k and
        eps = x_t / sigma_t.  sigma_t = 0 (clean input) gives x_0 = x_t / alpha_t and eps = 0 when
        every s_k > 0; with a std-0 component eps is undefined there and a ValueError is raised for
        every type except 'sample'.  alpha_t = sigma_t = 0 raises ValueError.

        alpha_t, sigma_t: numbers, one-element tensors, ``[B]`` or ``[B, 1, ...]``; >= 0.
        Returns ``[B, *data_shape]`` in ``x_t.dtype``.
        """
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        x_t = self._check_x(x_t, "x_t")
        batch = x_t.shape[0]
        alpha = self._per_batch(alpha_t, batch, "alpha_t", x_t.device)
        sigma = self._per_batch(sigma_t, batch, "sigma_t", x_t.device)
        if bool(((alpha == 0) & (sigma == 0)).any()):
            raise ValueError("alpha_t and sigma_t must not both be 0")
        flat = x_t.reshape(batch, -1).to(torch.float64)
        x0, eps = self._posterior(flat, alpha, sigma, want_eps=prediction_type != "sample")
        if prediction_type == "sample":
            out = x0
        elif prediction_type == "epsilon":
            out = eps
        elif prediction_type == "v_prediction":
            out = alpha[:, None] * eps - sigma[:, None] * x0
        else:
            out = eps - x0
        return out.reshape(x_t.shape).to(x_t.dtype)

    # ------------------------------------------------------------------ sampling
    def _draw(self, n, sigma, generator, dtype, device):
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        n = int(n)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        mu, s2, _, weights, _ = self._params(draw_device)
        sigma = self._per_batch(0.0 if sigma is None else sigma, n, "sigma", draw_device) if n > 0 else None
        if n == 0:
            return torch.empty((0, *self.data_shape), dtype=dtype, device=device)
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        z = torch.randn((n, mu.shape[1]), generator=generator, dtype=torch.float64, device=draw_device)
        # x_0 + sigma eps with x_0 ~ N(mu_k, s_k^2) is one Gaussian draw of variance s_k^2 + sigma^2.
        std = torch.sqrt(s2[component] + sigma.square())
        x = mu[component] + std[:, None] * z
        return x.reshape(n, *self.data_shape).to(device=device if device is not None else draw_device, dtype=dtype)

    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64, device=None
    ) -> torch.Tensor:
        """n exact samples of p_0, ``[n, *data_shape]``; drawn on ``generator.device`` (CPU if none)
        in float64, then moved to ``device`` / ``dtype``."""
        return self._draw(n, None, generator, dtype, device)

    def sample_noisy(
        self,
        n: int,
        sigma: Scalar,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> torch.Tensor:
        """n exact samples of p_sigma = p_0 * N(0, sigma^2 I); sigma a number or ``[n]``."""
        return self._draw(n, sigma, generator, dtype, device)

    # ------------------------------------------------------------------ reference ODE solution
    def ode_solution(
        self,
        x_T: torch.Tensor,
        sigma_T: Scalar,
        sigma_end: Scalar = 0.0,
        rtol: float = 1e-10,
        atol: float = 1e-10,
    ) -> torch.Tensor:
        """High-accuracy solution of the VE probability-flow ODE from sigma_T to sigma_end.

        The ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 1 with
        sigma(t) = t, and eq. 4 with s(t) = 1).  It is integrated in tau = log sigma,

            dx/dtau = x - D(x, sigma) = sigma E[eps | x],

        where the right-hand side is O(1) for large sigma and decays smoothly as sigma -> 0, so the
        steps are well conditioned over the many decades a diffusion schedule spans.  The
        integrator is scipy's DOP853 on the flattened batch in float64 on the CPU; note that scipy
        controls the RMS error over the whole state, so a single element may see an error somewhat
        above rtol/atol.  For states under 2^20 elements torch runs single-threaded during the
        integration (restored afterwards).

        sigma_end = 0: the ODE is singular at sigma = 0, so it is integrated down to
        sigma_min = min(sigma_T, 1e-5 * ref) (ref = the smallest positive s_k, or 1 if all
        components are point masses) and finished with each component's exact flow, weighted by
        the posterior at sigma_min:

            x(0) = sum_k r_k(x) [mu_k + (x - mu_k) s_k / sqrt(s_k^2 + sigma_min^2)].

        That step is exact for a single Gaussian and for a point mass, and in general agrees with
        the true flow to O(sigma_min^4) (both equal x + sigma_min^2/2 * score + ...).

        Any direction works (sigma_end > sigma_T integrates upward, e.g. for inversion).

        VP / flow users convert first: x_ve = x_vp / alpha_t, sigma_ve = sigma_t / alpha_t, and map
        back with x_vp = alpha_end * x_ve (for flow, alpha = 1 - s, sigma = s).

        Args:
            x_T: ``[B, *data_shape]`` states at sigma_T, any floating dtype/device.
            sigma_T: the start noise level, a number > 0 shared by the batch.
            sigma_end: the end noise level, a number >= 0.
        Returns the states at sigma_end, shaped like ``x_T`` in its dtype and device.
        """
        from scipy.integrate import solve_ivp

        x_T = self._check_x(x_T, "x_T")
        sigma_T, sigma_end = self._scalar(sigma_T, "sigma_T"), self._scalar(sigma_end, "sigma_end")
        if not sigma_T > 0:
            raise ValueError(f"sigma_T must be > 0, got {sigma_T}")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
        batch = x_T.shape[0]
        x = x_T.detach().reshape(batch, -1).to(device="cpu", dtype=torch.float64).clone()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x_T must be finite")
        if batch == 0:
            return x_T.clone()

        positive = self.stds[self.stds > 0]
        sigma_min = min(sigma_T, 1e-5 * (float(positive.min()) if positive.numel() else 1.0))
        sigma_stop = sigma_end if sigma_end > 0 else sigma_min
        ones = torch.ones(batch, dtype=torch.float64)

        def rhs(tau, y):
            sigma = math.exp(tau)
            state = torch.from_numpy(y).view(batch, -1)
            _, eps = self._posterior(state, ones, ones * sigma, want_eps=True)
            return (sigma * eps).reshape(-1).numpy()

        if sigma_stop != sigma_T:
            # The right-hand side is thousands of calls on small tensors: intra-op threads do not
            # help there, and on a busy machine their barriers made it 10-20x slower.  The thread
            # count is process-wide, so it is restored right after.
            threads = torch.get_num_threads()
            if x.numel() < 2**20:
                torch.set_num_threads(1)
            try:
                solution = solve_ivp(
                    rhs,
                    (math.log(sigma_T), math.log(sigma_stop)),
                    x.reshape(-1).numpy(),
                    method="DOP853",
                    rtol=rtol,
                    atol=atol,
                )
            finally:
                torch.set_num_threads(threads)
            if not solution.success:
                raise RuntimeError(f"ode_solution: integration failed: {solution.message}")
            x = torch.from_numpy(np.ascontiguousarray(solution.y[:, -1])).view(batch, -1)

        if sigma_end == 0:
            mu, s2, _, _, s = self._params(x.device)
            sigma = ones * sigma_stop
            log_joint, _ = self._log_joint(x, ones, sigma)
            post = torch.softmax(log_joint, dim=1)
            ratio = s / torch.sqrt(s2 + sigma_stop**2)
            x = (post * (1 - ratio)[None, :]) @ mu + (post * ratio[None, :]).sum(1, keepdim=True) * x

        return x.reshape(x_T.shape).to(device=x_T.device, dtype=x_T.dtype)

    @staticmethod
    def _scalar(value: Scalar, name: str) -> float:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a single number shared by the batch, got shape {tuple(value.shape)}")
            value = value.item()
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a number, got {type(value).__name__}") from exc
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
        return value
