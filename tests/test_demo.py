"""``stepfuse demo`` and ``stepfuse bench``, end-to-end quality on the bundled UNet."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from stepfuse import cli  # noqa: E402
from stepfuse.demo import CACHES, RunSpec, compare, make_scheduler  # noqa: E402
from stepfuse.metrics import psnr  # noqa: E402


def test_demo_writes_every_file(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--steps", "2", "3", "--samples-per-class", "1", "--reference-steps",
                   "6", "--baseline-steps", "4", "--guidance-steps", "3", "--cache-steps", "4", "--no-progress"])
    assert rc == 0
    for name in ("report.md", "report.json", "grid.png", "speed_quality.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["diffusers DDIM 4", "stepfuse UniPC 2", "stepfuse UniPC 3", "stepfuse DPM++ 2M 2",
                     "stepfuse DPM++ 2M 3", "stepfuse DPM++ 2M 3 interval", "stepfuse DPM++ 2M 3 cfg-zero*",
                     "stepfuse DPM++ 2M 3 apg", "stepfuse DPM++ 2M 4 +deepcache"]
    assert [row["guidance"] for row in report["rows"][-4:-1]] == ["interval", "cfg-zero*", "apg"]
    for row in report["rows"]:
        assert {"seconds", "nfe", "skipped", "speedup", "accuracy", "fd", "psnr", "mse"} <= set(row)
        # DeepCache at 4 steps (interval 3, last step full): step 1 runs only the outer blocks.
        assert (row["skipped"] > 0) == (row["cache"] == "deepcache"), row["name"]
    assert report["rows"][0]["speedup"] == 1.0
    assert "stepfuse UniPC 3" in (out / "report.md").read_text()
    assert "speedup" in capsys.readouterr().out


def test_demo_on_the_flow_model_uses_flow_schedulers(tmp_path):
    report = compare("digits-dit-flow", runs=[RunSpec("DPM++ 2M", 2)], baseline_steps=2,
                     reference=RunSpec("UniPC", 3), samples_per_class=1, progress=False, log=lambda s: None)
    assert report["flow"] is True
    assert [r["name"] for r in report["rows"]] == ["diffusers Euler 2", "stepfuse DPM++ 2M 2"]


def test_cache_rows_skip_blocks_and_keep_the_uncached_quality():
    """Block caches on the DiT: they skip block evaluations, and their samples stay close to the
    uncached run of the same solver and steps (same noise)."""
    caches = ["fora", "taylorseer"]
    runs = [RunSpec("DPM++ 2M", 10)] + [RunSpec("DPM++ 2M", 10, cache=c) for c in caches]
    report = compare("digits-dit", runs=runs, baseline_steps=2, reference=RunSpec("UniPC", 3), samples_per_class=1,
                     progress=False, log=lambda s: None)
    rows = {row["name"]: row for row in report["rows"]}
    uncached = rows["stepfuse DPM++ 2M 10"]
    assert uncached["skipped"] == 0 and rows["diffusers DDIM 2"]["skipped"] == 0
    for cache in caches:
        row = rows[f"stepfuse DPM++ 2M 10 +{cache}"]
        assert 0.1 < row["skipped"] < 1, row
        assert row["accuracy"] >= uncached["accuracy"] - 0.2, row
        assert psnr(report["_grid"][row["name"]], report["_grid"][uncached["name"]]) > 20, row


def test_bad_cache_choices_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--cache", "no-such-cache"])
    assert "argument --cache: invalid choice: 'no-such-cache'" in capsys.readouterr().err
    # A transformer block cache on the UNet: refused before any model is loaded, DeepCache suggested.
    assert cli.main(["demo", "--model", "digits-unet", "--cache", "first-block"]) == 2
    assert "deepcache" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cache 'deepcache'.*transformer"):
        compare("digits-dit", runs=[RunSpec("UniPC", 2, cache="deepcache")], log=lambda s: None)
    with pytest.raises(ValueError, match="cache must be one of"):
        RunSpec("UniPC", 2, cache="teacache2")
    with pytest.raises(ValueError, match="library='stepfuse'"):
        RunSpec("DDIM", 2, library="diffusers", cache="deepcache")
    assert RunSpec("DPM++ 2M", 50, cache="first-block").name == "stepfuse DPM++ 2M 50 +first-block"
    assert CACHES["none"]() is None


def test_make_scheduler_rejects_unknown_choices():
    with pytest.raises(ValueError, match="solver"):
        make_scheduler({}, "RK45", flow=False)
    with pytest.raises(ValueError, match="library"):
        make_scheduler({}, "UniPC", flow=False, library="k-diffusion")
    with pytest.raises(ValueError, match="no flow-matching form"):
        make_scheduler({}, "DDIM", flow=True)


def test_dpmsolver_10_steps_is_within_5_points_of_the_50_step_baseline():
    """Acceptance: stepfuse's DPMSolverMultistep at 10 steps keeps the 50-step DDIM class accuracy.

    Unguided, where accuracy is not saturated (about 0.95), so a solver error would show."""
    torch.manual_seed(0)
    report = compare("digits-unet", runs=[RunSpec("DPM++ 2M", 10)], reference=RunSpec("UniPC", 10),
                     samples_per_class=10, guidance_scale=1.0, progress=False, log=lambda s: None)
    baseline, fast = report["rows"]
    assert baseline["name"] == "diffusers DDIM 50" and fast["name"] == "stepfuse DPM++ 2M 10"
    assert baseline["accuracy"] >= 0.85, "the bundled UNet should draw recognisable digits"
    assert fast["accuracy"] >= baseline["accuracy"] - 0.05


def test_bench_lists_and_runs_scripts(tmp_path, capsys):
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("solver-step", "solver-accuracy", "quality"):
        assert name in listed
    rc = cli.main(["bench", "solver-step", "--quick", "--shapes", "sd15", "--dtypes", "fp32", "--device", "cpu",
                   "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    results = list(tmp_path.rglob("bench_solver_step.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["meta"]["device"].startswith("cpu")
    assert cli.main(["bench", "no-such-bench"]) == 2


def test_other_commands_reject_unknown_options():
    with pytest.raises(SystemExit):
        cli.main(["info", "--shapes", "sd15"])
