"""The ``leedl-fast`` command: entry points, info, bench wiring, and one-line errors (exit 2) for user mistakes."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import leedl_fast.cli as cli
from leedl_fast import backend, ops
from leedl_fast.cli import info as info_mod

REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", **extra})
    return env


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_user_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- entry points and info

def test_console_script_is_the_cli(capsys, monkeypatch):
    """``leedl-fast`` (the console script) prints what ``leedl_fast.cli.main`` prints.

    ``python -m leedl_fast`` is run as a subprocess by tests/cli/test_train_cli.py (and by torchrun there).
    """
    script = Path(sys.executable).with_name("leedl-fast")
    assert script.exists(), f"console script missing at {script}; reinstall with pip install -e ."
    import torch

    env = _env(LEEDL_FAST_BACKEND="torch", TRITON_INTERPRET="0", OMP_NUM_THREADS=str(torch.get_num_threads()))
    a = subprocess.run([str(script), "info", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rc, out, _ = run_main(capsys, "info", "--json")
    assert rc == 0
    ja, jb = json.loads(a.stdout), json.loads(out)
    jb["env"]["CUDA_VISIBLE_DEVICES"] = ja["env"]["CUDA_VISIBLE_DEVICES"]
    assert ja == jb
    assert [r["op"] for r in ja["ops"]] == [label for label, _ in info_mod.OPS]


def test_importing_the_cli_probes_nothing():
    code = (
        "import sys, torch, leedl_fast\n"
        "had = 'triton' in sys.modules\n"
        "import leedl_fast.cli, leedl_fast.cli.info, leedl_fast.training, leedl_fast.checkpoint, leedl_fast.__main__\n"
        "assert ('triton' in sys.modules) == had, 'the CLI imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'the CLI initialised CUDA'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("forced", ["torch", "auto"])
def test_info_names_path_and_reason_from_backend(capsys, monkeypatch, forced):
    monkeypatch.setenv("LEEDL_FAST_BACKEND", forced)
    rc, out, err = run_main(capsys, "info", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["torch"] and report["python"] == sys.version.split()[0]
    devices = {d["device"] for d in report["devices"]}
    assert "cpu" in devices
    want = backend.decide("cpu")
    for r in report["ops"]:
        assert r["paths"]["cpu"] == {"path": want.path, "reason": want.reason}
    # Every public op of leedl_fast.ops (not a reference, not a window converter) is listed.
    listed = {f for r in report["ops"] for f in r["functions"]}
    public = {f"leedl_fast.ops.{name}" for name in ops.__all__
              if not name.endswith("_reference") and name != "normalize_window" and not name.startswith("window_")}
    assert listed == public
    rc, text, _ = run_main(capsys, "info")
    assert rc == 0
    for label, _ in info_mod.OPS:
        assert label in text
    assert want.reason in text and "torch " in text and "triton" in text


def test_info_reports_an_unimportable_triton(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes ``import triton`` raise ImportError
    rc, out, _ = run_main(capsys, "info")
    assert rc == 0 and "triton     not importable: ModuleNotFoundError" in out


def test_help_and_version(capsys):
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0 and all(c in out for c in ("info", "bench", "train", "sample", "demo"))
    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0 and "leedl_fast" in out
    rc, out, _ = run_main(capsys, "train", "tests.cli:ToyRecipe", "--help")
    assert rc == 0 and "--hidden" in out and "--resume" in out and "--steps" in out
    rc, out, _ = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--help")
    assert rc == 0 and "--checkpoint" in out and "--num-samples" in out


# --------------------------------------------------------------------------- bench wiring

@pytest.fixture
def fake_runner(monkeypatch):
    from leedl_fast.bench import runner

    calls = []

    def fake_cli(args):
        calls.append(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fake.md").write_text("| op | speedup |\n|---|---|\n| softmax | 1.00 |\n")
        return 0

    monkeypatch.setattr(runner, "cli", fake_cli)
    return calls


def test_bench_delegates_to_the_runner(capsys, fake_runner, tmp_path):
    rc, _, err = run_main(capsys, "bench", "--quick", "--ops", "softmax", "--out", tmp_path / "b")
    assert rc == 0, err
    (args,) = fake_runner
    assert args.quick is True and args.ops == ["softmax"] and args.out == tmp_path / "b"
    rc, _, _ = run_main(capsys, "bench")
    assert rc == 0
    assert fake_runner[1].quick is False and fake_runner[1].ops is None and fake_runner[1].out == Path("bench_out")


def test_bench_out_that_cannot_be_created(capsys, fake_runner, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_main(capsys, "bench", "--quick", "--out", blocker / "sub")
    assert_user_error(rc, err, "cannot create the directory")
    assert blocker.read_text() == "x"


def test_recipe_help_has_its_description(capsys):
    for name in ("gan", "cyclegan", "diffusion", "transformer"):
        cls = cli.resolve_recipe(name)
        assert cls.__doc__, name
        description = cli.recipe_parser("train", name, cls).description
        assert description and description.startswith(cls.__doc__.strip().split("\n")[0]), name


def test_bench_user_errors(capsys, fake_runner, tmp_path):
    rc, _, err = run_main(capsys, "bench", "--ops", "softmax,warp_drive", "--out", tmp_path)
    assert_user_error(rc, err, "unknown op(s) warp_drive", "softmax")
    (tmp_path / "f").write_text("x")
    rc, _, err = run_main(capsys, "bench", "--out", tmp_path / "f")
    assert_user_error(rc, err, "exists and is not a directory")
    for empty in (",", " , ,", ""):
        rc, _, err = run_main(capsys, "bench", "--ops", empty, "--out", tmp_path)
        assert_user_error(rc, err, "--ops names no op")
    assert not fake_runner


# --------------------------------------------------------------------------- train / sample user errors

def test_unknown_model_names(capsys, tmp_path):
    for command in ("train", "sample"):
        rc, _, err = run_main(capsys, command, "warp_drive", "--out", tmp_path / "o")
        assert_user_error(rc, err, "unknown model 'warp_drive'", "choose from")
        rc, _, err = run_main(capsys, command)
        assert_user_error(rc, err, f"{command} needs a model name")
    rc, _, err = run_main(capsys, "train", "no_such_module_xyz:Recipe")
    assert_user_error(rc, err, "cannot import recipe module 'no_such_module_xyz'")
    rc, _, err = run_main(capsys, "train", "tests.cli:NoSuchRecipe")
    assert_user_error(rc, err, "has no recipe class 'NoSuchRecipe'")
    rc, _, err = run_main(capsys, "train", "os:path")
    assert_user_error(rc, err, "os:path is not a recipe class")


def test_bad_option_values_are_one_line(capsys, tmp_path):
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--steps", "many")
    assert_user_error(rc, err, "--steps", "invalid int value")
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--frobnicate")
    assert_user_error(rc, err, "unrecognized arguments: --frobnicate")
    rc, _, err = run_main(capsys, "frobnicate")
    assert_user_error(rc, err, "invalid choice")


def test_out_is_an_existing_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--out", f, "--device", "cpu")
    assert_user_error(rc, err, f"--out {f} exists and is not a directory")
    rc, _, err = run_main(capsys, "demo", "--out", f)
    assert_user_error(rc, err, "exists and is not a directory")
    assert f.read_text() == "x"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step toy run through the CLI, with a non-default --hidden stored in the checkpoint."""
    out = tmp_path_factory.mktemp("cli_run")
    rc = cli.main(["train", "tests.cli:ToyRecipe", "--steps", "4", "--hidden", "6", "--out", str(out),
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    return out


def test_train_writes_its_files(trained):
    for name in ("checkpoint.pt", "metrics.csv", "loss.png", "results.json", "toy_finish.txt"):
        assert (trained / name).is_file(), name
    assert json.loads((trained / "results.json").read_text())["steps"] == 4


def test_sample_uses_the_training_settings(capsys, trained, tmp_path):
    out = tmp_path / "s.txt"
    rc, stdout, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", trained / "checkpoint.pt",
                               "--out", out, "--num-samples", "5", "--device", "cpu")
    assert rc == 0, err  # built with --hidden 6 from the checkpoint, or loading would fail
    assert len(out.read_text().split()) == 5 and str(out) in stdout
    rc, _, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", trained / "checkpoint.pt",
                          "--out", out, "--hidden", "7", "--device", "cpu")
    assert_user_error(rc, err, "does not fit model 'net'")


