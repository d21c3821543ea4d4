"""A solver step as a linear program over a few per-element operands.

Every training-free solver stepfuse implements updates the state with a linear
combination of the current sample, the raw model output, a few stored history
entries (past data/noise predictions, past samples) and optionally fresh noise
(see DESIGN.md, "a solver is a coefficient plan").  A :class:`StepProgram` is
that combination for one step, computed once on the host in float64:

* operands (columns), per element: ``0`` the sample ``x``, ``1`` the raw model
  output, ``2 .. 2+R-1`` the ``R`` history slots, ``2+R`` the noise ``z``;
* rows, evaluated in order: ``target = sum_c coeff[c] * operand[c]``; a target
  ``>= 0`` overwrites that history slot (later rows read the new value), the
  target :data:`OUTPUT` (-1) is the next sample, which must be the last row.

The fused kernel ``torch.ops.stepfuse.solver_step`` evaluates the program in
one pass with fp32 accumulation; ``stepfuse.ref.solver_step`` is its oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

OUTPUT = -1
SAMPLE = "x"
MODEL_OUTPUT = "out"
NOISE = "noise"

Term = Mapping[object, float]


def _column(key: object, num_slots: int) -> int:
    """Column of an operand key: "x", "out", "noise" or a history slot index."""
    if key == SAMPLE:
        return 0
    if key == MODEL_OUTPUT:
        return 1
    if key == NOISE:
        return 2 + num_slots
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < num_slots:
        return 2 + key
    raise ValueError(f"operand key must be 'x', 'out', 'noise' or a slot in [0, {num_slots}), got {key!r}")


@dataclass(frozen=True)
class StepProgram:
    """Rows of one fused solver step; ``coeffs`` is row-major ``len(targets) x (3 + num_slots)``."""

    num_slots: int
    targets: tuple[int, ...]
    coeffs: tuple[float, ...]
    # Flat Python lists handed to the op as-is: no per-step conversion work.
    targets_list: list = field(init=False, repr=False, compare=False)
    coeffs_list: list = field(init=False, repr=False, compare=False)
    uses_noise: bool = field(init=False, repr=False, compare=False)
    uses_model_output: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        width = 3 + self.num_slots
        if self.num_slots < 0 or self.num_slots > MAX_SLOTS:
            raise ValueError(f"num_slots must be in [0, {MAX_SLOTS}], got {self.num_slots}")
        if not self.targets or self.targets[-1] != OUTPUT or OUTPUT in self.targets[:-1]:
            raise ValueError("targets must end with exactly one OUTPUT (-1) row")
        if any(t < OUTPUT or t >= self.num_slots for t in self.targets):
            raise ValueError(f"targets must be -1 or a slot in [0, {self.num_slots}), got {self.targets}")
        if len(self.coeffs) != len(self.targets) * width:
            raise ValueError(f"coeffs must have {len(self.targets) * width} entries, got {len(self.coeffs)}")
        if not all(math.isfinite(c) for c in self.coeffs):
            raise ValueError(f"coeffs must be finite, got {self.coeffs}")
        object.__setattr__(self, "targets_list", list(self.targets))
        object.__setattr__(self, "coeffs_list", [float(c) for c in self.coeffs])
        rows = range(len(self.targets))
        object.__setattr__(self, "uses_noise", any(self.coeffs[r * width + width - 1] != 0.0 for r in rows))
        object.__setattr__(self, "uses_model_output", any(self.coeffs[r * width + 1] != 0.0 for r in rows))

    @classmethod
    def build(cls, num_slots: int, rows: Iterable[tuple[int, Term]]) -> "StepProgram":
        """Build from ``(target, {operand: coeff})`` rows; operand keys as in :func:`_column`."""
        width = 3 + num_slots
        targets, coeffs = [], []
        for target, terms in rows:
            row = [0.0] * width
            for key, value in terms.items():
                row[_column(key, num_slots)] += float(value)
            targets.append(int(target))
            coeffs.extend(row)
        return cls(num_slots, tuple(targets), tuple(coeffs))

    @property
    def width(self) -> int:
        return 3 + self.num_slots

    def row(self, i: int) -> Sequence[float]:
        return self.coeffs[i * self.width : (i + 1) * self.width]


MAX_SLOTS = 8
