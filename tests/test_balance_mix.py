"""Class balance (weighted sampler, per-class loss weights) and batch MixUp / CutMix."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from multitask.config import ConfigError, LossCfg, MixCfg
from multitask.context import build_task
from multitask.data.augment import BatchMixer
from multitask.data.dataset import RowImages, TrainBatches
from multitask.data.sampling import class_weights, sample_weights
from multitask.kfold import train_run
from multitask.labels import mask_task
from multitask.losses import MultiHeadLoss, cross_entropy, make_loss

TASK = mask_task()
HEADS = TASK.heads("mask,gender,age")


def skewed_factors(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(3, n, p=[0.7, 0.15, 0.15]), rng.integers(0, 2, n),
                     rng.choice(3, n, p=[0.6, 0.35, 0.05])], 1)


def test_rows_with_a_missing_label_are_drawn_at_the_mean_weight_and_count_for_no_class():
    """Partial pseudo labels (-1 where a factor's confidence fell short) have no final class: they
    are drawn at the labelled rows' mean weight, and the classes are counted on labelled rows only."""
    f = skewed_factors(200)
    partial = np.concatenate([f, [[0, 1, -1]] * 50])
    labelled = (partial >= 0).all(1)
    w = sample_weights(TASK, HEADS, partial, "class", 1.0)
    alone = sample_weights(TASK, HEADS, f, "class", 1.0)
    np.testing.assert_allclose(w[~labelled], w[labelled].mean())
    # the labelled rows keep the proportions they have without the partial ones
    np.testing.assert_allclose(w[labelled] / w[labelled].sum(), alone)
    assert np.isclose(w.sum(), 1)


def test_a_head_sampler_counts_partial_rows_that_hold_its_factor():
    """Drawn by the mask head, a pseudo row sure of its mask but not of its age is a mask row like any
    other (it was drawn at the mean weight, and left out of the counts)."""
    f = np.array([[0, 0, 0]] * 8 + [[2, 1, 1]] * 2)
    partial = np.concatenate([f, [[2, 0, -1]] * 2])
    w = sample_weights(TASK, HEADS, partial, "mask", 1.0)
    mass = np.bincount(partial[:, 0], weights=w)
    np.testing.assert_allclose(mass[[0, 2]], [0.5, 0.5])  # 8 worn rows against 4 not worn, two of them partial
    np.testing.assert_allclose(w[-2:], w[-4:-2])


@pytest.mark.parametrize("by", ["class", "age"])
def test_sampler_weights_balance_the_chosen_classes(by):
    f = skewed_factors()
    w = sample_weights(TASK, HEADS, f, by, power=1.0)
    assert w.shape == (1000,) and np.isclose(w.sum(), 1)
    cls = TASK.encode(f) if by == "class" else f[:, 2]
    mass = np.bincount(cls, weights=w)
    present = mass[mass > 0]
    np.testing.assert_allclose(present, present.mean(), rtol=1e-9)  # power 1: every class drawn alike
    half = np.bincount(cls, weights=sample_weights(TASK, HEADS, f, by, power=0.5))
    counts = np.bincount(cls)
    assert half[counts.argmin()] < mass[counts.argmin()] and half[counts.argmin()] > counts.min() / 1000


def test_a_weighted_epoch_draws_rare_rows_more_often_and_is_seeded():
    f = skewed_factors(400)
    cfg = tiny_config(None, "aug.backend=torch", "train.batch_size=50")
    images = RowImages.of(np.zeros((400, 8, 8, 3), np.uint8))
    w = sample_weights(TASK, HEADS, f, "age", power=1.0)
    draws = lambda: torch.cat([y[:, 2] for _, y in TrainBatches(cfg, images, f.astype(np.float32), torch.device("cpu"),  # noqa: E731
                                                                     seed=3, weights=w).epoch(0)])
    ages = draws()
    assert (ages == 2).float().mean() > 0.2  # 5% of rows, a third of the draws
    assert torch.equal(ages, draws())


def test_class_weights_are_inverse_frequency_with_mean_one():
    w = class_weights(np.array([100, 50, 10, 0]), power=1.0)
    present = w[:3]
    assert np.isclose(present.mean(), 1) and present[2] > present[1] > present[0]
    np.testing.assert_allclose(present[2] / present[0], 10)
    assert w[3] == present.max()


def test_class_weights_scale_each_class_term_of_the_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([1.0, 3.0])
    plain = make_loss(LossCfg(name="ce"))(logits, target)
    weighted = make_loss(LossCfg(name="ce"), weights)(logits, target)
    logp = torch.log_softmax(logits, 1)
    assert weighted.item() == pytest.approx(-(logp[0, 0] + 3 * logp[1, 1]).item() / 2)
    assert plain.item() == pytest.approx(cross_entropy(logits, target).item())


def test_rows_without_a_heads_label_add_nothing_to_it():
    crit = MultiHeadLoss({"a": LossCfg(name="ce")}, partial=True)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, -5.0, 0.0]])
    total, _ = crit({"a": logits}, {"a": torch.tensor([0, 2, -1])})
    expected = cross_entropy(logits[:2], torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float())
    assert total.item() == pytest.approx(expected.item())


