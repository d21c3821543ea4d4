"""Run a Hopper Gluon kernel on the CPU, one program at a time, checking its asynchronous hazards.

Gluon kernels cannot run under ``TRITON_INTERPRET=1``, and a machine without a Hopper GPU can only
compile them.  :func:`emulate` runs a kernel's Python body instead, with torch tensors standing in
for registers and shared memory and sequential stand-ins for the asynchronous machinery:

* a TMA copy (``tma.async_copy_global_to_shared``) lands at once, reading zeros outside the
  descriptor's shape (the hardware's out-of-bounds fill), and completes its bytes on the mbarrier;
* ``mbarrier.expect`` is an arrival that also expects bytes (PTX ``mbarrier.arrive.expect_tx``); a
  phase completes when all arrivals are in and all expected bytes have landed;
* ``mbarrier.wait(bar, phase)`` returns when the phase of that parity has completed (PTX
  ``mbarrier.try_wait.parity``); one that no partition can complete any more is a deadlock;
* ``warpgroup_mma(..., is_async=True)`` computes its result (fp32 accumulation) and returns a
  token that ``warpgroup_mma_wait(num_outstanding, deps)`` resolves once the group is retired,
  oldest first;
* a TMA store (``tma.async_copy_shared_to_global``) writes at once, clipped to the tensor, and
  stays pending until ``tma.store_wait`` lets it go;
* ``gl.warp_specialize`` runs each partition in a thread, one at a time, switching where the order
  matters (a wait it cannot pass, and by the schedule asked for, arrivals and landing copies:
  see :class:`_Scheduler`); each partition sees a copy's data only after it waited for it itself.

Landing and computing at issue gives the right values for a correct kernel; what the sequential
order hides, the hazard checks catch, whatever the real timing would be:

* an MMA reading shared memory that a copy is still filling (issued, but its phase not yet waited
  on by the reading partition): read before the data is guaranteed to be there;
* a copy (or a register store) into shared memory that an MMA or TMA store still in flight reads:
  the operand may be overwritten before it is read;
* an MMA or TMA store reading shared memory written from registers with no ``fence_async_shared``
  since (the generic and async proxies are not ordered without it);
* a token read before its group was retired, a wait that could never return, a copy or MMA still
  in flight when the program ends, a global access outside the tensor, an output written twice.

Any of these raises :class:`GluonHazard`; hazards between partitions show under the schedules
that expose them (a slot released early shows when its producer runs at once, ``"eager"``).  The stand-ins cover the operations the kernels of
:mod:`stepfuse.attention.gluon_kernel` use; any other raises ``AttributeError`` naming it.
"""

from __future__ import annotations

import math
import threading
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["GluonHazard", "emulate", "launcher"]


class GluonHazard(RuntimeError):
    """The emulated program did something whose outcome depends on the timing of asynchronous work."""


