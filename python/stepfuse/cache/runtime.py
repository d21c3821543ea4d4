"""The cache runtimes: forward wrappers on a model and its blocks that run a policy.

One model call is one step of one CFG branch.  The model's ``forward`` wrapper picks the
branch's state (a separate cache per branch: the name set by :func:`branch` or by diffusers'
``cache_context``), counts its steps and resets it when a new run starts; each block's wrapper
then either runs the block, or, inside the cached span, runs the whole span itself (compute) or
replaces it by the cached residual / Taylor forecast (reuse), after which the remaining span
blocks pass their inputs through.  The data-dependent decisions use the fused ops
(``stepfuse.ops.cache``): one pass for the metric, one tiny kernel for the decision.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .adapters import BlockStack, UNetBlocks
from .policies import (CachePolicy, DeepCache, DualBlockCache, MagCache, StaticCache, TaylorSeer, TeaCache)

__all__ = ["branch", "CacheStats", "BlockCacheRuntime", "DeepCacheRuntime", "attach_context", "detach_context"]

_eager = torch.compiler.disable

_BRANCH: contextvars.ContextVar = contextvars.ContextVar("stepfuse_cache_branch", default=None)


@contextlib.contextmanager
def branch(name: str, step: Optional[int] = None):
    """Model calls inside this context use the cache of CFG branch ``name`` (e.g. "cond");
    ``step`` is the denoising step's index in the run (else the branch counts its calls)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"stepfuse.cache.branch: name must be a non-empty str, got {name!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"stepfuse.cache.branch: step must be None or an int >= 0, got {step!r}")
    token = _BRANCH.set((name, step))
    try:
        yield
    finally:
        _BRANCH.reset(token)


def _ops():
    from ..ops import cache as ops  # the compiled ops load on first use

    return ops


@dataclass
class CacheStats:
    """What a cache did since it was installed or last reset with :func:`stepfuse.cache.stats`.

    ``blocks_evaluated`` / ``blocks_skipped`` count block forwards run and avoided;
    ``steps_cached`` the model calls that reused anything (``decisions``: per call, in order, as
    ``(branch, step, reused)``); ``memory_bytes`` what the caches hold now, ``peak_memory_bytes``
    the most they held.
    """

    calls: int = 0
    steps_cached: int = 0
    blocks_evaluated: int = 0
    blocks_skipped: int = 0
    memory_bytes: int = 0
    peak_memory_bytes: int = 0
    decisions: List[Tuple[str, int, bool]] = field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        total = self.blocks_evaluated + self.blocks_skipped
        return self.blocks_skipped / total if total else 0.0


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Parked:
    """A cached tensor, kept on its device or (``offload``) in pinned host memory."""

    __slots__ = ("tensor", "device")

    def __init__(self, tensor: torch.Tensor, offload: bool):
        self.device = tensor.device
        if offload and tensor.device.type != "cpu":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(tensor, non_blocking=True)
            tensor = host
        self.tensor = tensor

    def get(self) -> torch.Tensor:
        return self.tensor.to(self.device, non_blocking=True)


