"""Tests of the ``leedl-fast`` command and a toy recipe they (and tests/test_training.py) train.

``ToyRecipe`` is importable as ``tests.cli:ToyRecipe``, the form ``leedl-fast
train`` accepts for recipes of one's own, so subprocess tests (torchrun
included) can train it from the repository root.
"""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch
from torch import nn

TOY_N = 40  # examples in the toy data set


class ToyRecipe:
    """Noisy linear regression with a tiny MLP: every kind of state the trainer must save and restore.

    The step uses torch's, NumPy's and Python's global generators (dropout and
    input noise), Adam has moment buffers, and the recipe keeps state of its own
    (a step counter and a running loss), so a resumed run matches an
    uninterrupted one only when all of them are restored.
    """

    name = "toy"
    defaults = {"steps": 10, "batch_size": 8, "lr": 1e-2}

    def __init__(self):
        self.seen = 0
        self.ema = 0.0
        self.crash_at = None  # a step index at which train_step raises (simulates a crash)

    @staticmethod
    def add_arguments(parser, command):
        parser.add_argument("--hidden", type=int, default=8, help="hidden units")
        if command == "sample":
            parser.add_argument("--num-samples", type=int, default=4, help="rows to write")

    def build(self, args, device):
        hidden = getattr(args, "hidden", 8)
        return {"net": nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(0.2), nn.Linear(hidden, 1)).to(device)}

    def optimizers(self, models, args):
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=args.lr)}

    def dataset(self, args):
        x = torch.randn(TOY_N, 4)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(TOY_N, 1)
        return torch.utils.data.TensorDataset(x, y)

    def train_step(self, models, optimizers, batch, step, args):
        if self.crash_at is not None and step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        kill_at = os.environ.get("LEEDL_TOY_KILL_AT")
        if kill_at is not None and step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        x = x + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        opt = optimizers["net"]
        opt.zero_grad()
        loss = nn.functional.mse_loss(models["net"](x), y)
        loss.backward()
        opt.step()
        self.seen += x.shape[0]
        self.ema = 0.9 * self.ema + 0.1 * loss.item()
        return {"mse": loss.item(), "ema": self.ema}

    def finish(self, models, args, out_dir):
        net = getattr(models["net"], "module", models["net"]).eval()
        with torch.no_grad():
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
            pred = net(x)
        (out_dir / "toy_finish.txt").write_text(f"{pred.sum().item():.6f}\n")
        return {"pred_sum": pred.sum().item(), "seen": self.seen}

    def sample(self, models, args, out_path):
        x = torch.linspace(-1, 1, 4 * args.num_samples).reshape(-1, 4)
        y = models["net"](x)
        out_path.write_text("\n".join(f"{v:.6f}" for v in y.flatten().tolist()) + "\n")

    def state_dict(self):
        return {"seen": self.seen, "ema": self.ema}

    def load_state_dict(self, d):
        self.seen = int(d["seen"])
        self.ema = float(d["ema"])


class OtherToyRecipe(ToyRecipe):
    """The same model under another name: its checkpoints must not load as ``toy``."""

    name = "other_toy"


class PictureToyRecipe(ToyRecipe):
    """``toy`` (it loads toy checkpoints) declaring that its samples are pictures and checking its own sample
    options, as the diffusion and GAN recipes do."""

    sample_suffixes = (".png",)

    def check_sample_args(self, args):
        from leedl_fast.training import UsageError

        if args.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")


class InterruptedToyRecipe(ToyRecipe):
    """``toy`` where the user presses Ctrl-C (KeyboardInterrupt) during step index ``interrupt_at``."""

    interrupt_at = 7

    def train_step(self, models, optimizers, batch, step, args):
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        return super().train_step(models, optimizers, batch, step, args)


class NanToyRecipe(ToyRecipe):
    """``toy`` whose run diverges: its losses and a metric are NaN or infinite."""

    def train_step(self, models, optimizers, batch, step, args):
        losses = super().train_step(models, optimizers, batch, step, args)
        return {"mse": float("nan"), "ema": losses["ema"], "grad": float("inf")}

    def finish(self, models, args, out_dir):
        return {**super().finish(models, args, out_dir), "accuracy": float("nan")}