def _damaged(trained: Path, tmp_path: Path, kind: str) -> Path:
    data = (trained / "checkpoint.pt").read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "corrupt":
        b = bytearray(data)
        b[-50] ^= 0xFF
        path.write_bytes(bytes(b))
    else:
        path.write_text("not a checkpoint at all\n")
    return path


@pytest.mark.parametrize("kind,message", [("truncated", "is truncated"), ("corrupt", "is corrupt (checksum mismatch)"),
                                          ("foreign", "is not a leedl_fast checkpoint")])
def test_unusable_checkpoints(capsys, trained, tmp_path, kind, message):
    path = _damaged(trained, tmp_path, kind)
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--resume", path, "--out", tmp_path / "o",
                          "--device", "cpu", "--no-progress")
    assert_user_error(rc, err, message)
    rc, _, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", path, "--out", tmp_path / "s.txt")
    assert_user_error(rc, err, message)


def test_checkpoint_of_another_model(capsys, trained, tmp_path):
    ck = trained / "checkpoint.pt"
    rc, _, err = run_main(capsys, "train", "tests.cli:OtherToyRecipe", "--resume", ck, "--out", tmp_path / "o",
                          "--device", "cpu")
    assert_user_error(rc, err, "belongs to the recipe 'toy', not 'other_toy'")
    rc, _, err = run_main(capsys, "sample", "tests.cli:OtherToyRecipe", "--checkpoint", ck, "--out", tmp_path / "s")
    assert_user_error(rc, err, "belongs to the recipe 'toy', not 'other_toy'")
    rc, _, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", tmp_path / "missing.pt")
    assert_user_error(rc, err, "does not exist")
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--resume", "--out", tmp_path / "empty",
                          "--device", "cpu")
    assert_user_error(rc, err, "checkpoint.pt does not exist")


