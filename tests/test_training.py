"""leedl_fast.training with the toy recipe of tests/cli: outputs, seeding, and resume == uninterrupted, bitwise."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

from leedl_fast import checkpoint as ckpt
from leedl_fast import training
from tests.cli import TOY_N, OtherToyRecipe, ToyRecipe


def _args(out: Path, **kw) -> argparse.Namespace:
    base = dict(steps=10, batch_size=8, lr=1e-2, seed=0, device="cpu", out=out, resume=None,
                checkpoint_every=3, max_seconds=None, hidden=8)
    base.update(kw)
    return argparse.Namespace(**base)


def _final(out: Path) -> dict:
    header, payload = ckpt.load(out / training.CHECKPOINT_NAME, recipe="toy")
    return payload


def _assert_equal_states(a: dict, b: dict, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal_states(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_states(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _train(recipe, args):
    return training.train(recipe, args, progress=False, log=lambda msg: None)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """Only the reference run (test_outputs checks it) draws loss.png: matplotlib is slow to start."""
    monkeypatch.setattr(training, "_plot_losses", lambda path, history, title: True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 10-step run (5 batches per epoch: two epochs)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    results = _train(ToyRecipe(), _args(out))
    return out, results


def test_outputs(reference):
    out, results = reference
    assert results["steps"] == 10 and results["recipe"] == "toy"
    rows = list(csv.reader((out / "metrics.csv").open()))
    assert rows[0] == ["step", "mse", "ema"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 11))
    assert all(float(r[1]) > 0 for r in rows[1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["seen"] == 80 and set(saved["final_losses"]) == {"mse", "ema"}
    payload = _final(out)
    assert payload["step"] == 10 and payload["data"] == {"epoch": 1, "sample_in_epoch": 40, "world_size": 1,
                                                          "batch_size": 8, "seed": 0}
    assert payload["recipe_state"]["seen"] == 80
    assert len(payload["history"]) == 10 and payload["history"][0][0] == 1
    header = ckpt.read_header(out / training.CHECKPOINT_NAME)
    assert header["recipe"] == "toy" and header["step"] == 10


def test_same_seed_same_weights_other_seed_differs(reference, tmp_path):
    out, _ = reference
    _train(ToyRecipe(), _args(tmp_path / "again"))
    _assert_equal_states(_final(out)["models"], _final(tmp_path / "again")["models"])
    _train(ToyRecipe(), _args(tmp_path / "seed1", seed=1))
    assert not torch.equal(_final(out)["models"]["net"]["0.weight"],
                           _final(tmp_path / "seed1")["models"]["net"]["0.weight"])


@pytest.mark.parametrize("every,crash_at", [(3, 7), (5, 6), (4, 9), (1, 1)])
def test_interrupted_and_resumed_equals_uninterrupted(reference, tmp_path, every, crash_at):
    """A run that crashes at step index ``crash_at`` and resumes from its last checkpoint ends bitwise equal.

    (every=5, crash_at=6) resumes exactly at an epoch boundary; (3, 7) and (4, 9)
    in the middle of the second epoch; (1, 1) after the very first step.
    """
    ref_out, _ = reference
    out = tmp_path / "run"
    crashing = ToyRecipe()
    crashing.crash_at = crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(crashing, _args(out, checkpoint_every=every))
    assert _final(out)["step"] == (crash_at // every) * every
    _train(ToyRecipe(), _args(out, checkpoint_every=every, resume=True))
    a, b = _final(ref_out), _final(out)
    for key in ("models", "optimizers", "recipe_state", "step", "data", "history"):
        _assert_equal_states(a[key], b[key], key)
    assert (out / "metrics.csv").read_text() == (ref_out / "metrics.csv").read_text()


def test_resume_needs_the_rng_states(reference, tmp_path, monkeypatch):
    """Negative control: without restoring the RNG states the resumed run ends elsewhere."""
    out = tmp_path / "run"
    crashing = ToyRecipe()
    crashing.crash_at = 7
    with pytest.raises(RuntimeError):
        _train(crashing, _args(out))
    monkeypatch.setattr(training, "set_rng_state", lambda state, device: None)
    _train(ToyRecipe(), _args(out, resume=True))
    assert not torch.equal(_final(reference[0])["models"]["net"]["0.weight"], _final(out)["models"]["net"]["0.weight"])


def test_max_seconds_stops_with_checkpoint_and_resume_completes(reference, tmp_path):
    out = tmp_path / "run"
    results = _train(ToyRecipe(), _args(out, max_seconds=0.0))
    assert results["steps"] == 1 and _final(out)["step"] == 1
    _train(ToyRecipe(), _args(out, resume=True))
    _assert_equal_states(_final(reference[0])["models"], _final(out)["models"])


def test_resume_at_the_end_trains_nothing(reference, tmp_path):
    out = tmp_path / "run"
    _train(ToyRecipe(), _args(out, steps=4))
    before = _final(out)
    results = _train(ToyRecipe(), _args(out, steps=4, resume=True))
    assert results["steps"] == 4
    _assert_equal_states(before["models"], _final(out)["models"])


class _Recording(ToyRecipe):
    """The toy recipe, keeping the inputs of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def train_step(self, models, optimizers, batch, step, args):
        self.inputs.append(batch[0].clone())
        return super().train_step(models, optimizers, batch, step, args)


