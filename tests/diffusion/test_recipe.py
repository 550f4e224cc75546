"""The `diffusion` training recipe, driven by a minimal loop (what the generic trainer does)."""
import argparse

import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn (load_digits) is needed by the diffusion recipe")

from leedl_fast.diffusion.recipe import RECIPES, DiffusionRecipe  # noqa: E402
from leedl_fast.digits import load_digits  # noqa: E402


def _loop(recipe, args):
    models = recipe.build(args, args.device)
    opts = recipe.optimizers(models, args)
    loader = torch.utils.data.DataLoader(recipe.dataset(args), batch_size=args.batch_size, shuffle=True)
    losses = []
    for step, batch in zip(range(args.steps), loader):
        out = recipe.train_step(models, opts, batch, step, args)
        losses.append(out)
    return models, losses


def test_data():
    x, y = load_digits("all")
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min().item() == -1.0 and x.max().item() == 1.0 and set(y.tolist()) == set(range(10))


def test_recipe_runs_end_to_end(torch_path, tmp_path):
    assert RECIPES["diffusion"] is DiffusionRecipe
    recipe = DiffusionRecipe()
    args = argparse.Namespace(steps=3, batch_size=16, lr=1e-3, seed=0, device="cpu", out=tmp_path, eval_per_class=1)
    models, losses = _loop(recipe, args)
    assert set(models) == {"unet", "ema", "classifier"}
    assert len(losses) == 3 and all(set(d) == {"loss", "classifier_loss"} for d in losses)
    assert all(torch.isfinite(torch.tensor(list(d.values()))).all() for d in losses)
    # the EMA moved towards the trained weights but is not them
    ema, unet = dict(models["ema"].named_parameters()), dict(models["unet"].named_parameters())
    assert not torch.equal(ema["conv_out.weight"], unet["conv_out.weight"])
    assert not all(p.requires_grad for p in ema.values())

    metrics = recipe.finish(models, args, tmp_path)
    assert 0.0 <= metrics["sample_accuracy"] <= 1.0 and 0.0 <= metrics["classifier_data_accuracy"] <= 1.0
    assert (tmp_path / "samples.png").stat().st_size > 0

    # a checkpoint round trip: the same EMA samples from reloaded weights
    state = {k: m.state_dict() for k, m in models.items()}
    fresh = recipe.build(args, "cpu")
    for k, m in fresh.items():
        m.load_state_dict(state[k])
    labels = torch.tensor([3, 7])
    a = recipe.generate(models["ema"], labels, steps=4, seed=1)
    b = recipe.generate(fresh["ema"], labels, steps=4, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 1, 8, 8) and a.abs().max() <= 1

    guided = recipe.generate(models["ema"], labels, steps=4, seed=1, guidance=1.5)  # classifier-free guidance
    assert guided.shape == (2, 1, 8, 8) and not torch.equal(guided, a)

    png = tmp_path / "grid.png"
    recipe.sample(fresh, argparse.Namespace(sampler="ddpm", steps=5, seed=2, eval_per_class=1), png)
    assert png.stat().st_size > 0
    with pytest.raises(ValueError, match="sampler"):
        recipe.generate(models["ema"], labels, sampler="euler")
    assert recipe.state_dict() == {}
