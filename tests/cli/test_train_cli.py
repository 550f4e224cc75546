"""``leedl-fast train`` end to end: a SIGKILLed run resumed to the same weights, torchrun on gloo, the demo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leedl_fast.cli as cli
from leedl_fast import checkpoint as ckpt
from tests.cli import OtherToyRecipe, ToyRecipe

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.cli:ToyRecipe"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("LEEDL_TOY_KILL_AT", None)
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _weights(out: Path) -> dict:
    return ckpt.load(out / "checkpoint.pt", recipe="toy")[1]


def _train_argv(out: Path, *extra) -> list[str]:
    return ["train", TOY, "--steps", "10", "--checkpoint-every", "3", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL at step index 7 (checkpoint at 6), then ``--resume``: bitwise the uninterrupted run's weights."""
    assert cli.main(_train_argv(tmp_path / "ref")) == 0
    proc = subprocess.run([sys.executable, "-m", "leedl_fast", *_train_argv(tmp_path / "run")], cwd=REPO,
                          env=_env(LEEDL_TOY_KILL_AT="7"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert _weights(tmp_path / "run")["step"] == 6
    assert cli.main(_train_argv(tmp_path / "run", "--resume")) == 0
    ref, run = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert run["step"] == 10
    for name, tensor in ref["models"]["net"].items():
        assert torch.equal(tensor, run["models"]["net"][name]), name
    assert ref["recipe_state"] == run["recipe_state"]
    assert (tmp_path / "ref" / "metrics.csv").read_text() == (tmp_path / "run" / "metrics.csv").read_text()


def test_torchrun_two_cpu_processes_on_gloo(tmp_path):
    """Two ranks train the toy recipe; each frees its DDP wrapper (and so its process group) before the
    interpreter's teardown, even with the garbage collector off (tests/cli/torchrun_main.py)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.cli.torchrun_main", "train", TOY, "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
           "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = _weights(out)
    assert payload["step"] == 4 and payload["data"]["world_size"] == 2
    assert len(payload["rng"]) == 2  # both ranks' generators, so --resume under torchrun reproduces the run
    assert not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])
    # Each rank saw its own half of every epoch: 2 ranks x 4 examples per step, 4 steps.
    assert payload["recipe_state"]["seen"] == 16
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "loss.png", "metrics.csv", "results.json",
                                                     "toy_finish.txt"]
    assert proc.stderr.count("toy: 4 steps in") == 1  # only rank 0 reports
    assert proc.stderr.count("DDP wrappers alive at destroy_process_group: 0") == 2, proc.stderr[-3000:]


# --------------------------------------------------------------------------- demo

class BrokenRecipe(ToyRecipe):
    name = "broken"

    def train_step(self, models, optimizers, batch, step, args):
        raise RuntimeError("this recipe is broken")


@pytest.fixture
def demo_env(monkeypatch):
    from leedl_fast.bench import runner

    def fake_cli(args):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu-quick.md").write_text("| op | speedup |\n|---|---|\n| softmax | 1.00 |\n")
        return 0

    monkeypatch.setattr(runner, "cli", fake_cli)

    def use(recipes):
        monkeypatch.setattr(cli, "discover_recipes", lambda: (recipes, {}))

    return use


def test_demo_runs_everything_into_one_folder(capsys, demo_env, tmp_path):
    demo_env({"toy": ToyRecipe, "other_toy": OtherToyRecipe})
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--steps", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "softmax" in (out / "info.txt").read_text()
    assert (out / "bench" / "cpu-quick.md").is_file()
    for name in ("toy", "other_toy"):
        assert _weights_any(out / "train" / name)["step"] == 3
        assert (out / "train" / name / "loss.png").is_file()
    summary = (out / "SUMMARY.md").read_text()
    assert "| softmax | 1.00 |" in summary and "| toy | 3 |" in summary and "| other_toy | 3 |" in summary
    assert "train/toy/loss.png" in summary
    last = captured.out.strip().splitlines()[-1]
    assert str(out.resolve()) in last and "SUMMARY.md" in last


def _weights_any(out: Path) -> dict:
    return ckpt.load(out / "checkpoint.pt")[1]


def test_demo_goes_on_after_a_failure(capsys, demo_env, tmp_path):
    demo_env({"broken": BrokenRecipe, "toy": ToyRecipe})
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--steps", "2", "--device", "cpu", "--no-bench"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "train broken failed" in captured.err and "this recipe is broken" in (out / "errors.log").read_text()
    assert _weights_any(out / "train" / "toy")["step"] == 2
    assert "## Failures" in (out / "SUMMARY.md").read_text()
    assert str(out.resolve()) in captured.out.strip().splitlines()[-1]
    # --max-seconds caps each demo's training: 0 s means one step, then a checkpoint and the evaluation.
    rc = cli.main(["demo", "--out", str(out), "--only", "toy", "--steps", "50", "--max-seconds", "0", "--no-bench"])
    assert rc == 0 and _weights_any(out / "train" / "toy")["step"] == 1
    capsys.readouterr()
    rc = cli.main(["demo", "--out", str(out), "--only", "warp_drive", "--no-bench"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown model(s) warp_drive" in err


@pytest.mark.parametrize("option,value,message", [
    ("--steps", "-2", "--steps must be >= 0, got -2"),
    ("--max-seconds", "-1", "--max-seconds must be >= 0, got -1.0"),
    ("--max-seconds", "nan", "--max-seconds must be >= 0, got nan"),
    ("--budget", "nan", "--budget must be >= 0, got nan"),
    ("--budget", "-5", "--budget must be >= 0, got -5.0"),
    ("--device", "tpu", "--device 'tpu' is not a device (use auto, cpu, cuda or cuda:N)"),
])
def test_demo_settings_are_checked_before_anything_runs(capsys, demo_env, tmp_path, option, value, message):
    """A bad demo option is one line and exit status 2 before anything runs, not a failure of every demo."""
    demo_env({"toy": ToyRecipe, "other_toy": OtherToyRecipe})
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--no-bench", option, value])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [f"leedl-fast: error: {message}"]
    assert not out.exists()


def test_demo_steps_zero_is_zero_steps(capsys, demo_env, tmp_path):
    """``--steps 0`` trains no step (as ``train --steps 0`` does), rather than falling back to the default."""
    class LongToy(ToyRecipe):
        demo_defaults = {"steps": 7}

    demo_env({"toy": LongToy})
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--no-bench", "--steps", "0", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert _weights(out / "train" / "toy")["step"] == 0
    assert cli.main(["demo", "--out", str(out), "--no-bench", "--device", "cpu"]) == 0
    assert _weights(out / "train" / "toy")["step"] == 7  # without --steps: the recipe's demo setting