def test_resume_with_another_batch_size_goes_on_from_the_next_example(tmp_path):
    """3 batches of 8 (24 of the epoch's 40 examples), then batches of 4: the next example is the 25th of the
    uninterrupted order, and the epoch ends after the 40th (4 more steps), before the next epoch starts."""
    uninterrupted = _Recording()
    _train(uninterrupted, _args(tmp_path / "a", steps=10, batch_size=4))  # epoch 0's order, 4 at a time
    order = torch.cat(uninterrupted.inputs)
    first, resumed = _Recording(), _Recording()
    _train(first, _args(tmp_path / "b", steps=3, batch_size=8))
    _train(resumed, _args(tmp_path / "b", steps=8, batch_size=4, resume=True))
    assert len(resumed.inputs) == 5
    assert torch.equal(torch.cat(first.inputs), order[:24])
    assert torch.equal(torch.cat(resumed.inputs[:4]), order[24:40])
    payload = _final(tmp_path / "b")
    assert payload["data"]["epoch"] == 1 and payload["data"]["sample_in_epoch"] == 4
    assert not any(torch.equal(resumed.inputs[4], order[i:i + 4]) for i in range(24, 40, 4))


def test_resume_reads_the_older_batch_count(reference, tmp_path):
    """Checkpoints written before the position counted examples stored ``batch_in_epoch`` batches."""
    out = tmp_path / "run"
    _train(ToyRecipe(), _args(out, steps=7))                 # 5 batches of epoch 0, 2 of epoch 1
    header, payload = ckpt.load(out / training.CHECKPOINT_NAME, recipe="toy")
    data = payload["data"]
    assert data["sample_in_epoch"] == 16
    payload["data"] = {**{k: v for k, v in data.items() if k != "sample_in_epoch"}, "batch_in_epoch": 2}
    ckpt.save(out / training.CHECKPOINT_NAME, payload, recipe="toy")
    _train(ToyRecipe(), _args(out, resume=True))
    _assert_equal_states(_final(reference[0])["models"], _final(out)["models"])


class _StepsMatter(ToyRecipe):
    args_that_change_results = ("steps",)


@pytest.mark.parametrize("recipe,change,warns", [
    (ToyRecipe, dict(), None),
    (ToyRecipe, dict(steps=12), None),
    (ToyRecipe, dict(lr=2e-2), "lr"),
    (ToyRecipe, dict(seed=3), "seed"),
    (ToyRecipe, dict(batch_size=4), "batch_size"),
    (_StepsMatter, dict(steps=12), "steps"),
], ids=str)
def test_resume_warns_when_the_run_will_differ(tmp_path, recipe, change, warns):
    out = tmp_path / "run"
    _train(recipe(), _args(out, steps=4))
    said = []
    training.train(recipe(), _args(out, resume=True, **{"steps": 10, **change}), progress=False, log=said.append)
    warnings = [m for m in said if m.startswith("warning: resuming")]
    if warns is None:
        assert not warnings, warnings
    else:
        assert len(warnings) == 1 and f" {warns} " in warnings[0] + " ", warnings


@pytest.mark.parametrize("family,name", [("seq2seq", "TransformerRecipe"), ("diffusion", "DiffusionRecipe")])
def test_recipes_whose_schedule_depends_on_steps_declare_it(family, name):
    import importlib

    cls = getattr(importlib.import_module(f"leedl_fast.{family}.recipe"), name)
    lrs = {cls()._lr(300, argparse.Namespace(steps=steps, lr=1e-3)) for steps in (400, 4000)}
    assert len(lrs) == 2 and "steps" in cls.args_that_change_results


