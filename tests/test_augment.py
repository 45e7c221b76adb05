import numpy as np
import pytest
import torch

from multitask.config import ConfigError, TorchAugCfg
from multitask.data.augment import augment_batch, build_albumentations, tta_view
from multitask.data.dataset import AugmentedImages, RowImages


def test_torch_augment_is_seeded_and_stays_in_range():
    x = torch.rand(4, 3, 16, 12)
    a = augment_batch(x.clone(), TorchAugCfg(), torch.Generator().manual_seed(0))
    b = augment_batch(x.clone(), TorchAugCfg(), torch.Generator().manual_seed(0))
    c = augment_batch(x.clone(), TorchAugCfg(), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_torch_augment_identity_settings_change_nothing_but_flip():
    x = torch.rand(3, 3, 8, 8)
    still = TorchAugCfg(hflip=0, scale=(1, 1), translate=0, rotate=0, brightness=0, contrast=0)
    torch.testing.assert_close(augment_batch(x.clone(), still, torch.Generator()), x, atol=1e-5, rtol=0)
    flip = still.model_copy(update={"hflip": 1.0})
    torch.testing.assert_close(augment_batch(x.clone(), flip, torch.Generator()), x.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(tta_view(x, "hflip"), x.flip(-1))


def test_torch_rotation_keeps_distances_in_a_picture_that_is_not_square():
    """A rotation, not a shear: two dots on a 48x96 picture stay as far from the centre as they
    were, in pixels, whatever the angle drawn (the normalised grid's x and y differ in pixels)."""
    turn = TorchAugCfg(hflip=0, scale=(1, 1), translate=0, rotate=60, brightness=0, contrast=0)
    for seed in range(4):
        for dy, dx in ((0, 16), (16, 0)):
            x = torch.zeros(1, 3, 48, 96)
            x[0, :, 24 + dy - 1:24 + dy + 1, 48 + dx - 1:48 + dx + 1] = 1  # a 2x2 dot, the centre between pixels
            out = augment_batch(x, turn, torch.Generator().manual_seed(seed))[0, 0]
            ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(96.0), indexing="ij")
            near = ((ys - 23.5) ** 2 + (xs - 47.5) ** 2) < 22 ** 2  # the reflection padding mirrors a dot into a corner
            w = out * near / (out * near).sum()
            cy, cx = float((w * ys).sum()) - 23.5, float((w * xs).sum()) - 47.5
            assert abs((cy ** 2 + cx ** 2) ** 0.5 - 16) < 0.5, (seed, dy, dx, cy, cx)


def test_unknown_albumentations_transform_is_a_config_error():
    with pytest.raises(ConfigError, match="'Sparkle' is not an albumentations transform"):
        build_albumentations([{"name": "Sparkle"}])


def test_albumentations_dataset_is_deterministic_per_epoch():
    imgs = np.random.default_rng(0).integers(0, 255, (6, 16, 12, 3), dtype=np.uint8)
    specs = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomBrightnessContrast", "p": 1.0}]
    a = AugmentedImages(RowImages.of(imgs), np.zeros((6, 3)), specs, seed=0)
    b = AugmentedImages(RowImages.of(imgs), np.zeros((6, 3)), specs, seed=0)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(6))
    first = [a[i][0] for i in range(6)]
    a.set_epoch(1)
    assert any(not torch.equal(first[i], a[i][0]) for i in range(6))


def test_albumentations_batches_are_the_same_in_the_main_process_and_in_workers():
    from multitask.config import load_config
    from multitask.data.dataset import TrainBatches

    imgs = np.random.default_rng(0).integers(0, 255, (10, 16, 12, 3), dtype=np.uint8)
    targets = np.arange(30, dtype=np.float32).reshape(10, 3)
    specs = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomBrightnessContrast", "p": 1.0}]
    a = AugmentedImages(RowImages.of(imgs), targets, specs, seed=0)
    rows = np.array([7, 2, 5])
    x, y = a.batch(rows)
    assert torch.equal(x, torch.stack([a[i][0] for i in rows])) and torch.equal(y, torch.stack([a[i][1] for i in rows]))

    def epoch(workers: int) -> list:
        cfg = load_config(None, ["aug.backend=albumentations", "train.batch_size=4", f"data.num_workers={workers}",
                                 f"aug.train={specs}".replace("'", "")])
        return list(TrainBatches(cfg, RowImages.of(imgs), targets, torch.device("cpu"), seed=3).epoch(1))

    main, workers = epoch(0), epoch(1)
    assert len(main) == len(workers) == 2  # 10 rows, batches of 4, the ragged tail dropped
    assert all(torch.equal(xm, xw) and torch.equal(ym, yw) for (xm, ym), (xw, yw) in zip(main, workers))


