"""Prediction: the same probabilities whether batches come from the memory map or from the device's
copy of the caches; TTA views averaged; soft voting."""
import numpy as np
import pandas as pd
import torch

from conftest import tiny_config
from multitask.data.dataset import RowImages
from multitask.kfold import build_task
from multitask.model import build_model
from multitask.inference import predict_probs, soft_vote


def test_device_copy_and_memory_map_give_the_same_probabilities():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    images = RowImages.of(a, np.array([8, 1, 3])).concat(RowImages.of(b, np.array([4, 0])))
    images = images.concat(RowImages.of(a, np.array([2])))
    cfg = tiny_config(".", "train.eval_batch_size=4", "aug.tta=[none, hflip]")
    _, heads = build_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, heads).eval()
    host = predict_probs(model, images, cfg, torch.device("cpu"))
    on_device = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_on_device": True})})
    dev = predict_probs(model, images, on_device, torch.device("cpu"))
    for name in host:
        assert host[name].shape == (6, {"mask": 3, "gender": 2, "age": 3}[name])
        np.testing.assert_array_equal(host[name], dev[name])
        np.testing.assert_allclose(host[name].sum(1), 1, rtol=1e-5)
    # the average of the two views, row by row, in the asked order
    rows = np.stack([images[i] for i in range(len(images))])
    x = torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        plain, flipped = model(x), model(x.flip(-1))
    expected = (plain["age"].softmax(1) + flipped["age"].softmax(1)) / 2
    np.testing.assert_allclose(host["age"], expected.numpy(), atol=1e-6)


def test_a_device_copy_is_shared_while_its_cache_lives_and_let_go_with_it():
    # mt tune reads its caches afresh for every trial: copies kept for good would fill the GPU
    import gc

    from multitask.data import dataset
    from multitask.data.dataset import device_copy

    cpu, before = torch.device("cpu"), len(dataset._DEVICE_COPIES)
    cache = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    first = device_copy(cache, cpu)
    assert device_copy(cache, cpu) is first and len(dataset._DEVICE_COPIES) == before + 1
    del cache
    gc.collect()
    assert len(dataset._DEVICE_COPIES) == before


def test_soft_vote_averages_each_head_over_folds():
    folds = [{"h": np.array([[0.9, 0.1]])}, {"h": np.array([[0.3, 0.7]])}]
    np.testing.assert_allclose(soft_vote(folds)["h"], [[0.6, 0.4]])


def test_prediction_streams_in_bounded_memory(demo_root, tmp_path):
    """1,500 images predicted at 192x192 (166 MB decoded at once): streamed 128 at a time, the peak
    memory the images take stays a fraction of that, and the predictions are the same."""
    import tracemalloc

    from PIL import Image

    from conftest import tiny_config
    from multitask.kfold import train_run
    from multitask.predict import predict_images

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, "data.img_size=[192, 192]", "train.fold=[0]", "aug.tta=[none]",
                          f"data.cache_dir={tmp_path / 'cache'}"), out)
    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1500):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    # the peak of numpy's allocations while predicting (tracemalloc sees them; torch's own buffers and
    # thread caches, which vary with the machine, it does not)
    peak = {}
    for chunk in (128, 100_000):
        tracemalloc.start()
        try:
            predict_images(out, images, tmp_path / f"p{chunk}.csv", round=0, chunk=chunk)
            peak[chunk] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    decoded = 1500 * 192 * 192 * 3
    # all at once holds every decoded image; 128 at a time, a fraction of them
    assert peak[100_000] > decoded and peak[128] < 0.4 * decoded, (peak, decoded)
    a, b = pd.read_csv(tmp_path / "p128.csv"), pd.read_csv(tmp_path / "p100000.csv")
    assert len(a) == 1500
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)