@pytest.mark.parametrize("option,value,message", [
    ("--seed", "-1", "--seed must be an int in [0, 2**63 - 1]"),
    ("--seed", str(2**63), "--seed must be an int in [0, 2**63 - 1]"),
    ("--lr", "-1", "--lr must be a positive number"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--checkpoint-every", "0", "--checkpoint-every must be >= 1"),
    ("--max-seconds", "-1", "--max-seconds must be >= 0"),
    ("--max-seconds", "nan", "--max-seconds must be >= 0"),
])
def test_train_settings_are_checked_before_any_step(capsys, tmp_path, option, value, message):
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", option, value, "--out", tmp_path / "o",
                          "--device", "cpu", "--no-progress")
    assert_user_error(rc, err, message)
    assert not (tmp_path / "o").exists()        # refused before the run made anything


def test_sample_settings_are_one_line_errors(capsys, trained, tmp_path):
    ck = trained / "checkpoint.pt"
    rc, _, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", ck, "--seed", "-3",
                          "--out", tmp_path / "s.txt", "--device", "cpu")
    assert_user_error(rc, err, "--seed must be an int")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_main(capsys, "sample", "tests.cli:ToyRecipe", "--checkpoint", ck, "--out", blocker / "s.txt",
                          "--device", "cpu")
    assert_user_error(rc, err, "cannot create its folder")
    rc, _, err = run_main(capsys, "sample", "tests.cli:PictureToyRecipe", "--checkpoint", ck,
                          "--out", tmp_path / "s.txt", "--device", "cpu")
    assert_user_error(rc, err, "writes a picture; use a name ending in .png")
    rc, _, err = run_main(capsys, "sample", "tests.cli:PictureToyRecipe", "--checkpoint", ck,
                          "--out", tmp_path / "s.png", "--num-samples", "0", "--device", "cpu")
    assert_user_error(rc, err, "--num-samples must be >= 1")
    assert blocker.read_text() == "x" and not (tmp_path / "s.png").exists()