def _int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def _bool(x) -> bool:
    return bool(x.item()) if isinstance(x, torch.Tensor) else bool(x)


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [first, end) a view occupies in its storage."""
    start = t.storage_offset()
    last = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start * t.element_size(), (last + 1) * t.element_size()


# ---------------------------------------------------------------------------------------------
# state of one program (a CTA) and of its warp-specialised partitions


class _Program:
    """One program: its TMA copies and the partitions running it (one, the whole program, outside
    ``gl.warp_specialize``)."""

    def __init__(self, pid: Tuple[int, int, int], grid: Tuple[int, int, int], schedule: str, seed: int):
        self.pid, self.grid, self.schedule, self.seed = pid, grid, schedule, seed
        self.copies: List["_Copy"] = []  # TMA copies, each with the partitions that waited for it
        self.unfenced: List[Tuple["_Part", "_Shared"]] = []  # register writes not yet fenced, by writer
        self.parts: List["_Part"] = []
        self.scheduler: Optional["_Scheduler"] = None  # inside gl.warp_specialize

    def hazard(self, message: str) -> GluonHazard:
        return GluonHazard(f"program {self.pid}: {message}")

    def check_read(self, part: "_Part", smem: "_Shared", what: str, async_proxy: bool = True):
        if async_proxy and any(w.overlaps(smem) for _, w in self.unfenced):
            raise self.hazard(f"{what} reads shared memory written from registers with no fence_async_shared since")
        for copy in self.copies:
            if part.index not in copy.waited and copy.target.overlaps(smem):
                raise self.hazard(f"{what} reads shared memory that a TMA copy (to {copy.coord}) fills, before "
                                  "this partition waited on its mbarrier")

    def check_write(self, smem: "_Shared", what: str):
        for part in self.parts:
            for token in part.mma_in_flight:
                if any(operand.overlaps(smem) for operand in token.operands):
                    raise self.hazard(f"{what} writes shared memory that a warpgroup MMA still in flight reads "
                                      "(retire it with warpgroup_mma_wait first)")
            if any(source.overlaps(smem) for source in part.stores_in_flight):
                raise self.hazard(f"{what} writes shared memory that a TMA store still in flight reads "
                                  "(tma.store_wait first)")
        for copy in self.copies:
            if not copy.waited and copy.target.overlaps(smem):
                raise self.hazard(f"{what} writes shared memory that a TMA copy (to {copy.coord}) is still filling")

    def finish(self):
        for part in self.parts:
            if part.mma_in_flight:
                raise self.hazard(f"ended with {len(part.mma_in_flight)} warpgroup MMA(s) in flight")
            if part.stores_in_flight:
                raise self.hazard("ended with TMA stores never waited on (tma.store_wait)")
        for copy in self.copies:
            if not copy.waited:
                raise self.hazard(f"ended with TMA copies never waited on (to {copy.coord})")


class _Part:
    """A partition of a program: its warps, and the asynchronous work its threads issued."""

    def __init__(self, program: _Program, index: int, num_warps: int):
        self.program, self.index, self.num_warps = program, index, num_warps
        self.mma_in_flight: List["_Token"] = []
        self.stores_in_flight: List["_Shared"] = []  # TMA stores' sources, oldest first
        self.blocked_on: Optional[Tuple["_Barrier", int]] = None  # (mbarrier, parity) it waits for
        self.done = False
        program.parts.append(self)

    @property
    def runnable(self) -> bool:
        return not self.done and (self.blocked_on is None or self.blocked_on[0].passes(self.blocked_on[1]))


_local = threading.local()


def _part() -> _Part:
    part = getattr(_local, "part", None)
    if part is None:
        raise RuntimeError("Gluon stand-ins are only usable inside stepfuse.testing.gluon.emulate")
    return part


def _program() -> _Program:
    return _part().program


# ---------------------------------------------------------------------------------------------
# global memory


class _Memory:
    """A kernel argument tensor: its storage as a flat tensor, which elements belong to it, and
    which of those a store has written."""

    def __init__(self, t: torch.Tensor):
        n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
        self.flat = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (n,), (1,))
        self.valid = torch.zeros(n, dtype=torch.bool)
        self.valid.as_strided(t.shape, t.stride()).fill_(True)
        self.written = torch.zeros(n, dtype=torch.bool)


class _Pointer:
    """A pointer (or a tensor of pointers): element offsets into a :class:`_Memory`."""

    def __init__(self, memory: _Memory, offset):
        self.memory, self.offset = memory, offset

    def __add__(self, other):
        if isinstance(other, _Pointer):
            raise TypeError("pointer + pointer")
        return _Pointer(self.memory, self.offset + other)

    __radd__ = __add__

    def offsets(self, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        offset = _tensor(self.offset).long()
        mask = torch.ones((), dtype=torch.bool) if mask is None else _tensor(mask).bool()
        offset, mask = torch.broadcast_tensors(offset, mask)
        inside = (offset >= 0) & (offset < self.memory.valid.numel())
        ok = inside & self.memory.valid[offset.clamp(0, self.memory.valid.numel() - 1)]
        if bool((mask & ~ok).any()):
            bad = offset[mask & ~ok].flatten()[0].item()
            raise _program().hazard(f"access at element offset {bad}, outside the tensor")
        return offset, mask


def _load(pointer: _Pointer, mask=None, other=None, **_):
    offset, mask = pointer.offsets(mask)
    values = pointer.memory.flat[offset.clamp(0, pointer.memory.flat.numel() - 1)]
    if other is None:
        other = 0
    return torch.where(mask, values, torch.as_tensor(other, dtype=values.dtype))


def _store(pointer: _Pointer, value, mask=None, **_):
    offset, mask = pointer.offsets(mask)
    value = torch.broadcast_to(_tensor(value), offset.shape)
    offset, value = offset[mask], value[mask]
    memory = pointer.memory
    if bool(memory.written[offset].any()) or offset.unique().numel() != offset.numel():
        raise _program().hazard("an output element is written twice")
    memory.written[offset] = True
    memory.flat[offset] = value.to(memory.flat.dtype)


# ---------------------------------------------------------------------------------------------
# shared memory, mbarriers, TMA, warpgroup MMA


class _Shared:
    """A shared-memory descriptor: a view of a buffer filled with NaN when allocated."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    @property
    def shape(self):
        return list(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    def overlaps(self, other: "_Shared") -> bool:
        if self.data.untyped_storage().data_ptr() != other.data.untyped_storage().data_ptr():
            return False
        (a0, a1), (b0, b1) = _span(self.data), _span(other.data)
        return a0 < b1 and b0 < a1

    def index(self, i):
        return _Shared(self.data[_int(i)])

    def reshape(self, shape):
        return _Shared(self.data.view([_int(n) for n in shape]))

    def permute(self, order):
        return _Shared(self.data.permute([_int(n) for n in order]))

    def load(self, layout=None):
        part = _part()
        part.program.check_read(part, self, "a shared-memory load", async_proxy=False)
        return self.data.clone()

    def store(self, value):
        part = _part()
        part.program.check_write(self, "a shared-memory store")
        self.data.copy_(value)
        part.program.unfenced.append((part, self))


class _Copy:
    """A TMA copy into ``target``, completing on ``barrier`` in phase ``phase``; ``waited`` holds
    the partitions that have since waited for that phase (to them the data is there)."""

    def __init__(self, target: _Shared, coord, barrier: "_Barrier", phase: int):
        self.target, self.coord, self.barrier, self.phase = target, coord, barrier, phase
        self.waited: set = set()


class _Barrier:
    """An mbarrier: expected arrivals, transaction bytes and completed phases."""

    def __init__(self, group: List["_Barrier"]):
        self.group = group
        self.count = None  # arrivals per phase; None until init
        self.pending = 0
        self.tx = 0
        self.completed = 0

    def index(self, i):
        return self.group[_int(i)]

    def _live(self, what: str):
        if self.count is None:
            raise _program().hazard(f"{what} on an mbarrier that is not initialised")

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count

    def passes(self, parity: int) -> bool:
        """Whether ``try_wait.parity(parity)`` returns: the phase of that parity has completed, i.e.
        the phase in progress has the other parity."""
        return self.completed & 1 != parity


class _MBarrierLayout:
    def __init__(self, *args, **kwargs):
        pass


def _allocate_shared_memory(dtype, shape, layout=None, value=None):
    shape = [_int(n) for n in shape]
    if isinstance(layout, _MBarrierLayout):
        group: List[_Barrier] = []
        group.extend(_Barrier(group) for _ in range(math.prod(shape)))
        return group[0]
    data = torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    if value is not None:
        data.copy_(value)
    return _Shared(data)


def _mbarrier_init(bar: _Barrier, count):
    bar.count = bar.pending = _int(count)
    bar.tx, bar.completed = 0, 0


def _mbarrier_invalidate(bar: _Barrier):
    bar._live("invalidate")
    if any(c.barrier is bar and not c.waited for c in _program().copies):
        raise _program().hazard("mbarrier invalidated with TMA copies never waited on")
    bar.count = None


def _mbarrier_expect(bar: _Barrier, bytes_per_cta=None, pred=True):
    bar._live("expect")
    if _bool(pred):
        bar.tx += _int(bytes_per_cta)
        _mbarrier_arrive(bar)


def _mbarrier_arrive(bar: _Barrier, *, count=1, pred=True):
    bar._live("arrive")
    if _bool(pred):
        bar.pending -= _int(count)
        if bar.pending < 0:
            raise _program().hazard("more arrivals on an mbarrier than its count")
        bar._maybe_complete()
        _Scheduler.signalled(bar)


def _mbarrier_wait(bar: _Barrier, phase, pred=True, deps=()):
    bar._live("wait")
    if not _bool(pred):
        return
    parity = _int(phase) & 1
    part = _part()
    if not bar.passes(parity):
        # only another partition can complete the phase (copies land at issue): hand over to it
        _Scheduler.block(part, bar, parity)
    for copy in part.program.copies:
        if copy.barrier is bar and copy.phase < bar.completed:
            copy.waited.add(part.index)


class _Descriptor:
    """A host ``TensorDescriptor`` as the kernel sees it."""

    class _BlockType:
        def __init__(self, shape, dtype):
            self.shape = shape
            self.nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def __init__(self, desc):
        self.tensor = desc.base.as_strided(desc.shape, desc.strides)
        self.dtype = desc.base.dtype
        self.layout = desc.layout
        self.shape = list(desc.shape)
        self.block_type = self._BlockType(list(desc.block_shape), self.dtype)

    def _window(self, coord):
        """(tensor slices, block slices) of the block at ``coord`` that lie inside the tensor; None if none do."""
        inside, block = [], []
        for c, b, n in zip(coord, self.block_type.shape, self.shape):
            lo, hi = max(c, 0), min(c + b, n)
            if lo >= hi:
                return None
            inside.append(slice(lo, hi))
            block.append(slice(lo - c, hi - c))
        return tuple(inside), tuple(block)

    def tile(self, coord) -> torch.Tensor:
        """The block at ``coord``: zeros where it lies outside the tensor (TMA's out-of-bounds fill)."""
        out = torch.zeros(self.block_type.shape, dtype=self.dtype)
        window = self._window(coord)
        if window is not None:
            out[window[1]] = self.tensor[window[0]]
        return out

    def write(self, coord, block: torch.Tensor) -> None:
        """Store ``block`` at ``coord``; what lies outside the tensor is dropped (TMA stores clip)."""
        window = self._window(coord)
        if window is not None:
            self.tensor[window[0]] = block[window[1]]


def _tma_load(desc: _Descriptor, coord, barrier: _Barrier, result: _Shared, pred=True, multicast=False):
    if not _bool(pred):
        return
    barrier._live("a TMA copy")
    program = _program()
    coord = [_int(c) for c in coord]
    if result.shape != desc.block_type.shape or result.dtype != desc.dtype:
        raise program.hazard(f"TMA copy of a {desc.block_type.shape} {desc.dtype} block into {result.shape} "
                             f"{result.dtype} shared memory")
    program.check_write(result, "a TMA copy")
    result.data.copy_(desc.tile(coord))
    program.copies = [c for c in program.copies if not c.target.overlaps(result)]  # their data is gone
    program.copies.append(_Copy(result, coord, barrier, barrier.completed))
    barrier.tx -= desc.block_type.nbytes
    barrier._maybe_complete()
    _Scheduler.signalled(barrier, arrival=False)


def _tma_store(desc: _Descriptor, coord, src: _Shared):
    part = _part()
    if src.shape != desc.block_type.shape or src.dtype != desc.dtype:
        raise part.program.hazard(f"TMA store of {src.shape} {src.dtype} shared memory as a {desc.block_type.shape} "
                                  f"{desc.dtype} block")
    part.program.check_read(part, src, "a TMA store")
    desc.write([_int(c) for c in coord], src.data)
    part.stores_in_flight.append(src)


def _tma_store_wait(pendings, read_only=True):
    part = _part()
    keep = _int(pendings)
    part.stores_in_flight = part.stores_in_flight[max(len(part.stores_in_flight) - keep, 0):] if keep else []


def _fence_async_shared(cluster=False):
    # orders this partition's own register writes before later async-proxy reads
    program, part = _program(), _part()
    program.unfenced = [(p, w) for p, w in program.unfenced if p is not part]


class _Token:
    """An asynchronous warpgroup MMA's result, readable after warpgroup_mma_wait retires it."""

    def __init__(self, value: torch.Tensor, operands: Sequence[_Shared]):
        self.value, self.operands, self.retired = value, list(operands), False


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    part = _part()
    program = part.program
    shared = [x for x in (a, b) if isinstance(x, _Shared)]
    if not isinstance(b, _Shared):
        raise program.hazard("warpgroup MMA's second operand must be in shared memory")
    if part.num_warps % 4:
        raise program.hazard(f"warpgroup MMA in a partition of {part.num_warps} warps (whole warpgroups needed)")
    for x in shared:
        program.check_read(part, x, "a warpgroup MMA")
    a_val = a.data if isinstance(a, _Shared) else a
    if isinstance(acc, _Token):
        acc = acc.value
    if a_val.dtype != b.dtype or a_val.dtype not in (torch.float16, torch.bfloat16) or acc.dtype != torch.float32:
        raise program.hazard(f"warpgroup MMA of {a_val.dtype} x {b.dtype} into {acc.dtype}")
    if a_val.shape[1] != b.data.shape[0] or tuple(acc.shape) != (a_val.shape[0], b.data.shape[1]):
        raise program.hazard(f"warpgroup MMA shapes {tuple(a_val.shape)} x {tuple(b.data.shape)} "
                             f"-> {tuple(acc.shape)}")
    value = a_val.float() @ b.data.float()  # never-written shared memory is NaN: garbage in, garbage out
    if _bool(use_acc):
        value = value + acc
    if not _bool(is_async):
        return value
    token = _Token(value, shared)
    part.mma_in_flight.append(token)
    return token


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise ValueError("warpgroup_mma_wait deps must be given")
    part = _part()
    program = part.program
    while len(part.mma_in_flight) > _int(num_outstanding):
        part.mma_in_flight.pop(0).retired = True
    results = []
    for d in deps:
        if isinstance(d, _Token):
            if not d.retired:
                raise program.hazard(f"an MMA result is read while the MMA may still be in "
                                  f"flight (warpgroup_mma_wait(num_outstanding={_int(num_outstanding)}) leaves it)")
            d = d.value
        results.append(d)
    return results[0] if len(results) == 1 else tuple(results)


# ---------------------------------------------------------------------------------------------
# warp specialisation: partitions as threads, one running at a time


class _Abort(Exception):
    """Ends a partition's thread when another partition has found a hazard."""


class _Scheduler:
    """Runs the partitions of a ``gl.warp_specialize`` region as threads, exactly one at a time,
    switching only where the outcome may depend on the order: when a partition waits for an
    mbarrier phase it cannot complete itself or ends (to the next runnable partition in turn), and
    after an arrival or a copy lands:

    * ``"lazy"``: never; each partition runs as far as it can (a producer fills every slot);
    * ``"eager"``: to the partition an arrival releases, at once, while landing copies switch
      nothing (a producer kept ahead refills a slot released too early while its reader is still
      in flight);
    * ``"random"``: to a random runnable partition, or not, seeded.

    No runnable partition while some have not ended is a deadlock."""

    def __init__(self, program: _Program, schedule: str, seed: int = 0):
        import random

        self.program, self.schedule = program, schedule
        self.random = random.Random(seed)
        self.cv = threading.Condition()
        self.active: Optional[_Part] = None
        self.error: Optional[BaseException] = None

    @staticmethod
    def block(part: _Part, bar: "_Barrier", parity: int) -> None:
        scheduler = part.program.scheduler
        if scheduler is None:
            raise part.program.hazard(f"mbarrier wait for phase parity {parity} never returns ({bar.completed} "
                                      "phases completed, the one in progress has that parity)")
        part.blocked_on = (bar, parity)
        scheduler._switch(part)
        part.blocked_on = None

    @staticmethod
    def signalled(bar: "_Barrier", arrival: bool = True) -> None:
        part = _part()
        scheduler = part.program.scheduler
        if scheduler is None or scheduler.schedule == "lazy":
            return
        if scheduler.schedule == "eager":
            if not arrival:  # copies take their time: the producer stays ahead
                return
            woken = [p for p in scheduler.program.parts if p is not part and p.runnable and p.blocked_on is not None
                     and p.blocked_on[0] is bar]
            if woken:
                scheduler._switch(part, woken[0])
        else:
            others = [p for p in scheduler.program.parts if p is not part and p.runnable]
            if others and scheduler.random.random() < 0.5:
                scheduler._switch(part, scheduler.random.choice(others))

    def _next(self, part: _Part) -> Optional[_Part]:
        parts = self.program.parts
        if self.schedule == "random":
            runnable = [p for p in parts if p.runnable]
            return self.random.choice(runnable) if runnable else None
        start = parts.index(part)
        for step in range(1, len(parts) + 1):
            other = parts[(start + step) % len(parts)]
            if other.runnable:
                return other
        return None

    def _deadlock(self) -> GluonHazard:
        waits = [f"partition {p.index} waits for parity {p.blocked_on[1]} ({p.blocked_on[0].completed} phases "
                 "completed)" for p in self.program.parts if not p.done]
        return self.program.hazard("deadlock: " + "; ".join(waits))

    def _switch(self, part: _Part, nxt: Optional[_Part] = None) -> None:
        with self.cv:
            nxt = nxt or self._next(part)
            if nxt is part:
                return
            if nxt is None:
                self.error = self._deadlock()
                self.cv.notify_all()
                raise self.error
            self.active = nxt
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.active is part or self.error is not None)
            if self.error is not None:
                raise _Abort()

    def _run(self, part: _Part, fn, args, results: dict) -> None:
        _local.part = part
        with self.cv:
            self.cv.wait_for(lambda: self.active is part or self.error is not None)
        try:
            if self.error is None:
                results[part.index] = fn(*args)
                if part.mma_in_flight or part.stores_in_flight:
                    raise part.program.hazard(f"partition {part.index} ended with asynchronous work in flight")
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the thread that called warp_specialize
            with self.cv:
                self.error = self.error or e
        finally:
            with self.cv:
                part.done = True
                if self.error is None:
                    nxt = self._next(part)
                    if nxt is None and not all(p.done for p in self.program.parts):
                        self.error = self._deadlock()
                    self.active = nxt
                self.cv.notify_all()

    def run(self, partitions) -> dict:
        results: dict = {}
        threads = [threading.Thread(target=self._run, args=(part, fn, args, results), daemon=True)
                   for part, fn, args in partitions]
        for t in threads:
            t.start()
        with self.cv:
            self.active = partitions[0][0]
            self.cv.notify_all()
            self.cv.wait_for(lambda: all(part.done for part, _, _ in partitions))
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return results


