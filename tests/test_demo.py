"""``stepfuse demo`` and ``stepfuse bench``, end-to-end quality on the bundled UNet."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from stepfuse import cli  # noqa: E402
from stepfuse.demo import RunSpec, compare, make_scheduler  # noqa: E402


def test_demo_writes_every_file(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--steps", "2", "3", "--samples-per-class", "1", "--reference-steps",
                   "6", "--baseline-steps", "4", "--guidance-steps", "3", "--no-progress"])
    assert rc == 0
    for name in ("report.md", "report.json", "grid.png", "speed_quality.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["diffusers DDIM 4", "stepfuse UniPC 2", "stepfuse UniPC 3", "stepfuse DPM++ 2M 2",
                     "stepfuse DPM++ 2M 3", "stepfuse DPM++ 2M 3 interval", "stepfuse DPM++ 2M 3 cfg-zero*",
                     "stepfuse DPM++ 2M 3 apg"]
    assert [row["guidance"] for row in report["rows"][-3:]] == ["interval", "cfg-zero*", "apg"]
    for row in report["rows"]:
        assert {"seconds", "nfe", "speedup", "accuracy", "fd", "psnr", "mse"} <= set(row)
    assert report["rows"][0]["speedup"] == 1.0
    assert "stepfuse UniPC 3" in (out / "report.md").read_text()
    assert "speedup" in capsys.readouterr().out


def test_demo_on_the_flow_model_uses_flow_schedulers(tmp_path):
    report = compare("digits-dit-flow", runs=[RunSpec("DPM++ 2M", 2)], baseline_steps=2,
                     reference=RunSpec("UniPC", 3), samples_per_class=1, progress=False, log=lambda s: None)
    assert report["flow"] is True
    assert [r["name"] for r in report["rows"]] == ["diffusers Euler 2", "stepfuse DPM++ 2M 2"]


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