def test_sampler_and_class_weight_settings_are_checked(demo_root):
    with pytest.raises(ConfigError, match="train.sampler 'hair'"):
        build_task(tiny_config(demo_root, "train.sampler=hair"))
    with pytest.raises(ConfigError, match="soft_f1"):
        build_task(tiny_config(demo_root, "losses.age.name=soft_f1", "losses.age.class_weights=true"))


def mix_inputs(n=8):
    x = torch.rand(n, 3, 16, 16)
    targets = {"mask": torch.randint(0, 3, (n,)), "age": torch.randint(0, 3, (n,)),
               "aux_age": torch.rand(n, 1)}
    return x, targets


@pytest.mark.parametrize("cfg", [MixCfg(mixup_alpha=0.4), MixCfg(cutmix_alpha=1.0), MixCfg(mixup_alpha=0.4, cutmix_alpha=1.0)])
def test_mixed_targets_sum_to_one_per_head_and_follow_the_images(cfg):
    mixer = BatchMixer(cfg, {"mask": 3, "age": 3})
    for seed in range(5):
        x, t = mix_inputs()
        mx, mt = mixer(x, t, torch.Generator().manual_seed(seed))
        for head in ("mask", "age"):
            torch.testing.assert_close(mt[head].sum(1), torch.ones(8))
        # the share of each row's own label equals the share of its own picture (own label weight = λ,
        # other row's = 1 − λ, or a row mixed with itself)
        own = mt["mask"][torch.arange(8), t["mask"]]
        assert ((own >= 0) & (own <= 1 + 1e-6)).all()
        if cfg.cutmix_alpha and not cfg.mixup_alpha:
            same = (mx == x).all(1).float().mean((1, 2))  # share of unchanged pixels
            changed = (own < 1 - 1e-6) & (mt["mask"].max(1).values < 1)
            assert torch.allclose(same[changed], own[changed], atol=0.1)
        assert mt["aux_age"].shape == (8, 1)


@pytest.mark.parametrize("cfg", [MixCfg(mixup_alpha=0.4), MixCfg(cutmix_alpha=1.0), MixCfg(mixup_alpha=0.4, cutmix_alpha=1.0)])
def test_mixed_targets_are_the_shares_of_the_mixed_pictures(cfg):
    # each picture is its mask label's one-hot colour: a mixed picture's mean colour is then exactly
    # the share of each label in it, which its mixed target must be. A row without a mask label (-1,
    # a partial pseudo label) is a black picture: whatever it is mixed into has a share of unknown
    # class, so that row's mask target is unknown (zeros), never a target summing to λ that the loss
    # would take for a label. The auxiliary number is a fourth channel, so it must mix as the pictures do.
    mixer = BatchMixer(cfg, {"mask": 3, "age": 3})
    unknown_met = 0
    for seed in range(5):
        _, t = mix_inputs()
        t["mask"][0] = -1
        colour = F.one_hot(t["mask"].clamp(min=0), 3).float() * (t["mask"] >= 0)[:, None]
        x = torch.cat([colour, t["aux_age"]], 1)[:, :, None, None].expand(-1, -1, 16, 16).contiguous()
        mx, mt = mixer(x, t, torch.Generator().manual_seed(seed))
        shares = mx.mean((2, 3))[:, :3]
        whole = (shares.sum(1) - 1).abs() < 1e-5  # no share of the black picture in it
        torch.testing.assert_close(shares[whole], mt["mask"][whole], atol=1e-5, rtol=0)
        assert (mt["mask"][~whole] == 0).all() and (mt["age"].sum(1) > 0.999).all()
        unknown_met += int((~whole).sum())
        torch.testing.assert_close(mx.mean((2, 3))[:, 3:], mt["aux_age"], atol=1e-5, rtol=0)
    assert unknown_met >= 5  # the unknown row itself, at least, in every draw