def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs=None):
    default = _part()
    program = default.program
    if program.scheduler is not None:
        raise program.hazard("warp_specialize inside a warp-specialised region")
    functions_and_args = list(functions_and_args)
    if len(worker_num_warps) != len(functions_and_args) - 1:
        raise program.hazard("warp_specialize: one warp count per worker partition")
    parts = [default] + [_Part(program, i + 1, _int(w)) for i, w in enumerate(worker_num_warps)]
    program.scheduler = _Scheduler(program, program.schedule, hash(program.pid) + program.seed)
    try:
        results = program.scheduler.run([(part, _callable(fn), tuple(args))
                                         for part, (fn, args) in zip(parts, functions_and_args)])
    finally:
        program.scheduler = None
        _local.part = default
    default.done = False
    return results.get(0)


# ---------------------------------------------------------------------------------------------
# the gl namespace


class _Layout:
    """Any distributed or shared layout: registers and shared memory carry no layout here."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _static_assert(cond, msg=""):
    if not _bool(cond):
        raise AssertionError(msg)


def _binary(fn):
    return lambda a, b, *args, **kwargs: fn(_tensor(a), _tensor(b))


def _reduce(fn):
    def reduce(x, axis=None, keep_dims=False, **_):
        return fn(x) if axis is None else fn(x, dim=_int(axis), keepdim=keep_dims)
    return reduce


_gl = types.SimpleNamespace(
    constexpr=lambda x=None: x,
    float16=torch.float16, bfloat16=torch.bfloat16, float32=torch.float32, float64=torch.float64,
    int8=torch.int8, int16=torch.int16, int32=torch.int32, int64=torch.int64,
    NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout, SliceLayout=_Layout, BlockedLayout=_Layout,
    NVMMASharedLayout=_Layout, SwizzledSharedLayout=_Layout,
    program_id=lambda axis: _program().pid[_int(axis)],
    num_programs=lambda axis: _program().grid[_int(axis)],
    num_warps=lambda: _part().num_warps,
    static_range=lambda *args: range(*(_int(a) for a in args)),
    static_assert=_static_assert,
    arange=lambda start, end, layout=None: torch.arange(_int(start), _int(end), dtype=torch.int32),
    zeros=lambda shape, dtype, layout=None: torch.zeros([_int(n) for n in shape], dtype=dtype),
    full=lambda shape, value, dtype, layout=None: torch.full([_int(n) for n in shape], value, dtype=dtype),
    convert_layout=lambda x, layout, assert_trivial=False: x,
    where=lambda c, a, b: torch.where(_tensor(c).bool(), a, b),
    maximum=_binary(torch.maximum), minimum=_binary(torch.minimum),
    max=_reduce(torch.amax), min=_reduce(torch.amin), sum=_reduce(torch.sum),
    exp=torch.exp, exp2=torch.exp2, log=torch.log, log2=torch.log2, sqrt=torch.sqrt, abs=torch.abs,
    cdiv=lambda a, b: -(-a // b),
    load=_load, store=_store,
    allocate_shared_memory=_allocate_shared_memory,
    warp_specialize=_warp_specialize,
)
_mbarrier = types.SimpleNamespace(MBarrierLayout=_MBarrierLayout, init=_mbarrier_init, invalidate=_mbarrier_invalidate,
                                  expect=_mbarrier_expect, arrive=_mbarrier_arrive, wait=_mbarrier_wait)
_tma = types.SimpleNamespace(async_copy_global_to_shared=_tma_load, async_load=_tma_load,
                             async_copy_shared_to_global=_tma_store, async_store=_tma_store, store_wait=_tma_store_wait)


def _stand_ins() -> Dict[int, Any]:
    """id(real Gluon object) -> its stand-in."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper

    return {id(gl): _gl, id(hopper.mbarrier): _mbarrier, id(hopper.tma): _tma,
            id(hopper.warpgroup_mma): _warpgroup_mma, id(hopper.warpgroup_mma_wait): _warpgroup_mma_wait,
            id(hopper.fence_async_shared): _fence_async_shared}