class _Runtime:
    """Shared plumbing: wrapping forwards, branch states, step counting, stats and memory."""

    def __init__(self, model: torch.nn.Module, policy: CachePolicy, num_inference_steps: Optional[int]):
        self.model = model
        self.policy = policy
        self.num_inference_steps = num_inference_steps
        self.branches: Dict[str, "_BranchState"] = {}
        self.stats = CacheStats()
        self.context = None  # diffusers' CacheContext, set through cache_context()
        self.call: Optional[_Call] = None
        self._wrapped: List[Tuple[torch.nn.Module, object]] = []
        self._pending: List[Tuple[int, torch.Tensor]] = []  # device-side decisions not yet read
        self.cached_span = 0  # blocks a reused call skips

    def resolve(self) -> CacheStats:
        """The stats with every device-side decision read (one sync, when asked)."""
        for index, flag in self._pending:
            key, step, _ = self.stats.decisions[index]
            reused = bool(flag)
            self.stats.decisions[index] = (key, step, reused)
            self.stats.steps_cached += int(reused)
            self.stats.blocks_skipped += self.cached_span * reused
            self.stats.blocks_evaluated += self.cached_span * (not reused)
        self._pending.clear()
        return self.stats

    # -- installation ------------------------------------------------------------------------
    def _wrap(self, module: torch.nn.Module, make: Callable[[Callable], Callable]) -> None:
        previous = module.__dict__.get("forward")
        module.forward = make(module.forward)
        self._wrapped.append((module, previous))

    def install(self) -> None:
        self._wrap(self.model, self._model_forward)

    def uninstall(self) -> None:
        for module, previous in reversed(self._wrapped):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._wrapped.clear()
        self.release()

    # -- steps and branches ------------------------------------------------------------------
    def _branch(self) -> Tuple[str, Optional[int]]:
        """The call's branch name and step index: stepfuse.cache.branch(), else diffusers' cache_context."""
        name, step = _BRANCH.get() or (None, None)
        if name is None and self.context is not None:
            name, step = getattr(self.context, "name", None), getattr(self.context, "step_index", None)
        if not self.policy.per_branch:  # one shared cache: the calls themselves are the steps
            return "default", None
        return name or "default", step

    def steps(self) -> Optional[int]:
        ctx_steps = getattr(self.context, "num_inference_steps", None)
        return ctx_steps if ctx_steps else self.num_inference_steps

    def _model_forward(self, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            if self.call is not None:  # re-entrant call (a block calling the model): run as is
                return original(*args, **kwargs)
            key, state = self._enter()
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(key, state)

        return forward

    # The cache's bookkeeping is plain Python on host state: under torch.compile it runs eagerly
    # between the compiled regions (the blocks), so every call sees and updates the real state.
    @_eager
    def _enter(self):
        key, ctx_index = self._branch()
        state = self.branches.get(key)
        total = self.steps()
        if state is None or (total is not None and state.step >= total) or \
                (ctx_index is not None and ctx_index < state.step):
            state = self.branches[key] = _BranchState()
        if ctx_index is not None:
            state.step = int(ctx_index)
        self.call = self._begin(state, total)
        return key, state

    @_eager
    def _exit(self, key: str, state: "_BranchState") -> None:
        call, self.call = self.call, None
        if call.plan == "cond":  # decided on the device: counted when stats are read
            self._pending.append((len(self.stats.decisions), call.flag))
        self.stats.decisions.append((key, state.step, None if call.plan == "cond" else call.reused))
        self._finish(state, call)

    def _begin(self, state: "_BranchState", total: Optional[int]) -> "_Call":
        raise NotImplementedError

    def _finish(self, state: "_BranchState", call: "_Call") -> None:
        state.step += 1
        self.stats.calls += 1
        self.stats.steps_cached += int(call.reused)
        self.stats.blocks_evaluated += call.evaluated
        self.stats.blocks_skipped += call.skipped
        held = self.memory_bytes()
        self.stats.memory_bytes = held
        self.stats.peak_memory_bytes = max(self.stats.peak_memory_bytes, held)

    def memory_bytes(self) -> int:
        return sum(s.nbytes() for s in self.branches.values())

    def release(self) -> None:
        """Drop every cached tensor (the end of a pipeline call)."""
        self.branches.clear()
        self.stats.memory_bytes = 0

    def _need_steps(self, total: Optional[int], what: str) -> int:
        if total is None:
            raise ValueError(f"stepfuse.cache: {type(self.policy).__name__} needs the run's step count for {what}: "
                             "pass num_inference_steps to stepfuse.cache.apply (or use stepfuse.accelerate)")
        return total


@dataclass
class _BranchState:
    step: int = 0
    decide: Optional[torch.Tensor] = None  # float64 [4] device state of cache_decide
    previous: Optional[torch.Tensor] = None  # front residual at the last full step / last indicator
    scratch: Optional[torch.Tensor] = None
    residual: List[Optional[_Parked]] = field(default_factory=lambda: [None, None])  # hidden, encoder
    factors: List[Optional[_Parked]] = field(default_factory=lambda: [None, None])  # Taylor factors
    valid: int = 0  # Taylor factor slots holding data
    last_full: int = -1
    mag: Tuple[float, float, int] = (1.0, 0.0, 0)  # MagCache: accumulated ratio, error, skipped steps
    deep: Optional[_Parked] = None  # DeepCache feature
    deep_input: Optional[torch.Size] = None  # the UNet input shape the feature belongs to
    encoder_out: bool = True  # the span returns encoder states (SD3's last block does not)

    def nbytes(self) -> int:
        parked = [p.tensor for p in (*self.residual, *self.factors, self.deep) if p is not None]
        return _nbytes([self.decide, self.previous, self.scratch, *parked])

    @property
    def has_cache(self) -> bool:
        return self.residual[0] is not None or self.factors[0] is not None or self.deep is not None


@dataclass
class _Call:
    state: _BranchState
    plan: str  # "full", "reuse", "decide" (made inside the call), then "cond" when the flag stays on the device
    total: Optional[int]
    reused: bool = False
    evaluated: int = 0
    skipped: int = 0
    front_input: Optional[torch.Tensor] = None
    running_span: bool = False
    flag: Optional[torch.Tensor] = None  # the device-side decision (decision="device")


class BlockCacheRuntime(_Runtime):
    """Block caches over a transformer's block stack: dual-block / first-block, TeaCache,
    MagCache, TaylorSeer and static masks (``front | span | back``)."""

    def __init__(self, model, policy, stack: BlockStack, num_inference_steps=None):
        super().__init__(model, policy, num_inference_steps)
        self.stack = stack
        n = len(stack)
        self.front, self.back = int(policy.front_blocks), int(policy.back_blocks)
        if self.front + self.back >= n:
            raise ValueError(f"stepfuse.cache: front_blocks ({self.front}) + back_blocks ({self.back}) must be "
                             f"smaller than the number of blocks of {stack.model_name} ({n})")
        self.span = (self.front, n - self.back)
        self.cached_span = self.span[1] - self.span[0]
        self.taylor = policy if isinstance(policy, TaylorSeer) else getattr(policy, "taylorseer", None)
        if isinstance(policy, TaylorSeer) and policy.order == 0:
            self.taylor = None
        if policy.decision == "device" and (self.taylor is not None or policy.offload):
            raise ValueError(f"stepfuse.cache: decision='device' supports residual reuse only, not "
                             f"{'taylorseer' if self.taylor is not None else 'offload'} (use decision='host')")

    def _on_device(self, tensor: torch.Tensor) -> bool:
        """Whether the skip flag stays on the device rather than being read: always with
        ``decision="device"``, and with "auto" while a CUDA graph is being captured."""
        mode = self.policy.decision
        if mode != "auto" or self.taylor is not None or self.policy.offload:
            return mode == "device"
        return tensor.is_cuda and torch.cuda.is_current_stream_capturing()

    def install(self) -> None:
        super().install()
        self._originals = [block.forward for block in self.stack.blocks]
        for index, block in enumerate(self.stack.blocks):
            self._wrap(block, lambda original, index=index: self._block_forward(index, original))

    # -- the per-call plan (host-known decisions) ----------------------------------------------
    def _begin(self, state, total) -> _Call:
        policy, step = self.policy, state.step
        if step < policy.warmup_steps or not state.has_cache:
            plan = "full"
        elif isinstance(policy, (DualBlockCache, TeaCache)):
            plan = "decide"
        elif isinstance(policy, StaticCache):
            plan = "full" if policy.step_mask(self._need_steps(total, "its step mask"))[step] else "reuse"
        elif isinstance(policy, MagCache):
            plan = self._magcache_plan(state, self._need_steps(total, "its calibrated ratios"))
        else:  # TaylorSeer alone: full every `interval` steps, forecasts between
            last = total is not None and step == total - 1
            plan = "full" if last or (step - policy.warmup_steps) % policy.interval == 0 else "reuse"
        if plan != "decide" and isinstance(policy, MagCache) is False:
            state.mag = (1.0, 0.0, 0)
        return _Call(state, plan, total)

    def _magcache_plan(self, state: _BranchState, total: int) -> str:
        # MagCache (Ma et al. 2025), Alg. 1: accumulate the calibrated ratio and its error while
        # both the error budget and the consecutive-skip cap hold; recompute and reset otherwise.
        policy = self.policy
        if state.step < int(policy.retention_ratio * total + 0.5) or state.step >= total - 1:
            state.mag = (1.0, 0.0, 0)
            return "full"
        ratio = _resample(policy.mag_ratios, total)[state.step]
        acc_ratio, acc_err, skipped = state.mag
        acc_ratio *= ratio
        acc_err += abs(1.0 - acc_ratio)
        if acc_err <= policy.threshold and skipped + 1 <= policy.max_skip_steps:
            state.mag = (acc_ratio, acc_err, skipped + 1)
            return "reuse"
        state.mag = (1.0, 0.0, 0)
        return "full"

    # -- blocks ------------------------------------------------------------------------------
    def _block_forward(self, index: int, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            call = self.call
            if call is None or call.running_span:
                return original(*args, **kwargs)
            start, end = self.span
            io = self.stack.io[index]
            if index < start or index >= end:
                if index == 0 and call.plan != "reuse" and isinstance(self.policy, DualBlockCache):
                    call.front_input = io.read(args, kwargs)[0]
                call.evaluated += 1
                out = original(*args, **kwargs)
                if index == start - 1 and call.front_input is not None:
                    self._decide_front(call, io.unpack(out)[0])
                return out
            hidden, encoder = io.read(args, kwargs)
            if index != start:  # inside the span after its first block: already handled
                return io.pack(hidden, encoder)
            if isinstance(self.policy, TeaCache):
                # TeaCache compares consecutive steps' indicators: this one is kept whatever happens.
                indicator = self.stack.indicator(self.stack.blocks[0], args, kwargs, hidden)
                if call.plan == "decide":
                    self._decide(call, indicator, keep_reference=True)
                else:
                    call.state.previous = indicator
            if call.plan == "reuse" and not self._fits(call.state, hidden, encoder):
                call.plan = "full"  # a new batch or resolution under the same branch name
            if call.plan == "reuse":
                call.reused = True
                call.skipped += end - start
                hidden, encoder = self._reuse(call.state, hidden, encoder)
            elif call.plan == "cond":
                hidden, encoder = self._cond_span(call, args, kwargs, hidden, encoder)
            else:
                hidden, encoder = self._compute_span(call, args, kwargs, hidden, encoder)
            return io.pack(hidden, encoder)

        return forward

    def _fits(self, state: _BranchState, hidden, encoder) -> bool:
        cached = state.factors if self.taylor is not None else state.residual
        for slot, x in enumerate((hidden, encoder if state.encoder_out else None)):
            p = cached[slot]
            if (p is None) != (x is None) or (p is not None and p.tensor.shape[-x.dim():] != x.shape):
                return False
        return True

    def _run_span(self, call: _Call, args, kwargs, hidden, encoder):
        # The span's blocks through their modules (other libraries' hooks on them still run);
        # their own cache wrappers pass straight through while ``running_span`` is set.
        with self._span_running(call):
            return self._span_blocks(args, kwargs, hidden, encoder)

    def _span_blocks(self, args, kwargs, hidden, encoder, direct: bool = False):
        # ``direct``: the blocks' own forwards, bypassing every wrapper (inside torch.cond, whose
        # branches must not depend on host state such as ``running_span``).
        for j in range(*self.span):
            io = self.stack.io[j]
            a, k = io.write(args, kwargs, hidden, encoder)
            block = self._originals[j] if direct else self.stack.blocks[j]
            hidden, encoder = io.unpack(block(*a, **k))
        return hidden, encoder

    @staticmethod
    @contextlib.contextmanager
    def _span_running(call: _Call):
        call.running_span = True
        try:
            yield
        finally:
            call.running_span = False

    def _compute_span(self, call: _Call, args, kwargs, hidden, encoder):
        outputs = self._run_span(call, args, kwargs, hidden, encoder)
        call.evaluated += self.span[1] - self.span[0]
        self._store(call.state, outputs, (hidden, encoder))
        return outputs

    @_eager  # under torch.compile the branch runs between compiled regions, like the bookkeeping
    def _cond_span(self, call: _Call, args, kwargs, hidden, encoder):
        """Compute or reuse the span on the device's flag with ``torch.cond`` (no host sync): CUDA
        graph conditional nodes when captured, one graph with both branches under torch.compile.
        Both branches are functional; the new residual is copied into the persistent buffer."""
        state = call.state
        slots = [i for i, x in enumerate((hidden, encoder if state.encoder_out else None)) if x is not None]
        inputs = [(hidden, encoder)[i] for i in slots]
        buffers = [state.residual[i].tensor for i in slots]
        n = len(slots)

        def reuse(*operands):
            xs, rs = operands[:n], operands[n:]
            # Both branches return contiguous tensors: torch.cond needs the same layout from each.
            return tuple((x + r).contiguous() for x, r in zip(xs, rs)) + tuple(r.clone() for r in rs)

        def compute(*operands):
            xs, full = operands[:n], [hidden, encoder]
            for i, x in zip(slots, xs):
                full[i] = x
            outs = self._span_blocks(args, kwargs, *full, direct=True)  # no side effects inside torch.cond
            outs = [outs[i] for i in slots]
            return tuple(o.contiguous() for o in outs) + tuple((o - x).contiguous() for o, x in zip(outs, xs))

        with self._span_running(call):
            results = _branch_on_device(call.flag, reuse, compute, tuple(inputs + buffers))
        for buffer, residual in zip(buffers, results[n:]):
            buffer.copy_(residual)
        outs = [None, None]
        for i, out in zip(slots, results[:n]):
            outs[i] = out
        return outs[0], outs[1]

    @_eager
    def _store(self, state: _BranchState, outputs, inputs) -> None:
        ops, offload = _ops(), self.policy.offload
        step = state.step
        state.encoder_out = outputs[1] is not None
        for slot, (out, inp) in enumerate(zip(outputs, inputs)):
            if out is None or inp is None:
                state.residual[slot] = state.factors[slot] = None
                continue
            held = state.residual[slot]
            reusable = held is not None and not offload and held.tensor.shape == out.shape \
                and held.tensor.dtype == out.dtype
            residual = held.tensor if reusable else torch.empty_like(out)
            ops.residual_store(out, inp, residual)
            if self.taylor is not None:
                parked = state.factors[slot]
                if parked is not None and parked.tensor.shape[1:] != out.shape:
                    parked, state.valid = None, 0  # a new batch or resolution: start the expansion anew
                factors = parked.get() if parked is not None else \
                    torch.zeros((self.taylor.order + 1, *out.shape), dtype=torch.float32, device=out.device)
                dt = float(step - state.last_full) if state.valid else 1.0
                ops.taylor_update(residual, factors, dt, state.valid)
                state.factors[slot] = _Parked(factors, offload)
            else:
                state.residual[slot] = _Parked(residual, offload)
        if self.taylor is not None:
            state.valid = min(state.valid + 1, self.taylor.order + 1)
        state.last_full = step

    @_eager
    def _reuse(self, state: _BranchState, hidden, encoder):
        ops = _ops()
        out = []
        for slot, x in enumerate((hidden, encoder if state.encoder_out else None)):
            if x is None:
                out.append(None)
                continue
            # In the known transformers the span's input is an intermediate nobody reads after the
            # span, so it is updated in place (one pass); elsewhere it may be the caller's tensor.
            y = x if self.stack.inplace and not torch.is_grad_enabled() else x.clone()
            if self.taylor is not None and state.factors[slot] is not None:
                ops.taylor_predict(state.factors[slot].get(), float(state.step - state.last_full), state.valid,
                                   out=y, accumulate=True)
            elif state.residual[slot] is not None:
                ops.residual_apply(y, state.residual[slot].get())
            out.append(y)
        return out[0], out[1]

    # -- data-dependent decisions --------------------------------------------------------------
    @_eager
    def _decide_front(self, call: _Call, front_output: torch.Tensor) -> None:
        # First-/dual-block cache: the front span's residual against the one stored at the last
        # full step (so slow drift accumulates until it crosses the threshold).
        state, ops = call.state, _ops()
        if state.scratch is None or state.scratch.shape != front_output.shape:
            state.scratch = torch.empty_like(front_output)
        ops.residual_store(front_output, call.front_input, state.scratch)
        call.front_input = None
        if call.plan == "decide":
            self._decide(call, state.scratch, keep_reference=False)
        if call.plan == "full":
            state.previous, state.scratch = state.scratch, state.previous
        elif call.plan == "cond":  # the reference moves only when the span is computed
            state.previous.copy_(torch.where(call.flag, state.previous, state.scratch))

    @_eager
    def _decide(self, call: _Call, current: torch.Tensor, keep_reference: bool) -> None:
        state, policy, ops = call.state, self.policy, _ops()
        last = call.total is not None and state.step >= call.total - 1
        previous = state.previous
        if previous is None or previous.shape != current.shape:
            call.plan = "full"
        else:
            if state.decide is None:
                state.decide = torch.zeros(4, dtype=torch.float64, device=current.device)
            sums = ops.cache_distance(current, previous, policy.stride)
            sums = _all_reduce(sums, policy)
            teacache = isinstance(policy, TeaCache)
            flag = ops.cache_decide(sums, state.decide, policy.coefficients if teacache else (), policy.threshold,
                                    accumulate=teacache, pooled=policy.batch_decision == "mean",
                                    max_consecutive=policy.max_consecutive_cached,
                                    max_cached=policy.max_cached_steps, force=last)
            if self._on_device(current):
                call.plan, call.flag = "cond", flag
            elif current.is_cuda and torch.cuda.is_current_stream_capturing():
                raise ValueError(f"stepfuse.cache: {type(policy).__name__}(decision={policy.decision!r}"
                                 + (", taylorseer/offload" if policy.decision == "auto" else "")
                                 + ") reads its decision on the host and cannot be captured in a CUDA graph; "
                                 "use decision='auto' without taylorseer/offload")
            else:
                call.plan = "reuse" if bool(flag) else "full"  # one 1-byte device-to-host copy
        if keep_reference:
            state.previous = current


def _branch_on_device(flag: torch.Tensor, true_fn: Callable, false_fn: Callable, operands: tuple):
    """``true_fn(*operands) if flag else false_fn(*operands)`` without reading ``flag``.

    While a CUDA graph is captured, each branch is recorded into a conditional node (an "if" node
    on ``flag`` and one on its negation; the second branch's outputs are copied into the first's,
    so the graph after the node reads fixed buffers); otherwise ``torch.cond``.
    """
    if not (flag.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.cond(flag, true_fn, false_fn, operands)
    graph_type = torch.cuda.CUDAGraph
    if not (hasattr(graph_type, "get_currently_capturing_graph") and hasattr(graph_type, "begin_capture_to_if_node")):
        raise RuntimeError("stepfuse.cache: capturing a data-dependent cache decision needs CUDA graph conditional "
                           f"nodes, which torch {torch.__version__} lacks; use StaticCache/MagCache/TaylorSeer "
                           "(decided on the host) in captured loops")
    graph = graph_type.get_currently_capturing_graph()
    outputs = None
    for predicate, fn in ((flag, true_fn), (torch.logical_not(flag), false_fn)):
        graph.begin_capture_to_if_node(predicate)
        try:
            result = fn(*operands)
            if outputs is None:
                outputs = result
            else:
                for kept, other in zip(outputs, result):
                    kept.copy_(other)
        finally:
            graph.end_capture_to_conditional_node()
    return outputs


def _all_reduce(sums: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """The decision's sums reduced over the ranks (one all-reduce), so every rank decides alike.

    Sequence parallelism: each rank holds a shard of the same samples, so the per-sample partial
    sums add up to the unsharded ones.  Data parallelism: ranks hold different samples (and
    possibly different counts): "mean" pools ``[sum |a-b|, sum |b|]`` over every sample, "all"
    takes the largest per-sample relative change anywhere (as a single ``[rel, 1]`` row).
    """
    dist = torch.distributed
    if not policy.distributed or not dist.is_available() or not dist.is_initialized():
        return sums
    group = policy.process_group
    if dist.get_world_size(group) == 1:
        return sums
    if policy.parallel == "sequence":
        dist.all_reduce(sums, group=group)
        return sums
    if getattr(policy, "batch_decision", "mean") == "mean":
        pooled = sums.sum(dim=0, keepdim=True)
        dist.all_reduce(pooled, group=group)
        return pooled
    worst = (sums[:, 0] / sums[:, 1].clamp_min(1e-30)).max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return torch.stack([worst, torch.ones_like(worst)], dim=1)


def _resample(values, total: int) -> np.ndarray:
    """Calibrated per-step values resampled to ``total`` steps, linearly in the step fraction."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == total:
        return values
    return np.interp(np.linspace(0.0, 1.0, total), np.linspace(0.0, 1.0, len(values)), values)


class DeepCacheRuntime(_Runtime):
    """DeepCache on a diffusers UNet: at cached steps only ``down_blocks[:branch+1]`` and
    ``up_blocks[-(branch+1):]`` run; the feature entering ``up_blocks[-(branch+1)]`` is reused."""

    def __init__(self, model, policy: DeepCache, blocks: UNetBlocks, num_inference_steps=None):
        super().__init__(model, policy, num_inference_steps)
        self.blocks = blocks
        n = len(blocks.down)
        if policy.branch >= n - 1:
            raise ValueError(f"stepfuse.cache: DeepCache branch must be smaller than {n - 1} (the number of up "
                             f"blocks of {blocks.model_name} minus one), got {policy.branch}")
        for up in blocks.up:
            if hasattr(up, "skip_conv"):
                raise ValueError(f"stepfuse.cache: DeepCache does not support {type(up).__name__} (skip connections "
                                 "to the output)")
        self.keep = policy.branch + 1  # shallow blocks that run at cached steps
        self.total_blocks = 2 * n + (blocks.mid is not None)

    def install(self) -> None:
        super().install()
        n = len(self.blocks.down)
        for i, block in enumerate(self.blocks.down):
            self._wrap(block, lambda original, i=i: self._down(i, original))
        if self.blocks.mid is not None:
            self._wrap(self.blocks.mid, self._mid)
        for j, block in enumerate(self.blocks.up):
            self._wrap(block, lambda original, j=j: self._up(j, n, original))

    def _begin(self, state, total) -> _Call:
        if state.step < self.policy.warmup_steps or not state.has_cache:
            plan = "full"
        else:
            cooldown = self.policy.cooldown_steps
            mask = self.policy.step_mask(self._need_steps(total, "its cool-down")) if cooldown else None
            if mask is not None:
                plan = "full" if mask[state.step] else "reuse"
            else:
                plan = "full" if (state.step - self.policy.warmup_steps) % self.policy.interval == 0 else "reuse"
        call = _Call(state, plan, total)
        call.reused = plan == "reuse"
        return call

    def _down(self, i: int, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            call = self.call
            if call is not None and i == 0:
                shape = _first_tensor(args, kwargs).shape
                if call.plan == "reuse" and shape != call.state.deep_input:
                    call.plan, call.reused = "full", False  # a new batch or resolution under this branch
                if call.plan == "full":
                    call.state.deep_input = shape
            if call is None or call.plan == "full" or i < self.keep:
                return self._run(call, original, args, kwargs)
            call.skipped += 1
            # The up blocks that still run only read the shallow skip connections; the deep ones
            # are placeholders of the right count for the UNet's bookkeeping.
            hidden = _first_tensor(args, kwargs)
            block = self.blocks.down[i]
            count = len(block.resnets) + (getattr(block, "downsamplers", None) is not None)
            return hidden, (hidden,) * count

        return forward

    def _mid(self, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            call = self.call
            if call is None or call.plan == "full":
                return self._run(call, original, args, kwargs)
            call.skipped += 1
            return _first_tensor(args, kwargs)

        return forward

    def _up(self, j: int, n: int, original: Callable) -> Callable:
        boundary = n - self.keep - 1  # the last deep up block: its output is the cached feature

        def forward(*args, **kwargs):
            call = self.call
            if call is None:
                return original(*args, **kwargs)
            if call.plan == "full" or j > boundary:
                out = self._run(call, original, args, kwargs)
                if call.plan == "full" and j == boundary:
                    call.state.deep = _Parked(out, self.policy.offload)
                return out
            call.skipped += 1
            return call.state.deep.get() if j == boundary else _first_tensor(args, kwargs)

        return forward

    @staticmethod
    def _run(call, original, args, kwargs):
        if call is not None:
            call.evaluated += 1
        return original(*args, **kwargs)


def _first_tensor(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


# diffusers pipelines name each denoising call with ``transformer.cache_context("cond")``; it
# reaches the hooks registered in the model's HookRegistry, so a small stateful hook relays it.
_CONTEXT_HOOK = "stepfuse_cache_context"


def attach_context(model, sink, name: str = _CONTEXT_HOOK) -> None:
    """Relay diffusers' ``cache_context`` of ``model`` to ``sink.context`` (a hook called ``name``)."""
    if not hasattr(model, "cache_context"):
        return  # not a diffusers model: branches come from stepfuse.cache.branch()
    from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

    class _Relay(StateManager):
        def __init__(self):  # holds no per-context state of its own
            pass

        def set_context(self, context):
            sink.context = context

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.relay = _Relay()

        def reset_state(self, module):  # pipelines reset stateful hooks after each call: nothing held here
            return module

    HookRegistry.check_if_exists_or_initialize(model).register_hook(_ContextHook(), name)


def detach_context(model, name: str = _CONTEXT_HOOK) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and name in getattr(registry, "hooks", {}):
        registry.remove_hook(name, recurse=False)
