"""Drop-in ``PNDMScheduler``: pseudo numerical methods (Liu et al. 2022), each step one fused op.

PNDM moves between training timesteps with the transfer of Liu et al. 2022, eq. 9 (linear
in the sample and the noise prediction) and feeds it a combined noise prediction: a
pseudo Runge-Kutta step (four model calls, weights 1/6, 1/3, 1/3, 1/6) for the first three
steps, then the pseudo linear multistep (Adams-Bashforth, eq. 12) combination of the last
four predictions. diffusers chooses among these with a call counter; here the same counter
logic runs once per run on the host, in ``set_timesteps``, and leaves one
:class:`~stepfuse.solvers.program.StepProgram` per call with the transfer and the
combination folded into its coefficients (float64). ``step()`` only picks the program.

History ring: slots ``0 .. 3`` hold the raw model outputs diffusers keeps in ``ets``
(round robin: at most four are alive), slot 4 the sample a step restarts from
(``cur_sample``), slot 5 the running Runge-Kutta sum (``cur_model_output``). Raw outputs are
stored, as diffusers does, so v-predictions are combined before their conversion to noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

from .. import schedules
from ..solvers.ddim import vp_conversions
from ..solvers.program import OUTPUT, StepProgram
from .ddim import DDIMScheduler
from .diffusers_base import FusedSchedulerMixin, check_choice

PREDICTION_TYPES = ("epsilon", "v_prediction")
PNDM_ORDER = 4
ETS_SLOTS = 4
CUR_SAMPLE = 4
RK_SUM = 5
NUM_SLOTS = 6

# Liu et al. 2022, eq. 12: weights of the newest .. oldest noise prediction, by how many exist.
PLMS_WEIGHTS = {
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def pndm_transfer(alpha_prod_t: float, alpha_prod_prev: float) -> tuple:
    """``(c_x, c_eps)`` with ``x_prev = c_x x_t + c_eps eps`` (Liu et al. 2022, eq. 9), float64."""
    a, a_prev = alpha_prod_t, alpha_prod_prev
    denom = a * math.sqrt(1.0 - a_prev) + math.sqrt(a * (1.0 - a) * a_prev)
    return math.sqrt(a_prev / a), -(a_prev - a) / denom


def _add(terms: dict, key, value: float) -> None:
    terms[key] = terms.get(key, 0.0) + value


class PNDMScheduler(FusedSchedulerMixin):
    """PRK + PLMS (or PLMS alone with ``skip_prk_steps``) with diffusers' config and call protocol.

    Same constructor and config keys as ``diffusers.PNDMScheduler``. Like diffusers, which phase
    a call runs is decided by ``counter`` (the number of ``step`` calls since ``set_timesteps``),
    and the timestep of call ``counter`` must be ``timesteps[counter]``: tensors are not read
    (no device sync), a Python int that differs is rejected.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    # The forward process is DDIM's: the same float32 tables, indexed by training timestep.
    _scales_at = DDIMScheduler._scales_at
    add_noise = DDIMScheduler.add_noise

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, schedules.BETA_SCHEDULES[:3])
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        # diffusers' float32 tables bit for bit; every coefficient is float64 math on them.
        betas = schedules.betas_for_schedule(
            beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, precision="float32"
        )
        self._alphas_cumprod64 = schedules.alphas_cumprod_from_betas(betas, precision="float32")
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self._alphas_cumprod64).float()
        # alphas_cumprod "before" the first training step, where the last transfer lands.
        self._final_alpha_cumprod64 = 1.0 if set_alpha_to_one else float(self._alphas_cumprod64[0])
        self.final_alpha_cumprod = torch.tensor(self._final_alpha_cumprod64, dtype=torch.float32)
        self._vp_scales64 = torch.from_numpy(
            np.stack([np.sqrt(self._alphas_cumprod64), np.sqrt(1.0 - self._alphas_cumprod64)])
        )
        self.init_noise_sigma = 1.0
        self.pndm_order = PNDM_ORDER
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._reset_run()

    def _reset_run(self) -> None:
        super()._reset_run()
        self.counter = 0
        # step() keys everything on the counter: the run always starts at program 0.
        self._step_index = self._run_start = 0
        self._timestep_values = self._timesteps_host.tolist() if self.timesteps is not None else []
        self._phases: list = []

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """PRK and PLMS timesteps exactly as diffusers lays them out; the programs are built here."""
        cfg = self.config
        n = int(num_inference_steps)
        if not cfg.skip_prk_steps and n < PNDM_ORDER:
            # diffusers fails here with a numpy broadcasting error: PRK needs four grid points.
            raise ValueError(f"num_inference_steps must be >= {PNDM_ORDER} when skip_prk_steps=False, got {n}")
        # PNDM's base grid is DDIM's, ascending.
        self._timesteps = schedules.timesteps_from_spacing(
            n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset, variant="ddim"
        )[::-1].copy()
        if cfg.skip_prk_steps:
            # PLMS alone: the second call redoes the first step with the mean of two predictions.
            self.prk_timesteps = np.array([], dtype=np.int64)
            grid = self._timesteps
            self.plms_timesteps = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
        else:
            # Three RK steps over the last (noisiest) four grid points, each as four calls at
            # t, t - h/2, t - h/2, t - h; PLMS then takes the remaining grid.
            half = np.tile([0, cfg.num_train_timesteps // n // 2], PNDM_ORDER)
            prk = np.asarray(self._timesteps[-PNDM_ORDER:]).repeat(2) + half
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset_run()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PNDM's model input needs no scaling."""
        return sample

    # -- the plan ----------------------------------------------------------------------------
    def _alpha_prod(self, t: int) -> float:
        if t >= self.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={self.num_inference_steps} makes PNDM evaluate timestep {t}, beyond the "
                f"{self.config.num_train_timesteps} training timesteps"
            )
        return float(self._alphas_cumprod64[t]) if t >= 0 else self._final_alpha_cumprod64

    def _transfer_row(self, t: int, t_prev: int, start: object, eps: dict) -> dict:
        """Output row of eq. 9 from sample operand ``start`` with the combined raw model output ``eps``."""
        a_t = self._alpha_prod(t)
        c_x, c_eps = pndm_transfer(a_t, self._alpha_prod(t_prev))
        # eps = pe * start + qe * (combined output): the v -> eps conversion is linear too.
        _, (pe, qe) = vp_conversions(self.config.prediction_type, a_t)
        terms: dict = {}
        _add(terms, start, c_x + c_eps * pe)
        for key, weight in eps.items():
            _add(terms, key, c_eps * qe * weight)
        return terms

    def _build_plan(self, start_index: int) -> list:
        """Replays diffusers' counter logic symbolically: operands instead of tensors, one program per call."""
        cfg = self.config
        ratio = cfg.num_train_timesteps // self.num_inference_steps
        num_prk = 0 if cfg.skip_prk_steps else len(self.prk_timesteps)
        num_calls = len(self._timestep_values)
        ets: list = []  # ring slot of each model output diffusers keeps
        appended = 0
        plan, phases = [], []
        for c, t in enumerate(self._timestep_values):
            rows: list = []
            newest = None

            def keep_output():
                nonlocal appended, newest
                newest = appended % ETS_SLOTS
                appended += 1
                ets.append(newest)
                rows.append((newest, {"out": 1.0}))

            if c < num_prk:
                # Pseudo Runge-Kutta (Liu et al. 2022, eq. 13): calls 0..3 of each block share its start.
                t_prev = t - (0 if c % 2 else ratio // 2)
                t_start = int(self.prk_timesteps[c // 4 * 4])
                stage = c % 4
                eps = {"out": 1.0}
                start = CUR_SAMPLE
                if stage == 0:
                    rows.append((RK_SUM, {"out": 1 / 6}))
                    keep_output()
                    rows.append((CUR_SAMPLE, {"x": 1.0}))
                    start = "x"
                elif stage in (1, 2):
                    rows.append((RK_SUM, {RK_SUM: 1.0, "out": 1 / 3}))
                else:
                    eps = {RK_SUM: 1.0, "out": 1 / 6}
                output = self._transfer_row(t_start, t_prev, start, eps)
                phases.append("prk")
            else:
                t_prev, t_start, start = t - ratio, t, "x"
                if c != 1:
                    del ets[:-3]
                    keep_output()
                else:
                    t_prev, t_start = t, t + ratio
                if len(ets) == 1 and c == 0:
                    eps = {"out": 1.0}
                    rows.append((CUR_SAMPLE, {"x": 1.0}))
                elif len(ets) == 1 and c == 1:
                    # PLMS warm-up (skip_prk_steps): redo the first step with the mean prediction.
                    eps = {"out": 0.5, ets[-1]: 0.5}
                    start = CUR_SAMPLE
                else:
                    weights = PLMS_WEIGHTS[len(ets)]
                    eps = {}
                    for slot, w in zip(reversed(ets), weights):
                        _add(eps, "out" if slot == newest else slot, w)
                output = self._transfer_row(t_start, t_prev, start, eps)
                phases.append("plms")
            if c == num_calls - 1:
                rows = []  # nothing reads the ring after the last call
            plan.append(StepProgram.build(NUM_SLOTS, rows + [(OUTPUT, output)]))
        self._phases = phases
        return plan

    # -- step --------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One PNDM call: PRK while ``counter`` is in the PRK phase, else PLMS; a single fused kernel."""
        in_prk = self.prk_timesteps is not None and self.counter < len(self.prk_timesteps)
        phase = "prk" if in_prk and not self.config.skip_prk_steps else "plms"
        return self._pndm_step(phase, model_output, timestep, sample, return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A pseudo Runge-Kutta call (Liu et al. 2022, eq. 13); only valid in the PRK phase."""
        return self._pndm_step("prk", model_output, timestep, sample, return_dict)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A pseudo linear multistep call (Liu et al. 2022, eq. 12); only valid in the PLMS phase."""
        return self._pndm_step("plms", model_output, timestep, sample, return_dict)

    def _pndm_step(self, phase: str, model_output, timestep, sample, return_dict: bool):
        c = self._begin_step(model_output, timestep, sample)
        program = self._program_at(c)
        if self._phases[c] != phase:
            raise ValueError(
                f"step_{phase} called at counter {c}, which is a {self._phases[c].upper()} call "
                f"(skip_prk_steps={self.config.skip_prk_steps}); use step()"
            )
        if not isinstance(timestep, torch.Tensor) and int(timestep) != self._timestep_values[c]:
            expected = self._timestep_values[c]
            raise ValueError(f"timestep must be timesteps[{c}] = {expected} at this call, got {timestep}")
        prev_sample = self._run(program, model_output, sample)
        self.counter += 1
        self._step_index = self.counter
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
