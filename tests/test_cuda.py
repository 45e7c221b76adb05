"""The CUDA-only code paths: bf16 autocast, channels_last, the cache held in GPU memory with batched
augmentation there, pinned-memory loading, torch.compile, two folds sharing one GPU, and torchrun's
data-parallel training on two GPUs.
Skipped where there is no GPU (CI); run them on a lent GPU with `pytest tests/test_cuda.py`."""
import numpy as np
import pytest
import torch

from conftest import one_and_two_ranks, tiny_config, torchrun_cli
from multitask.data.dataset import RowImages, TrainBatches
from multitask.kfold import build_task, train_run
from multitask.inference import load_model, predict_probs
from multitask.run import RunDir, load_npz

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ("train.device=cuda", "train.amp=true", "train.channels_last=true")


def _check_round(out, n_train, n_test):
    run = RunDir(out)
    oof = load_npz(run.round_dir(0) / "oof.npz")
    assert sorted(oof["rows"].tolist()) == list(range(n_train))
    test = load_npz(run.round_dir(0) / "test_probs.npz")
    for p in list(oof.values()) + list(test.values()):
        if p.dtype.kind == "f":
            assert np.isfinite(p).all()
    np.testing.assert_allclose(test["p_age"].sum(1), 1, rtol=1e-4)
    assert len(test["p_mask"]) == n_test


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_torch_backend_with_the_cache_on_the_gpu(demo_root, tmp_path, compile_):
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", *GPU, "aug.backend=torch",
                      "data.cache_on_device=true", "train.ema=true", "train.epochs=2", f"train.compile={compile_}")
    train_run(cfg, tmp_path / "run")
    _check_round(tmp_path / "run", 12 * 7, 4 * 7)


def test_cache_on_device_batches_live_on_the_gpu(demo_root, tmp_path):
    cfg = tiny_config(demo_root, *GPU, "aug.backend=torch", "data.cache_on_device=true")
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    factors = np.zeros((40, 3), np.int64)
    batches = TrainBatches(cfg, RowImages.of(images), factors, torch.device("cuda"), seed=0)
    x, y = next(iter(batches.epoch(0)))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_albumentations_backend_with_pinned_workers(demo_root, tmp_path):
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", *GPU, "aug.backend=albumentations",
                      "data.num_workers=2")
    train_run(cfg, tmp_path / "run")
    _check_round(tmp_path / "run", 12 * 7, 4 * 7)


def test_two_folds_at_once_on_one_gpu(demo_root, tmp_path):
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", *GPU, "aug.backend=torch",
                      "data.cache_on_device=true", "train.folds=3", "train.jobs=2")
    train_run(cfg, tmp_path / "run")
    _check_round(tmp_path / "run", 12 * 7, 4 * 7)


def test_gpu_predictions_agree_with_the_cpu(demo_root, tmp_path):
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", *GPU, "train.amp=false", "train.fold=[0]")
    out = tmp_path / "run"
    train_run(cfg, out)
    task, heads = build_task(cfg)
    images = RowImages.of(np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    ckpt = RunDir(out).fold_dir(0, 0) / "best.pt"
    cpu = predict_probs(load_model(ckpt, cfg, task, heads, torch.device("cpu")), images, cfg, torch.device("cpu"))
    gpu = predict_probs(load_model(ckpt, cfg, task, heads, torch.device("cuda")), images, cfg, torch.device("cuda"))
    for name in cpu:  # fp32 on both (TF32 may round the GPU's convolutions)
        np.testing.assert_allclose(cpu[name], gpu[name], atol=2e-2)
    bf16 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": True})})
    gpu16 = predict_probs(load_model(ckpt, bf16, task, heads, torch.device("cuda")), images, bf16, torch.device("cuda"))
    for name in cpu:
        assert (cpu[name].argmax(1) == gpu16[name].argmax(1)).mean() >= 0.8


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ddp_on_two_gpus_matches_one_process(demo_root, tmp_path):
    """torchrun with 2 GPU processes (NCCL for the gradients, gloo beside it for the CPU sums at each
    epoch's end and the objects rank 0 hands out): a round, `mt resume` and a pseudo-label round
    finish, and the numbers stay near one process's (bf16 and half batches per process: loose)."""
    import pandas as pd

    settings, mt = torchrun_cli(tmp_path, "cuda", timeout=600)

    def metrics(out, r, k):
        return pd.read_csv(RunDir(out).fold_dir(r, k) / "metrics.csv")

    one_and_two_ranks(mt, settings, demo_root, tmp_path)
    for k in range(2):
        a, b = metrics(tmp_path / "one", 0, k), metrics(tmp_path / "two", 0, k)
        assert len(b) == 2 and np.isfinite(b["train_loss"]).all()
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0.15)
    _check_round(tmp_path / "two", 12 * 7, 4 * 7)
    mt("pseudo-label", "--run", tmp_path / "two", "--precision", "0", ranks=2)
    summary = pd.read_json(tmp_path / "two" / "round1" / "summary.json", typ="series")
    assert summary["folds_done"] == [0, 1] and summary["complete"]