def _emulated(fn, cache: Dict[int, Any]):
    """The Python function of Gluon JIT function ``fn``, its globals swapped for the stand-ins."""
    from triton.experimental.gluon._runtime import GluonJITFunction

    if id(fn) in cache:
        return cache[id(fn)]
    py = getattr(fn, "fn", fn)  # a JIT function's Python function, or a plain one
    scope = dict(py.__globals__)
    clone = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
    cache[id(fn)] = clone
    for name in py.__code__.co_names:
        value = scope.get(name)
        if id(value) in cache:
            scope[name] = cache[id(value)]
        elif isinstance(value, GluonJITFunction):
            scope[name] = _emulated(value, cache)
    return clone


def _callable(fn):
    """A partition function as the emulated kernel holds it: already emulated, or a JIT function."""
    from triton.experimental.gluon._runtime import GluonJITFunction

    return _emulated(fn, _stand_ins()) if isinstance(fn, GluonJITFunction) else fn


def _argument(x, memories: Dict[int, _Memory]):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if isinstance(x, TensorDescriptor):
        return _Descriptor(x)
    if isinstance(x, torch.Tensor):
        key = x.untyped_storage().data_ptr()
        memory = memories.get(key)
        if memory is None or memory.flat.dtype != x.dtype:
            memory = memories[key] = _Memory(x)
        offset = x.storage_offset() - memory.flat.storage_offset()
        return _Pointer(memory, offset)
    return x


