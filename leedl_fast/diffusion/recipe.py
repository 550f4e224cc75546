"""``leedl-fast train diffusion``: a class-conditional DDPM on scikit-learn's 8x8 digits.

What the run does (defaults in ``DiffusionRecipe.defaults``):

* data: the 1797 bundled 8x8 digit images (``sklearn.datasets.load_digits``), grey
  levels 0..16 mapped linearly to [-1, 1], with their labels;
* model: ``UNet`` (base 32 channels, 8x8 and 4x4 levels, attention at 4x4), trained
  with the epsilon objective of ``training_loss`` on a cosine schedule of 1000 steps,
  labels replaced by a "no class" token 10% of the time so the same network also
  predicts unconditionally (classifier-free guidance, Ho & Salimans 2022, is then
  available with ``guidance > 0``; off by default: plain conditional samples already
  score well above 80%, and guidance doubles the sampling cost);
  AdamW, linear warm-up then cosine decay; an EMA of the weights (kept as the
  module ``models["ema"]``, so checkpoints carry it);
* a small CNN digit classifier trained in the same steps on the same batches;
* ``finish``: samples ``eval_per_class`` images of every digit with the EMA model
  (DDIM, 25 steps), saves a grid PNG (one row per digit) and
  prints the fraction the classifier labels as the digit asked for.
"""
from __future__ import annotations

import copy
import math
import pathlib

import torch
from torch import nn
from torch.nn import functional as F

from ..digits import DigitClassifier, load_digits, save_grid
from ..training import IMAGE_SUFFIXES, UsageError, recipe_arg, unwrap
from .loss import training_loss
from .samplers import DDIMSampler, DDPMSampler
from .schedule import NoiseSchedule
from .unet import UNet

__all__ = ["DiffusionRecipe", "RECIPES"]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no label" token of classifier-free guidance


