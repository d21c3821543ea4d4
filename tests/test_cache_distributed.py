"""Feature-cache decisions under ``torch.distributed``: two CPU processes (gloo backend) share one
batch by its tokens (sequence parallelism) and must take the decision a single process takes on
the whole batch, through one packed all-reduce of the metric's partial sums per decision.

The model's blocks act token by token, so each rank's shard of the output is exactly the
unsharded model's output on those tokens, and the per-sample sums ``(sum |r - r_prev|,
sum |r_prev|)`` of the two shards add up to the unsharded sums.  The shards are chosen so that
the ranks' own metrics disagree: rank 0's tokens barely move (its local metric stays near 0)
while rank 1's drift with an uneven step size (its local metric crosses the threshold at steps
where the pooled one does not).
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stepfuse.cache as sc

WORLD_SIZE = 2
BATCH, TOKENS, CHANNELS, DEPTH = 2, 8, 16, 4
NUM_STEPS = 12
# Displacement of the drifting tokens at each step: long and short moves mixed, so runs of reused
# steps end when the change accumulated since the last full step crosses the threshold.
STEP_SIZES = (0.0, 0.05, 0.05, 0.05, 0.3, 0.02, 0.02, 0.02, 0.02, 0.3, 0.05, 0.05)
JOIN_TIMEOUT_S = 120.0  # both ranks, spawn and imports included; a hung collective fails the test
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# Thresholds sit at least 15% (relative) away from every metric value the unsharded run meets before
# its last (forced) step, far beyond the float32 rounding that separates the all-reduced sums from
# the unsharded ones.  Each policy runs with and without the all-reduce.
POLICIES = {
    "first_block": sc.FirstBlockCache(threshold=0.08),
    # The skip flag kept on the device (torch.cond): the reduced sums feed the same decision kernel.
    "first_block_device": sc.FirstBlockCache(threshold=0.08, decision="device"),
    "dual_block_mean": sc.DualBlockCache(front_blocks=2, back_blocks=1, threshold=0.1, batch_decision="mean"),
    "teacache": sc.TeaCache(threshold=0.1),
}
SCENARIOS = {(name, distributed): dataclasses.replace(policy, distributed=distributed)
             for name, policy in POLICIES.items() for distributed in (True, False)}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


class TokenwiseBlock(torch.nn.Module):
    """Pre-norm residual MLP on ``[B, T, C]``: every token independently, like a DiT block without attention."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.fc1 = torch.nn.Linear(channels, 2 * channels)
        self.fc2 = torch.nn.Linear(2 * channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(hidden_states))))


class TokenwiseTransformer(torch.nn.Module):
    def __init__(self, channels: int = CHANNELS, depth: int = DEPTH):
        super().__init__()
        self.blocks = torch.nn.ModuleList(TokenwiseBlock(channels) for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def make_model() -> TokenwiseTransformer:
    # The same weights in every process: seeded, without disturbing the caller's generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokenwiseTransformer().eval()


def step_inputs() -> torch.Tensor:
    """``[NUM_STEPS, B, T, C]``: rank 0's tokens (the first half) nearly still, rank 1's drifting."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(BATCH, TOKENS, CHANNELS, generator=g)
    direction = torch.randn(BATCH, TOKENS, CHANNELS, generator=g)
    speed = torch.ones(TOKENS)
    speed[:TOKENS // 2] = 1e-3
    position = torch.cumsum(torch.tensor(STEP_SIZES), 0)
    return base + position[:, None, None, None] * speed[None, None, :, None] * direction


def shard(rank: int) -> slice:
    per_rank = TOKENS // WORLD_SIZE
    return slice(rank * per_rank, (rank + 1) * per_rank)


def run_cached(policy: sc.CachePolicy, tokens: slice):
    """One cached run over ``tokens``: the cache's decisions and the model's outputs ``[NUM_STEPS, B, t, C]``."""
    model = sc.apply(make_model(), policy, blocks=["blocks"], num_inference_steps=NUM_STEPS)
    with torch.no_grad():
        outputs = torch.stack([model(x[:, tokens]) for x in step_inputs()])
    return list(sc.stats(model).decisions), outputs


def _worker(rank: int, store: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE,
                                timeout=COLLECTIVE_TIMEOUT)
    except Exception:  # noqa: BLE001  (the parent skips: the host cannot run gloo)
        with open(os.path.join(out_dir, f"rank{rank}.init_error"), "w") as f:
            f.write(traceback.format_exc())
        return
    try:
        reduced = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            reduced.append((tuple(tensor.shape), tensor.dtype))
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # the runtime looks it up at each call
        results = {}
        for key, policy in SCENARIOS.items():
            reduced.clear()
            decisions, outputs = run_cached(policy, shard(rank))
            results[key] = {"decisions": decisions, "outputs": outputs, "all_reduces": list(reduced)}
        dist.all_reduce = all_reduce
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:  # noqa: BLE001  (reported by the parent with the traceback)
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario run once on each of the two ranks (one spawn for the whole module)."""
    out_dir = tmp_path_factory.mktemp("cache_distributed")
    # A file store: no TCP port to pick, so no race with other jobs for a free one.
    store = str(out_dir / "store")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, store, str(out_dir)), daemon=True) for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join(5)
    errors = {rank: (out_dir / f"rank{rank}.error") for rank in range(WORLD_SIZE)}
    errors = {rank: path.read_text() for rank, path in errors.items() if path.exists()}
    assert not errors, f"ranks failed: {errors}"
    init_errors = [(out_dir / f"rank{rank}.init_error") for rank in range(WORLD_SIZE)]
    init_errors = [path.read_text() for path in init_errors if path.exists()]
    if init_errors:
        pytest.skip(f"gloo process group unavailable here: {init_errors[0].strip().splitlines()[-1]}")
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT_S} s (a collective that never completed?)"
    assert [p.exitcode for p in procs] == [0] * WORLD_SIZE, [p.exitcode for p in procs]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def reused(decisions) -> str:
    return "".join("R" if r else "." for _, _, r in decisions)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_rank_takes_the_unsharded_decision(ranks, name):
    expected, expected_outputs = run_cached(SCENARIOS[name, True], slice(None))
    pattern = reused(expected)
    # The setup is only a test if the unsharded run both reuses and recomputes after its first step.
    assert "R" in pattern and "." in pattern[1:-1], pattern
    for rank, results in enumerate(ranks):
        got = results[name, True]
        assert got["decisions"] == expected, (rank, reused(got["decisions"]), pattern)
        # Same decisions and token-wise blocks: each rank's outputs are its tokens of the unsharded outputs.
        torch.testing.assert_close(got["outputs"], expected_outputs[:, :, shard(rank)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_one_packed_all_reduce_per_decision(ranks, name):
    # Step 0 has no cache to compare with; every later step compares (the last one is forced to
    # compute, but its metric is still reduced, so all ranks reach the same number of collectives).
    for results in ranks:
        assert results[name, True]["all_reduces"] == [((BATCH, 2), torch.float32)] * (NUM_STEPS - 1)
        assert results[name, False]["all_reduces"] == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_without_all_reduce_ranks_disagree(ranks, name):
    local = [reused(results[name, False]["decisions"]) for results in ranks]
    assert local[0] != local[1], local
    # Rank 0's tokens barely move: alone it reuses at every step but the first and the forced last.
    assert local[0] == "." + "R" * (NUM_STEPS - 2) + ".", local[0]