def emulate(kernel, grid: Sequence[int], args: Sequence[Any], meta: Dict[str, Any], schedule: str = "lazy",
            seed: int = 0) -> None:
    """Run Gluon JIT function ``kernel`` over ``grid`` (up to three ints) on CPU tensors: ``args``
    as the kernel takes them (host ``TensorDescriptor``\\ s, tensors, scalars), ``meta`` the
    constexpr arguments plus ``num_warps``.  Programs run one after another; raises
    :class:`GluonHazard` on the first hazard found.  ``schedule`` (``"lazy"``, ``"eager"`` or
    ``"random"`` with ``seed``) orders the partitions of a warp-specialised region (see
    :class:`_Scheduler`); hazards that depend on the order show under some schedules only."""
    if schedule not in ("lazy", "eager", "random"):
        raise ValueError(f"emulate: schedule must be 'lazy', 'eager' or 'random', got {schedule!r}")
    meta = dict(meta)
    num_warps = meta.pop("num_warps", 4)
    meta.pop("num_stages", None)
    fn = _emulated(kernel, _stand_ins())
    memories: Dict[int, _Memory] = {}
    args = [_argument(a, memories) for a in args]
    grid = list(grid) + [1] * (3 - len(grid))
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                program = _Program((x, y, z), tuple(grid), schedule, seed)
                _local.part = _Part(program, 0, num_warps)
                try:
                    fn(*args, **meta)
                    program.finish()
                finally:
                    _local.part = None


def launcher(kernel, grid3, key, args, meta, schedule: str = "lazy", seed: int = 0) -> None:
    """Drop-in for :func:`stepfuse.attention.triton_kernel.launch_compiled` that emulates."""
    emulate(kernel, grid3, args, meta, schedule, seed)

