"""The ``leedl-fast`` command (also ``python -m leedl_fast``).

    leedl-fast info [--json]                         versions, devices, the path each op takes and why
    leedl-fast bench [--quick] [--ops a,b] [--out DIR]   every op against its peer on this machine
    leedl-fast train NAME [options]                  train a demo (transformer, diffusion, gan, cyclegan)
    leedl-fast sample NAME [--checkpoint PATH] [--out PNG]   pictures / translations from a checkpoint
    leedl-fast demo [--out DIR]                      info, bench --quick and a short run of every demo

``leedl-fast train NAME --help`` lists a recipe's options.  NAME may also be
``package.module:Class`` to train a recipe of your own.  Mistakes of the user
(an unknown name or op, an unusable checkpoint, an ``--out`` that is a file, ...)
end with a one-line message on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from ..checkpoint import CheckpointError
from ..training import UsageError, prepare_out_dir, sample_suffix

__all__ = ["main", "discover_recipes", "resolve_recipe", "recipe_parser", "FAMILIES"]

PROG = "leedl-fast"
FAMILIES = ("seq2seq", "diffusion", "gan")  # leedl_fast.<family>.recipe.RECIPES
DEMO_ORDER = ("transformer", "diffusion", "gan", "cyclegan")

# Options the CLI adds for a recipe that does not define ``add_arguments(parser, command)`` itself.
_BUILTIN_EXTRAS: dict[tuple[str, str], list[tuple[tuple[str, ...], dict]]] = {
    ("sample", "diffusion"): [
        (("--sampler",), dict(choices=["ddpm", "ddim"], default="ddim",
                              help="ddpm: the full ancestral chain; ddim: --steps evenly spaced steps (default)")),
        (("--per-class",), dict(dest="eval_per_class", type=int, default=10, help="samples per digit (default 10)")),
    ],
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``leedl-fast train: error: ... (see --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------- recipes

def discover_recipes() -> tuple[dict[str, type], dict[str, str]]:
    """``({name: RecipeClass}, {module: why it failed to import})`` over ``leedl_fast.<family>.recipe``.

    A family whose recipe module does not exist is skipped silently; one that
    exists but fails to import is reported in the second dict.
    """
    found: dict[str, type] = {}
    broken: dict[str, str] = {}
    for family in FAMILIES:
        modname = f"leedl_fast.{family}.recipe"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name in (modname, f"leedl_fast.{family}"):
                continue
            broken[modname] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:
            broken[modname] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        for name, cls in dict(getattr(mod, "RECIPES", {}) or {}).items():
            found.setdefault(name, cls)
    return found, broken


def _ordered(names) -> list[str]:
    return [n for n in DEMO_ORDER if n in names] + sorted(n for n in names if n not in DEMO_ORDER)


def resolve_recipe(name: str) -> type:
    """The recipe class called ``name``, or ``package.module:Class``; ``UsageError`` otherwise."""
    if ":" in name:
        modname, _, clsname = name.partition(":")
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:
            raise UsageError(f"cannot import recipe module {modname!r}: {type(exc).__name__}: {exc}") from None
        cls = getattr(mod, clsname, None)
        if cls is None:
            raise UsageError(f"module {modname!r} has no recipe class {clsname!r}")
        missing = [m for m in ("build", "optimizers", "dataset", "train_step") if not callable(getattr(cls, m, None))]
        if not isinstance(cls, type) or missing:
            raise UsageError(f"{name} is not a recipe class (a class with build, optimizers, dataset and "
                             f"train_step methods)")
        return cls
    found, broken = discover_recipes()
    if name in found:
        return found[name]
    known = ", ".join(_ordered(found)) or "none installed"
    extra = ("; could not import " + "; ".join(f"{m} ({why})" for m, why in broken.items())) if broken else ""
    raise UsageError(f"unknown model {name!r}; choose from: {known}{extra}")


def recipe_parser(command: str, name: str, cls: type) -> argparse.ArgumentParser:
    """The options of ``leedl-fast {train,sample} NAME``: the shared ones, the recipe's defaults and extras."""
    defaults = dict(getattr(cls, "defaults", {}) or {})
    p = _Parser(prog=f"{PROG} {command} {name}",
                description=(getattr(cls, "__doc__", None) or "").strip().split("\n\n")[0] or None)
    if command == "train":
        p.add_argument("--steps", type=int, default=defaults.get("steps", 1000), help="optimiser steps in all (default %(default)s)")
        p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32),
                       help="examples per step and process (default %(default)s)")
        p.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3), help="learning rate (default %(default)s)")
        p.add_argument("--out", type=Path, default=Path("runs") / name,
                       help="folder for checkpoint.pt, metrics.csv, loss.png, pictures (default %(default)s)")
        p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="continue from OUT/checkpoint.pt, or from CHECKPOINT")
        p.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                       help="write the checkpoint every K steps (default: a tenth of --steps) and at the end")
        p.add_argument("--max-seconds", type=float, default=None,
                       help="stop (with a checkpoint) after the step that passes this many seconds")
        p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                       help="no progress bar (it is also off when stderr is not a terminal)")
    else:
        p.add_argument("--checkpoint", "--resume", dest="checkpoint", type=Path,
                       default=Path("runs") / name / "checkpoint.pt", help="default %(default)s")
        suffix = sample_suffix(cls)
        p.add_argument("--out", type=Path, default=Path("runs") / name / f"samples{suffix}",
                       help="picture/text file to write, or a folder (default %(default)s)")
        p.add_argument("--steps", type=int, default=None, help="sampling steps where the model has them "
                       "(diffusion); default: the recipe's")
        p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32), help=argparse.SUPPRESS)
        p.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3), help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=defaults.get("seed", 0), help="default %(default)s")
    add = getattr(cls, "add_arguments", None)
    if callable(add):
        add(p, command)
    else:
        for flags, kwargs in _BUILTIN_EXTRAS.get((command, name), []):
            p.add_argument(*flags, **kwargs)
    for key, value in defaults.items():  # recipe defaults for its own extra settings too
        if key not in ("steps",) or command == "train":
            p.set_defaults(**{key: value})
    if command == "sample":
        p.set_defaults(steps=None)
    return p


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog=PROG, description="Triton kernels behind drop-in PyTorch modules: report, benchmark, train, sample.")
    p.add_argument("--version", action="version", version=f"leedl_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,train,sample,demo}", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("info", help="versions, devices and the path each op takes on each device")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser("bench", help="every op against its peer on this machine: table, JSON, plots")
    s.add_argument("--quick", action="store_true", help="a subset of shapes (under a minute on 2 CPU cores)")
    s.add_argument("--ops", type=_csv_list, default=None, help="comma-separated ops (default: all)")
    s.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for JSON, markdown and PNG (default %(default)s)")

    names = "transformer, diffusion, gan, cyclegan"
    for command, what in (("train", "train a demo model"), ("sample", "sample from a trained checkpoint")):
        s = sub.add_parser(command, help=f"{what} ({names})",
                           description=f"{what}. NAME is one of {names} (or package.module:Class); "
                                       f"`{PROG} {command} NAME --help` lists its options.")
        s.add_argument("name", metavar="NAME", nargs="?")
        s.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    s = sub.add_parser("demo", help="info, bench --quick and a short run of every demo; everything under --out")
    s.add_argument("--out", type=Path, default=Path("demo_out"), help="default %(default)s")
    s.add_argument("--steps", type=int, default=None, help="steps per demo (default: each recipe's demo setting)")
    s.add_argument("--max-seconds", type=float, default=75.0,
                   help="at most this many seconds of training per demo (default %(default)s)")
    s.add_argument("--budget", type=float, default=540.0,
                   help="the whole demo's target in seconds: each demo trains for at most its share of what is "
                        "left, less what a demo took besides training so far (at least %d s, for its evaluation) "
                        "(default %%(default)s)" % _FINISH_RESERVE_S)
    s.add_argument("--device", default="auto")
    s.add_argument("--only", type=_csv_list, default=None, help="comma-separated demos to run (default: all)")
    s.add_argument("--no-bench", dest="bench", action="store_false", help="skip the benchmark")
    return p


# --------------------------------------------------------------------------- commands

def _cmd_info(ns) -> int:
    from . import info

    info.run(as_json=ns.json)
    return 0


def _check_bench_args(ns) -> None:
    prepare_out_dir(ns.out, create=False)
    if ns.ops == []:
        raise UsageError("--ops names no op (give a comma-separated list, or leave --ops out for all)")
    if ns.ops:
        from ..bench import runner

        known = set(runner.known_ops()) | {m.__name__.rsplit(".", 1)[-1] for m in runner.case_modules()}
        unknown = [o for o in ns.ops if o not in known]
        if unknown:
            raise UsageError(f"unknown op(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}")
    prepare_out_dir(ns.out)         # created here, so a folder that cannot be is a one-line error


def _cmd_bench(ns) -> int:
    _check_bench_args(ns)
    from ..bench import runner

    return int(runner.cli(argparse.Namespace(quick=ns.quick, ops=ns.ops, out=ns.out)) or 0)


def _recipe_args(command: str, name: str | None, options: list[str]):
    """Parse ``NAME [options]`` of train/sample; returns (recipe class, namespace) or exits via argparse."""
    if not name or name.startswith("-"):
        found, broken = discover_recipes()
        if name in ("-h", "--help"):
            build_parser().parse_args([command, "--help"])
        raise UsageError(f"{command} needs a model name: {', '.join(_ordered(found)) or 'none installed'}")
    cls = resolve_recipe(name)
    parser = recipe_parser(command, name, cls)
    return cls, parser, parser.parse_args(options)


def _cmd_train(ns) -> int:
    from ..training import train

    cls, _, args = _recipe_args("train", ns.name, ns.options)
    recipe = cls()
    args.recipe = ns.name
    progress = getattr(args, "progress", None)
    train(recipe, args, progress=progress)
    return 0


_SAMPLE_OWN = {"steps", "out", "device", "seed", "checkpoint", "resume", "checkpoint_every", "max_seconds",
               "progress", "recipe"}


def _cmd_sample(ns) -> int:
    from .. import checkpoint as ckpt
    from ..training import sample

    cls, parser, args = _recipe_args("sample", ns.name, ns.options)
    recipe = cls()
    _, payload = ckpt.load(args.checkpoint, recipe=recipe.name)
    # The training run's settings (model sizes, ...) are the defaults; what was typed here wins.
    stored = {k: v for k, v in dict(payload.get("args", {})).items() if k not in _SAMPLE_OWN}
    args = parser.parse_args(ns.options, namespace=argparse.Namespace(**stored))
    args.recipe = ns.name
    path = sample(recipe, args, payload, Path(args.checkpoint))
    print(f"wrote {path}")
    return 0


_FINISH_RESERVE_S = 30.0  # what a demo's evaluation (finish) may take after its training


def _check_demo_args(ns) -> None:
    """The demo's own options, checked before anything runs (each training would refuse them, one by one)."""
    from ..training import resolve_device

    if ns.steps is not None and ns.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {ns.steps}")
    for flag, value in (("--max-seconds", ns.max_seconds), ("--budget", ns.budget)):
        if not value >= 0:  # NaN too
            raise UsageError(f"{flag} must be >= 0, got {value}")
    resolve_device(ns.device)


def _cmd_demo(ns) -> int:
    from ..training import train
    from . import info

    t_start = time.time()
    _check_demo_args(ns)
    out = prepare_out_dir(ns.out, create=False)
    found, broken = discover_recipes()
    names = [n for n in _ordered(found) if ns.only is None or n in ns.only]
    unknown = [n for n in (ns.only or []) if n not in found]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(_ordered(found))}")
    out = prepare_out_dir(ns.out)
    failures: list[str] = [f"{modname} does not import: {why}" for modname, why in broken.items()]
    errors_log = out / "errors.log"
    if errors_log.exists():
        errors_log.unlink()

    def failed(what: str, exc: BaseException) -> None:
        failures.append(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0])
        with open(errors_log, "a") as f:
            f.write(f"== {what}\n{traceback.format_exc()}\n")
        print(f"demo: {what} failed ({type(exc).__name__}: {exc}); details in {errors_log}".splitlines()[0],
              file=sys.stderr, flush=True)

    print("== leedl-fast info", flush=True)
    info_text = info.run()
    (out / "info.txt").write_text(info_text)

    bench_md = None
    if ns.bench:
        print("\n== leedl-fast bench --quick", flush=True)
        bench_ns = argparse.Namespace(quick=True, ops=None, out=out / "bench")
        try:
            _cmd_bench(bench_ns)
            mds = sorted((out / "bench").glob("*.md"), key=lambda p: p.stat().st_mtime)
            bench_md = mds[-1] if mds else None
        except Exception as exc:
            failed("bench --quick", exc)

    runs: list[tuple[str, dict]] = []
    overheads: list[float] = []
    for i, name in enumerate(names):
        cls = found[name]
        demo_over = dict(getattr(cls, "demo_defaults", {}) or {})
        # What a demo costs besides its training (building, data, evaluation, pictures), as seen so far.
        reserve = max([_FINISH_RESERVE_S] + overheads)
        share = (ns.budget - (time.time() - t_start)) / (len(names) - i) - reserve
        seconds = min(ns.max_seconds, max(5.0, share))
        t_run = time.time()
        opts = ["--out", str(out / "train" / name), "--device", ns.device, "--max-seconds", f"{seconds:.0f}"]
        steps = ns.steps if ns.steps is not None else demo_over.pop("steps", None)
        if steps is not None:
            opts += ["--steps", str(steps)]
        demo_over.pop("steps", None)
        print(f"\n== leedl-fast train {name} " + " ".join(opts), flush=True)
        try:
            args = recipe_parser("train", name, cls).parse_args(opts)
            for k, v in demo_over.items():
                setattr(args, k, v)
            args.recipe = name
            runs.append((name, train(cls(), args)))
            overheads.append(time.time() - t_run - runs[-1][1].get("train_seconds", 0.0))
        except SystemExit as exc:  # argparse rejected a recipe's demo_defaults
            failed(f"train {name}", RuntimeError(f"bad options (exit {exc.code})"))
        except Exception as exc:
            failed(f"train {name}", exc)

    summary = _demo_summary(out, info_text, bench_md, runs, failures, time.time() - t_start)
    (out / "SUMMARY.md").write_text(summary)
    status = "with failures: " + "; ".join(failures) if failures else "ok"
    print(f"\ndemo finished in {time.time() - t_start:.0f} s ({status}).")
    print(f"All tables and pictures are in {out.resolve()} (start with {out / 'SUMMARY.md'})")
    return 1 if failures else 0