def test_a_row_drawn_twice_in_an_epoch_gets_two_pictures_whatever_the_workers():
    # the weighted sampler draws with replacement: here it can only draw row 0, at every position
    from multitask.config import load_config
    from multitask.data.dataset import TrainBatches

    imgs = np.random.default_rng(0).integers(0, 255, (8, 16, 12, 3), dtype=np.uint8)
    targets = np.arange(24, dtype=np.float32).reshape(8, 3)
    weights = np.eye(8)[0]
    specs = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomBrightnessContrast", "p": 1.0}]

    def epoch(workers: int) -> list:
        cfg = load_config(None, ["aug.backend=albumentations", "train.batch_size=4", f"data.num_workers={workers}",
                                 f"aug.train={specs}".replace("'", "")])
        return list(TrainBatches(cfg, RowImages.of(imgs), targets, torch.device("cpu"), seed=3,
                                 weights=weights).epoch(1))

    main, workers = epoch(0), epoch(2)
    x = torch.cat([b[0] for b in main])
    assert len(x) == 8 and (torch.cat([b[1] for b in main]) == torch.as_tensor(targets[0])).all()
    assert len({bytes(p.numpy()) for p in x}) == 8  # eight draws of one row, eight different pictures
    assert all(torch.equal(xm, xw) and torch.equal(ym, yw) for (xm, ym), (xw, yw) in zip(main, workers))
    a = AugmentedImages(RowImages.of(imgs), targets, specs, seed=0)
    assert not torch.equal(a[(0, 5)][0], a[(1, 5)][0]) and torch.equal(a[(0, 5)][1], a[(1, 5)][1])


@pytest.mark.parametrize("backend", ["torch", "albumentations"])
def test_torchrun_shares_of_a_batch_are_augmented_as_one_process_would(backend):
    """Two ranks each take every other image of a batch: together they must see the one process's
    pictures, augmented alike (the torch backend drew each rank's share anew, so the ranks' first
    images were flipped and turned alike)."""
    from multitask.config import load_config
    from multitask.data.dataset import TrainBatches

    imgs = np.random.default_rng(0).integers(0, 255, (10, 16, 12, 3), dtype=np.uint8)
    targets = np.arange(30, dtype=np.float32).reshape(10, 3)
    cfg = load_config(None, [f"aug.backend={backend}", "train.batch_size=4"])

    def epoch(shard):
        return list(TrainBatches(cfg, RowImages.of(imgs), targets, torch.device("cpu"), seed=3, shard=shard).epoch(1))

    one, ranks = epoch(None), [epoch((r, 2)) for r in range(2)]
    for b, (x, y) in enumerate(one):
        torch.testing.assert_close(x[0::2], ranks[0][b][0])
        torch.testing.assert_close(x[1::2], ranks[1][b][0])
        assert torch.equal(y[0::2], ranks[0][b][1]) and torch.equal(y[1::2], ranks[1][b][1])


def test_row_images_take_from_several_caches_in_order():
    t = np.arange(4)[:, None, None, None] * np.ones((4, 2, 2, 3), np.uint8)
    e = 100 + np.arange(3)[:, None, None, None] * np.ones((3, 2, 2, 3), np.uint8)
    rows = RowImages.of(t, np.array([3, 1])).concat(RowImages.of(e, np.array([2, 0])))
    assert [int(v) for v in rows.take(np.array([2, 0, 3, 1]))[:, 0, 0, 0]] == [102, 3, 100, 1]


def test_torch_backend_batches_match_rows_across_caches():
    from multitask.config import load_config
    from multitask.data.dataset import TrainBatches

    t = (np.arange(5)[:, None, None, None] * np.ones((5, 4, 4, 3))).astype(np.uint8)
    e = (100 + np.arange(3)[:, None, None, None] * np.ones((3, 4, 4, 3))).astype(np.uint8)
    images = RowImages.of(t, np.array([0, 2, 4])).concat(RowImages.of(e, np.array([1, 2])))
    targets = np.array([[0, 0, 0], [0, 0, 2], [0, 0, 4], [0, 1, 1], [0, 1, 2]])  # last column = pixel id
    still = ["aug.torch.hflip=0", "aug.torch.scale=[1, 1]", "aug.torch.translate=0", "aug.torch.rotate=0",
             "aug.torch.brightness=0", "aug.torch.contrast=0", "aug.backend=torch", "train.batch_size=2"]
    for on_device in (False, True):
        cfg = load_config(None, still + [f"data.cache_on_device={on_device}"])
        seen = []
        for x, y in TrainBatches(cfg, images, targets, torch.device("cpu"), seed=0).epoch(0):
            pixel = (x[:, 0, 0, 0] * 255).round().long()
            expected = torch.where(y[:, 1] == 1, 100 + y[:, 2], y[:, 2])
            assert torch.equal(pixel, expected)
            seen += pixel.tolist()
        assert len(seen) == 4  # 5 rows, batches of 2, the ragged tail dropped