def test_resume_from_explicit_path_and_errors(reference, tmp_path):
    ref_out, _ = reference
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        _train(ToyRecipe(), _args(tmp_path / "fresh", resume=True))
    with pytest.raises(ckpt.CheckpointError, match="belongs to the recipe 'toy', not 'other_toy'"):
        _train(OtherToyRecipe(), _args(tmp_path / "o", resume=str(ref_out / training.CHECKPOINT_NAME)))
    with pytest.raises(ckpt.CheckpointError, match="does not fit model 'net'"):
        _train(ToyRecipe(), _args(tmp_path / "h", hidden=5, resume=str(ref_out / training.CHECKPOINT_NAME)))


@pytest.mark.parametrize("bad,match", [
    (dict(batch_size=TOY_N + 1), "larger than the data"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(steps=-1), "--steps must be >= 0"),
    (dict(device="tpu"), "--device"),
    (dict(device="cuda:0"), "CUDA"),
])
def test_usage_errors(tmp_path, bad, match):
    if bad.get("device") == "cuda:0" and torch.cuda.is_available():
        bad = dict(device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(training.UsageError, match=match):
        _train(ToyRecipe(), _args(tmp_path / "o", **bad))


def test_out_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(training.UsageError, match="exists and is not a directory"):
        _train(ToyRecipe(), _args(tmp_path / "file"))


def test_sample_loads_the_weights(reference, tmp_path):
    ref_out, _ = reference
    _, payload = ckpt.load(ref_out / training.CHECKPOINT_NAME, recipe="toy")
    args = argparse.Namespace(seed=0, device="cpu", out=tmp_path, num_samples=3, hidden=8, steps=None,
                              batch_size=8, lr=1e-2)
    path = training.sample(ToyRecipe(), args, payload, ref_out / training.CHECKPOINT_NAME)
    assert path == tmp_path / "toy_samples.png"
    got = [float(v) for v in path.read_text().split()]
    net = ToyRecipe().build(args, torch.device("cpu"))["net"]
    net.load_state_dict(payload["models"]["net"])
    net.eval()
    want = net(torch.linspace(-1, 1, 12).reshape(-1, 4)).flatten().tolist()
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("old_world", [1, 2, 3])
@pytest.mark.parametrize("new_world", [1, 2, 4])
@pytest.mark.parametrize("per_rank", [0, 5, 12])
def test_resume_with_another_world_size_continues_the_epoch(old_world, new_world, per_rank):
    """After old_world ranks consumed per_rank examples each, the new ranks together see exactly the rest of the
    epoch's order, each example once (what one process would see next)."""
    data = list(range(41))
    order = list(training._ResumableSampler(data, 1, 0, seed=3))          # the epoch's order, one process
    assert per_rank * old_world <= len(order)
    rest = []
    for rank in range(new_world):
        sampler = training._ResumableSampler(data, new_world, rank, seed=3)
        sampler.skip = training._rank_position(per_rank, old_world, rank, new_world)
        rest += list(sampler)
    usable = len(data) // new_world * new_world                            # DistributedSampler's drop_last
    assert sorted(rest) == sorted(order[per_rank * old_world:usable])


def test_results_json_is_standard_json_when_the_run_diverges(tmp_path):
    """A diverged run (NaN or infinite losses and metrics) still writes results.json that a strict JSON
    reader accepts (JSON has no NaN or Infinity): the non-finite numbers are null."""
    from tests.cli import NanToyRecipe

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    results = _train(NanToyRecipe(), _args(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert saved["final_losses"]["mse"] is None and saved["final_losses"]["grad"] is None
    assert saved["metrics"]["accuracy"] is None
    assert saved["final_losses"]["ema"] == pytest.approx(results["final_losses"]["ema"])
    assert saved["steps"] == 10


def test_resume_of_a_missing_checkpoint_makes_no_folder(tmp_path):
    """``--resume`` with no checkpoint to read is refused before --out is created (nothing left behind)."""
    out = tmp_path / "typo"
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        _train(ToyRecipe(), _args(out, resume=True))
    assert not out.exists()


def test_results_json_keeps_metric_types(tmp_path):
    """Metrics keep their kind in results.json: an int stays an int, a bool a bool, and a NumPy scalar or a
    one-element tensor is written as the number it holds (json.dumps' default=str wrote its repr)."""
    import numpy as np

    class MetricsToy(ToyRecipe):
        def finish(self, models, args, out_dir):
            return {"count": 7, "ok": True, "np_acc": np.float32(0.25), "np_n": np.int64(3),
                    "t_acc": torch.tensor(0.5), "label": "fine"}

    _train(MetricsToy(), _args(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert saved == {"count": 7, "ok": True, "np_acc": 0.25, "np_n": 3, "t_acc": 0.5, "label": "fine"}
    assert type(saved["count"]) is int and type(saved["ok"]) is bool and type(saved["np_n"]) is int