def test_diffusion_sample_options_are_checked():
    from leedl_fast.diffusion.recipe import DiffusionRecipe
    from leedl_fast.training import IMAGE_SUFFIXES, UsageError

    recipe = DiffusionRecipe()
    assert DiffusionRecipe.sample_suffixes == IMAGE_SUFFIXES
    recipe.check_sample_args(argparse.Namespace(steps=None, eval_per_class=1))
    recipe.check_sample_args(argparse.Namespace(steps=1000, eval_per_class=10))
    for steps, per_class, message in ((0, 10, "--steps must be in [1, 1000]"), (1001, 10, "--steps"),
                                      (-3, 10, "--steps"), (None, 0, "--per-class must be >= 1"),
                                      (5, -1, "--per-class")):
        with pytest.raises(UsageError, match=re.escape(message)):
            recipe.check_sample_args(argparse.Namespace(steps=steps, eval_per_class=per_class))


# --------------------------------------------------------------------------- folders that cannot be written, Ctrl-C

def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".tmp*"))


def test_out_that_cannot_be_written_is_refused_before_training(capsys, tmp_path, monkeypatch):
    """A folder that exists but takes no files (read-only, another user's) is a one-line error up front, not an
    OSError traceback at the first checkpoint.  (Simulated: the tests may run as root, whom chmod does not stop.)"""
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()
    real_mkstemp, built = tempfile.mkstemp, []

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    from tests.cli import ToyRecipe

    monkeypatch.setattr(ToyRecipe, "build", lambda self, args, device: built.append(1) or {})
    rc, _, err = run_main(capsys, "train", "tests.cli:ToyRecipe", "--out", out, "--device", "cpu", "--no-progress")
    assert_user_error(rc, err, f"--out {out}: cannot write files there (Permission denied)")
    assert built == [] and list(out.iterdir()) == []