def test_predict_elsewhere_than_the_run_trained_and_without_keeping_device_copies(demo_root, tmp_path):
    """A run trained on a GPU (`train.device` in its config) is predicted on a machine without one
    with --device; chunks are not kept in the process-wide copies of training's caches."""
    import pytest
    from typer.testing import CliRunner

    from multitask.cli import app
    from multitask.config import ConfigError
    from multitask.data import dataset
    from multitask.kfold import train_run
    from multitask.predict import predict_images
    from multitask.run import RunDir

    run = tmp_path / "run"
    train_run(tiny_config(demo_root, "data.cache_on_device=true", f"data.cache_dir={tmp_path / 'cache'}"), run)
    config = RunDir(run).config
    config.write_text(config.read_text().replace("device: cpu", "device: cuda:7"))  # as trained on a big machine
    images = demo_root / "eval" / "images"
    with pytest.raises(ConfigError, match="mt predict --device cpu"):
        predict_images(run, images, tmp_path / "p.csv")
    copies = len(dataset._DEVICE_COPIES)
    result = predict_images(run, images, tmp_path / "p.csv", chunk=4, device="cpu")
    assert result["predicted"] == len(list(images.iterdir())) and len(dataset._DEVICE_COPIES) == copies
    done = CliRunner().invoke(app, ["predict", "--run", str(run), "--images", str(images), "--out",
                                    str(tmp_path / "cli.csv"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    # the folds as the first chunk found them, for every chunk: a fold another shell finishes (or
    # takes away) meanwhile would vote the later chunks alone
    import numpy as np

    import multitask.predict as predict_mod
    from multitask.run import read_json, write_json

    summary_path = RunDir(run).round_dir(0) / "summary.json"
    summary = read_json(summary_path)
    real, calls = predict_mod.run_outputs, []

    def outputs_then_a_fold_goes(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        write_json(summary_path, summary | {"folds_done": summary["folds_done"][:1]})
        return out

    predict_mod.run_outputs = outputs_then_a_fold_goes
    try:
        chunked = predict_images(run, images, tmp_path / "chunked.csv", chunk=4, device="cpu", with_probs=True)
    finally:
        predict_mod.run_outputs = real
        write_json(summary_path, summary)
    whole = predict_images(run, images, tmp_path / "whole.csv", device="cpu", with_probs=True)
    assert len(calls) > 1 and chunked["predicted"] == whole["predicted"]
    a, b = pd.read_csv(tmp_path / "chunked.csv"), pd.read_csv(tmp_path / "whole.csv")
    probs = [c for c in a.columns if c.startswith("p_")]
    assert probs and np.allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "cli.csv"))


def test_a_kill_as_the_predictions_are_renamed_leaves_no_listing_of_other_images(tmp_path, monkeypatch):
    """An earlier `--skip-bad` run's listing, then a new run killed at its file's rename: the new
    listing was already in place beside the old predictions (naming images that file holds)."""
    import os

    import pytest

    from multitask.labels import mask_task
    from multitask.outputs import stream_predictions

    task = mask_task()
    out, listing = tmp_path / "preds.csv", tmp_path / "preds.skipped.csv"
    out.write_text("old predictions\n")
    listing.write_text("path,reason\nold.jpg,bad\n")

    def decode(part):
        return part, [(i, "cannot decode") for i, p in enumerate(part) if p.startswith("bad")]

    def predict(decoded, keep):
        probs = np.full((len(keep), task.n_classes), 1 / task.n_classes)
        return probs, np.zeros(len(keep), int)

    replace = os.replace

    def killed(src, dst):
        if str(dst) == str(out):
            raise KeyboardInterrupt("killed at the rename")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        stream_predictions(task, ["a", "b"], ["ok.jpg", "bad.jpg"], out, 8, decode, predict, skip_bad=True)
    assert out.read_text() == "old predictions\n" and not listing.exists()
    monkeypatch.setattr(os, "replace", replace)
    stream_predictions(task, ["a", "b"], ["ok.jpg", "bad.jpg"], out, 8, decode, predict, skip_bad=True)
    assert listing.read_text().splitlines() == ["path,reason", "b,cannot decode"]
