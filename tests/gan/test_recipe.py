"""The demo recipes run end to end (a few steps, with a loop standing in for the CLI trainer)."""
import argparse

import pytest
import torch

from leedl_fast.gan.recipe import (RECIPES, CYCLE_L1_THRESHOLD, CycleGANRecipe, GANRecipe, cycle_thresholds, load_digits,
                                   save_grid, thicken)


def _run(recipe, tmp_path, steps, batch_size):
    args = argparse.Namespace(**{**recipe.defaults, "steps": steps, "batch_size": batch_size}, seed=0, device="cpu",
                              out=tmp_path)
    models = recipe.build(args, torch.device("cpu"))
    optimizers = recipe.optimizers(models, args)
    loader = torch.utils.data.DataLoader(recipe.dataset(args), batch_size=batch_size, shuffle=True, drop_last=True)
    for step, batch in zip(range(steps), loader):
        losses = recipe.train_step(models, optimizers, batch, step, args)
        assert losses and all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in losses.values())
    return models, args


def test_recipes_are_registered():
    assert RECIPES == {"gan": GANRecipe, "cyclegan": CycleGANRecipe}
    for cls in RECIPES.values():
        assert cls.name in RECIPES and {"steps", "batch_size", "lr"} <= set(cls.defaults)


def test_gan_recipe_runs_and_reports_class_accuracy(tmp_path, capsys):
    recipe = GANRecipe()
    recipe.samples_per_class, recipe.classifier_epochs = 4, 1
    models, args = _run(recipe, tmp_path, steps=3, batch_size=16)
    metrics = recipe.finish(models, args, tmp_path)
    assert set(metrics) == {"class_accuracy", "classifier_test_accuracy"}
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    assert metrics["classifier_test_accuracy"] > 0.5  # even one epoch of the CNN is far above chance (0.1)
    assert (tmp_path / "gan_samples.png").stat().st_size > 0
    assert "labels" in capsys.readouterr().out
    recipe.sample(models, args, tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()
    fresh = GANRecipe()
    fresh.load_state_dict(recipe.state_dict())
    assert fresh.last_loss_G == recipe.last_loss_G


def test_cyclegan_recipe_runs_and_reports_cycle_error(tmp_path, capsys):
    recipe = CycleGANRecipe()
    models, args = _run(recipe, tmp_path, steps=2, batch_size=4)
    metrics = recipe.finish(models, args, tmp_path)
    assert metrics["cycle_l1_threshold"] == CYCLE_L1_THRESHOLD
    assert 0.0 <= metrics["cycle_l1"] <= 1.0 and metrics["identity_l1"] > 0.1
    for name in ("cyclegan_A_to_B.png", "cyclegan_B_to_A.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "cycle reconstruction error" in capsys.readouterr().out
    fresh = CycleGANRecipe()
    fresh.load_state_dict(recipe.state_dict())
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(fresh.fake_A_pool.query(x), recipe.fake_A_pool.query(x))


def test_digits_helpers(tmp_path):
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert float(x_tr.min()) == -1.0 and float(x_tr.max()) == 1.0
    x = torch.full((1, 1, 5, 4), -1.0)
    x[0, 0, 2, 1] = 0.5
    t = thicken(x)
    lit = {(i, j) for i in range(5) for j in range(4) if t[0, 0, i, j] == 0.5}
    assert lit == {(2, 1), (1, 1), (3, 1), (2, 0), (2, 2)} and float(t.min()) == -1.0  # the pixel and its 4 neighbours
    with pytest.raises(ValueError, match="split"):
        load_digits("val")
    assert save_grid(torch.rand(5, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=3).stat().st_size > 0


def test_cycle_threshold_is_the_class_prototype_error():
    ref = cycle_thresholds()
    assert abs(ref["class_mean_l1"] - CYCLE_L1_THRESHOLD) < 1e-4
    assert ref["nearest_train_l1"] < ref["class_mean_l1"]