class DiffusionRecipe:
    """Class-conditional diffusion on the 8x8 digits: a small UNet, its EMA, and a digit classifier that scores
    the samples (see the module docstring)."""

    name = "diffusion"
    sample_suffixes = IMAGE_SUFFIXES
    # --steps sets the learning-rate schedule: a resume with another value warns (leedl_fast.training).
    args_that_change_results = ("steps",)
    defaults = {"steps": 500, "batch_size": 128, "lr": 2e-3}
    # Further knobs read from args when present (the CLI may not expose them).
    base_channels = 32
    ema_decay = 0.995
    label_dropout = 0.1
    guidance = 0.0  # classifier-free guidance scale at sampling (0: plain conditional sampling)
    eval_per_class = 20
    eval_steps = 25
    warmup = 50

    def __init__(self):
        self.schedule = NoiseSchedule(1000, "cosine")

    # -- training ---------------------------------------------------------------------------------
    def build(self, args, device) -> dict[str, nn.Module]:
        unet = UNet(1, base_channels=recipe_arg(args, "base_channels", self.base_channels), channel_mults=(1, 2),
                    num_res_blocks=1, head_dim=32, num_classes=NUM_CLASSES + 1).to(device)
        ema = copy.deepcopy(unet).requires_grad_(False).eval()
        return {"unet": unet, "ema": ema, "classifier": DigitClassifier().to(device)}

    def optimizers(self, models, args) -> dict[str, torch.optim.Optimizer]:
        return {"unet": torch.optim.AdamW(models["unet"].parameters(), lr=args.lr, weight_decay=0.0),
                "classifier": torch.optim.Adam(models["classifier"].parameters(), lr=2e-3)}

    def dataset(self, args) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(*load_digits("all"))

    def _lr(self, step: int, args) -> float:
        # Linear warm-up, then cosine decay to 5% of the peak over the run.
        total = max(int(args.steps), 1)
        if step < self.warmup:
            return args.lr * (step + 1) / self.warmup
        frac = min((step - self.warmup) / max(total - self.warmup, 1), 1.0)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self, models, optimizers, batch, step, args) -> dict[str, float]:
        unet, ema, clf = models["unet"], models["ema"], models["classifier"]
        device = next(unwrap(unet).parameters()).device
        x, y = (b.to(device) for b in batch)
        if self.schedule.device != device:
            self.schedule.to(device)

        opt = optimizers["unet"]
        for group in opt.param_groups:
            group["lr"] = self._lr(step, args)
        drop = torch.rand(y.shape, device=device) < self.label_dropout
        loss = training_loss(unet, x, self.schedule, class_labels=torch.where(drop, NULL_CLASS, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

        # EMA with the usual warm-up of the decay, so early averages are not dominated by the init.
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(unwrap(ema).parameters(), unwrap(unet).parameters()):
                pe.lerp_(p.detach(), 1 - decay)
            for be, b in zip(unwrap(ema).buffers(), unwrap(unet).buffers()):
                be.copy_(b)

        # The judge: a classifier on the same batch, with a little noise so it tolerates imperfect samples.
        clf.train()
        copt = optimizers["classifier"]
        logits = clf(x + 0.1 * torch.randn_like(x))
        closs = F.cross_entropy(logits, y)
        copt.zero_grad(set_to_none=True)
        closs.backward()
        copt.step()
        return {"loss": float(loss.detach()), "classifier_loss": float(closs.detach())}

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: nn.Module, labels: torch.Tensor, *, sampler: str = "ddim", steps: int | None = None,
                 guidance: float | None = None, seed: int | None = 0) -> torch.Tensor:
        """Class-conditional samples (len(labels), 1, 8, 8) in [-1, 1] from ``model`` (the EMA UNet)."""
        model = unwrap(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        if self.schedule.device != device:
            self.schedule.to(device)
        labels = labels.to(device)
        w = self.guidance if guidance is None else guidance
        if sampler == "ddim":
            s = DDIMSampler(self.schedule, self.eval_steps if steps is None else steps)
        elif sampler == "ddpm":
            s = DDPMSampler(self.schedule, steps)  # steps=None: the full ancestral chain (1000 steps)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        null = torch.full_like(labels, NULL_CLASS)

        def model_fn(x, t):
            if w == 0:
                return model(x, t, labels)
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            return cond + w * (cond - uncond)  # = uncond + (1 + w)(cond - uncond)

        out = s.generate(model_fn, (labels.shape[0], 1, 8, 8), seed=seed, device=device)
        model.train(was_training)
        return out.clamp(-1, 1)

    def finish(self, models, args, out_dir: pathlib.Path) -> dict[str, float]:
        per_class = int(recipe_arg(args, "eval_per_class", self.eval_per_class))
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        samples = self.generate(models["ema"], labels, seed=int(recipe_arg(args, "seed", 0)),
                                guidance=float(recipe_arg(args, "guidance", self.guidance)))
        clf = unwrap(models["classifier"]).eval()
        with torch.no_grad():
            pred = clf(samples).argmax(-1).cpu()
            x, y = load_digits("all")
            dev = next(clf.parameters()).device
            train_acc = (clf(x.to(dev)).argmax(-1).cpu() == y).float().mean().item()
        acc = (pred == labels).float().mean().item()
        out_dir = pathlib.Path(out_dir)
        save_grid(samples, out_dir / "samples.png", nrow=per_class)
        print(f"diffusion: classifier labels {acc:.1%} of {len(labels)} class-conditional samples as the digit "
              f"asked for (classifier accuracy on the data: {train_acc:.1%}); grid: {out_dir / 'samples.png'}")
        return {"sample_accuracy": acc, "classifier_data_accuracy": train_acc}

    def check_sample_args(self, args) -> None:
        """``UsageError`` for ``--steps`` or ``--per-class`` out of range, before any model is built."""
        steps, t = getattr(args, "steps", None), self.schedule.num_train_timesteps
        if steps is not None and not 1 <= steps <= t:
            raise UsageError(f"--steps must be in [1, {t}] (the schedule's timesteps), got {steps}")
        per_class = recipe_arg(args, "eval_per_class", 10)
        if per_class < 1:
            raise UsageError(f"--per-class must be >= 1, got {per_class}")

    def sample(self, models, args, out_path: pathlib.Path) -> None:
        """A grid of samples, one row per digit, from the EMA model: ``--sampler ddim|ddpm --steps N``
        (DDIM: 25 steps by default; DDPM: the full 1000-step chain by default)."""
        per_class = int(recipe_arg(args, "eval_per_class", 10))
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        sampler = recipe_arg(args, "sampler", "ddim")
        steps = getattr(args, "steps", None)
        model = models.get("ema", models["unet"])
        images = self.generate(model, labels, sampler=sampler, steps=steps, seed=getattr(args, "seed", None),
                               guidance=float(recipe_arg(args, "guidance", self.guidance)))
        save_grid(images, pathlib.Path(out_path), nrow=per_class)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d) -> None:
        pass


RECIPES = {"diffusion": DiffusionRecipe}