def test_mixing_stops_after_its_epoch_and_is_seeded():
    mixer = BatchMixer(MixCfg(mixup_alpha=0.4, stop_epoch=2), {"mask": 3})
    assert mixer.active(0) and mixer.active(1) and not mixer.active(2)
    assert not BatchMixer(MixCfg(), {"mask": 3}).active(0)
    x, t = mix_inputs()
    a = mixer(x, {"mask": t["mask"]}, torch.Generator().manual_seed(1))
    b = mixer(x, {"mask": t["mask"]}, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["mask"], b[1]["mask"])


def test_a_run_with_balance_and_mixing_trains(demo_root, tmp_path, monkeypatch):
    import multitask.engine as engine

    # what the fold's training hands its batches and its loss, to show the settings reach them
    seen = {}
    real_batches, real_loss = engine.TrainBatches, engine.MultiHeadLoss

    def batches(cfg, images, targets, device, seed, weights=None, shard=None):
        seen["draws"], seen["factors"] = weights, targets[:, :len(TASK.factors)].astype(np.int64)
        return real_batches(cfg, images, targets, device, seed, weights, shard)

    class SeeingLoss(real_loss):
        def __call__(self, outputs, targets):
            seen.setdefault("loss_targets", []).append(targets)
            return super().__call__(outputs, targets)

    def loss(cfgs, extra=None, class_weights=None, partial=False):
        seen["class_weights"] = class_weights
        return SeeingLoss(cfgs, extra, class_weights, partial)

    class CountingMixer(engine.BatchMixer):
        def __call__(self, x, targets, gen):
            seen.setdefault("generators", []).append(gen.initial_seed())
            out = super().__call__(x, targets, gen)
            seen.setdefault("mixed", []).append(out[1])
            return out

    monkeypatch.setattr(engine, "TrainBatches", batches)
    monkeypatch.setattr(engine, "MultiHeadLoss", loss)
    monkeypatch.setattr(engine, "BatchMixer", CountingMixer)
    cfg = tiny_config(demo_root, "train.fold=[0]", "train.epochs=2", "train.sampler=class",
                      "losses.age.class_weights=true", "aug.mix.mixup_alpha=0.4", "aug.mix.cutmix_alpha=1.0")
    train_run(cfg, tmp_path / "run")
    # the mixer reached every training batch, and the loss learned from its mixed targets
    assert len(seen["mixed"]) == len(seen["loss_targets"]) > 0
    assert all(m is t for m, t in zip(seen["mixed"], seen["loss_targets"]))
    assert any(((t["mask"] > 0) & (t["mask"] < 1)).any() for t in seen["loss_targets"])
    # each epoch mixes with its own draws (engine.mix_generator), the same on any device
    fold_seed = cfg.train.seed * 1000  # round 0, fold 0 (kfold.train_round_fold)
    firsts = sorted(set(seen["generators"]), key=seen["generators"].index)
    assert firsts == [engine.mix_generator(fold_seed, e).initial_seed() for e in range(2)]
    # the epoch is drawn by final class (the fold's own rows), rarer classes more often
    f = seen["factors"]
    np.testing.assert_allclose(seen["draws"], sample_weights(TASK, HEADS, f, "class", 0.5))
    counts = np.bincount(TASK.encode(f))[TASK.encode(f)]
    assert seen["draws"][counts.argmin()] > seen["draws"][counts.argmax()]
    # only the age head's loss is class-weighted, by the fold's age counts
    assert set(seen["class_weights"]) == {"age"}
    np.testing.assert_allclose(seen["class_weights"]["age"].numpy(),
                               class_weights(np.bincount(f[:, 2], minlength=3), 0.5), rtol=1e-6)
