"""The 'transformer' demo recipe: data, a short training run with a plain loop, evaluation, sampling."""
import argparse

import torch

from leedl_fast.seq2seq import recipe as R


def test_dataset_is_reversal():
    ds = R.ReverseDigits(300, seed=3)
    strings = ds.strings
    assert len(ds) == 300 and len(set(len(s) for s in strings)) > 5
    for i in range(300):
        src, tgt = ds[i]
        s = strings[i]
        assert R.MIN_LEN <= len(s) <= R.MAX_LEN
        assert src.tolist() == [int(c) for c in s] + [R.PAD] * (R.MAX_LEN - len(s))
        assert tgt[0] == R.BOS and tgt[len(s) + 1] == R.EOS and R.decode(tgt[1:]) == s[::-1]
        assert (tgt[len(s) + 2:] == R.PAD).all()
    assert torch.equal(R.ReverseDigits(300, seed=3).src, ds.src)
    held = R.held_out(strings, 200, seed=9)
    assert len(held) == 200 and not set(held) & set(strings)


def test_recipe_short_run(torch_path, tmp_path, capsys):
    """A plain loop stands in for the trainer: the loss falls, finish prints samples and returns the accuracy."""
    recipe = R.RECIPES["transformer"]()
    assert recipe.name == "transformer" and recipe.defaults["steps"] > 0
    args = argparse.Namespace(**{**recipe.defaults, "steps": 60, "batch_size": 32}, seed=0, device="cpu",
                              out=tmp_path)
    torch.manual_seed(0)
    models = recipe.build(args, "cpu")
    opts = recipe.optimizers(models, args)
    ds = recipe.dataset(args)
    assert len(ds) == args.steps * args.batch_size
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True)
    losses = []
    for step, batch in zip(range(args.steps), loader):
        losses.append(recipe.train_step(models, opts, batch, step, args)["loss"])
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5
    recipe.eval_size = 50
    metrics = recipe.finish(models, args, tmp_path)
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert "exact match on 50 held-out strings" in capsys.readouterr().out
    recipe.sample(models, args, tmp_path / "samples.txt")
    lines = (tmp_path / "samples.txt").read_text().splitlines()
    assert len(lines) == 16 and all(" -> " in line for line in lines)
    assert recipe.state_dict() == {}


def test_translate_uses_cache_and_matches_teacher_forcing(torch_path):
    """Greedy decoding with the cache gives the argmax of the teacher-forced logits along its own output."""
    torch.manual_seed(1)
    model = R.ReverseTransformer().eval()
    src = torch.stack([R.encode("12345"), R.encode("907")])
    out = model.translate(src)
    bos = torch.full((2, 1), R.BOS)
    tgt_in = torch.cat([bos, out[:, :-1]], dim=1)
    with torch.no_grad():
        greedy = model(src, tgt_in).argmax(-1)
    finished = torch.cumsum((out == R.EOS).long(), 1) - (out == R.EOS).long() > 0  # after the first EOS
    assert torch.equal(greedy[~finished], out[~finished])