def test_a_checkpoint_that_cannot_be_written_is_one_line(capsys, tmp_path, monkeypatch):
    """The disk fills up during a checkpoint: a one-line error, the previous checkpoint kept, no temporary file."""
    from leedl_fast import checkpoint as ckpt

    out = tmp_path / "o"
    argv = ["train", "tests.cli:ToyRecipe", "--steps", "4", "--checkpoint-every", "2", "--out", out,
            "--device", "cpu", "--no-progress"]
    assert run_main(capsys, *argv)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()

    def disk_full(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", disk_full)
    rc, _, err = run_main(capsys, *argv)
    assert "exists and will be overwritten" in err  # the note of a second run into one folder, then the error
    assert_user_error(rc, err.split("\n", 1)[1], f"cannot write checkpoint {out / 'checkpoint.pt'}: "
                                                 "No space left on device")
    assert (out / "checkpoint.pt").read_bytes() == before and _temporaries(out) == []


@pytest.mark.parametrize("when", ["step", "metrics_rename", "checkpoint_write"])
def test_ctrl_c_keeps_the_last_checkpoint_and_leaves_no_temporary(capsys, tmp_path, monkeypatch, when):
    """Ctrl-C during step index 7 (checkpoints every 3 steps), or while the step-6 checkpoint's files are
    written: exit status 130, a loadable checkpoint of a completed step, metrics.csv agreeing with it (or
    absent), and no partly written temporary file left in --out."""
    from leedl_fast import checkpoint as ckpt
    from leedl_fast import training

    out = tmp_path / "o"
    if when == "metrics_rename":  # the interrupt arrives just before metrics.csv's temporary file is renamed
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "metrics.csv" and ckpt.read_header(out / "checkpoint.pt")["step"] == 6:
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    elif when == "checkpoint_write":  # ... or half-way through writing the step-6 checkpoint
        real_write_all = ckpt._write_all

        def write_all(f, data):
            if b'"step": 6' in data:
                f.write(data[:10])
                raise KeyboardInterrupt
            return real_write_all(f, data)

        monkeypatch.setattr(ckpt, "_write_all", write_all)
    monkeypatch.setattr(training, "_plot_losses", lambda path, history, title: True)
    rc, _, err = run_main(capsys, "train", "tests.cli:InterruptedToyRecipe", "--steps", "10", "--checkpoint-every",
                          "3", "--out", out, "--device", "cpu", "--no-progress")
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    payload = ckpt.load(out / "checkpoint.pt", recipe="toy")[1]
    assert payload["step"] == (3 if when == "checkpoint_write" else 6)
    assert _temporaries(out) == []
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [s for s, _ in payload["history"]][: len(rows) - 1]


# --------------------------------------------------------------------------- sample into a folder

def test_sample_into_a_folder_names_the_file_with_the_recipes_suffix(capsys, tmp_path):
    """``--out FOLDER`` writes FOLDER/<name>_samples<suffix>, the suffix of what the recipe writes: the
    transformer writes text (its default --out is samples.txt), not a .png."""
    import torch

    from leedl_fast import checkpoint as ckpt
    from leedl_fast.seq2seq.recipe import TransformerRecipe

    models = TransformerRecipe().build(argparse.Namespace(), torch.device("cpu"))
    path = ckpt.save(tmp_path / "t.pt", {"models": {k: m.state_dict() for k, m in models.items()}},
                     recipe="transformer")
    help_rc, help_out, _ = run_main(capsys, "sample", "transformer", "--help")
    default_out = Path(re.search(r"default\s+(\S+)\)", help_out.replace("\n", " ")).group(1))
    folder = tmp_path / "samples"
    folder.mkdir()
    rc, stdout, err = run_main(capsys, "sample", "transformer", "--checkpoint", path, "--out", folder,
                               "--device", "cpu")
    assert help_rc == 0 and rc == 0, err
    written = folder / f"transformer_samples{default_out.suffix}"
    assert default_out.suffix == ".txt" and [p.name for p in folder.iterdir()] == [written.name]
    assert all(" -> " in line for line in written.read_text().splitlines())  # text, as the recipe writes it
    # a picture recipe's file in a folder is a picture
    trained = tmp_path / "toy"
    assert run_main(capsys, "train", "tests.cli:ToyRecipe", "--steps", "1", "--out", trained, "--device", "cpu",
                    "--no-progress")[0] == 0
    rc, _, err = run_main(capsys, "sample", "tests.cli:PictureToyRecipe", "--checkpoint", trained / "checkpoint.pt",
                          "--out", folder, "--device", "cpu")
    assert rc == 0, err and (folder / "toy_samples.png").is_file()


@pytest.mark.parametrize("command", ["train", "sample", "bench", "demo"])
def test_bad_backend_variable_is_one_line_before_anything_runs(capsys, monkeypatch, tmp_path, command):
    """LEEDL_FAST_BACKEND=cuda (no such choice): every op raises at its first call, which was a traceback in the
    middle of a training run; the CLI now refuses it first (exit 2, one line naming the variable), and ``info``
    still reports it in its table."""
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "cuda")
    argv = {"train": ["train", "tests.cli:ToyRecipe", "--steps", "1", "--device", "cpu", "--out", tmp_path / "t"],
            "sample": ["sample", "tests.cli:ToyRecipe", "--out", tmp_path / "s.png"],
            "bench": ["bench", "--quick", "--out", tmp_path / "b"],
            "demo": ["demo", "--out", tmp_path / "d"]}[command]
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2 and "LEEDL_FAST_BACKEND must be one of auto, triton, torch; got 'cuda'" in err, err
    assert len(err.strip().splitlines()) == 1 and not any((tmp_path / n).exists() for n in ("t", "s.png", "b", "d"))
    rc, out, _ = run_main(capsys, "info")
    assert rc == 0 and "LEEDL_FAST_BACKEND must be one of auto, triton, torch; got 'cuda'" in out


def test_info_columns_line_up_whatever_the_path_names():
    """The op table's reasons start in one column even when a path is "unavailable" (wider than the 7
    characters the table used to reserve) and a device name is longer than "cpu"."""
    from leedl_fast.cli import info

    report = info.collect()
    report["ops"] = [{"op": "softmax", "paths": {"cpu": {"path": "torch", "reason": "R1"},
                                               "cuda:0": {"path": "unavailable", "reason": "R2"}}},
                     {"op": "attention", "paths": {"cpu": {"path": "triton", "reason": "R3"}}}]
    table = info.render(report).split("op paths (path: reason):\n")[1].splitlines()
    assert len(table) == 3
    assert len({line.index(f"R{i + 1}") for i, line in enumerate(table)}) == 1, table