def _demo_summary(out: Path, info_text: str, bench_md: Path | None, runs, failures, seconds: float) -> str:
    lines = ["# leedl_fast demo", "", f"Finished in {seconds:.0f} s.", "", "## Backend", "", "```", info_text.rstrip(),
             "```", "", "## Benchmarks", ""]
    if bench_md is not None:
        table = [("###" + line.lstrip("#") if line.startswith("#") else line)  # its title under ours
                 for line in bench_md.read_text().strip().splitlines()]
        lines += [f"From `{bench_md.relative_to(out)}`:", "", *table, ""]
        pngs = sorted((out / "bench").glob("*.png"))
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in pngs] + [""]
    else:
        lines += ["(not run)", ""]
    lines += ["## Training demos", "", "| model | steps | seconds | final losses | metrics |", "|---|---|---|---|---|"]
    for name, res in runs:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in sorted(res.get("final_losses", {}).items()))
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted(res.get("metrics", {}).items()))
        done, asked = res.get("steps"), res.get("steps_requested")
        steps = f"{done}" if done == asked or asked is None else f"{done} of {asked} (time budget)"
        lines.append(f"| {name} | {steps} | {res.get('train_seconds', 0):.0f} | {losses} | {metrics} |")
    lines.append("")
    for name, _ in runs:
        for p in sorted((out / "train" / name).glob("*.png")):
            lines.append(f"![{name} {p.stem}]({p.relative_to(out)})")
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures] + ["", "Tracebacks: `errors.log`."]
    return "\n".join(lines) + "\n"


_COMMANDS = {"info": _cmd_info, "bench": _cmd_bench, "train": _cmd_train, "sample": _cmd_sample, "demo": _cmd_demo}


def _check_backend_env() -> None:
    """A LEEDL_FAST_BACKEND that names no backend is a one-line error before anything runs (every op would raise
    at its first call, in the middle of a training run)."""
    from .. import backend

    try:
        backend.check_env()
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 a mistake of the user)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)
        try:
            if ns.command != "info":  # info reports a bad LEEDL_FAST_BACKEND itself
                _check_backend_env()
            return _COMMANDS[ns.command](ns)
        except (UsageError, CheckpointError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
