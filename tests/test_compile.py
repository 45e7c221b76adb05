"""train.compile on the CPU: the torch.compile path runs in CI too (inductor's CPU backend), and a
compiled fold learns what the eager fold learns. The CUDA variant is in tests/test_cuda.py."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from multitask.data.dataset import RowImages
from multitask.kfold import build_task, train_run
from multitask.model import build_model
from multitask.inference import predict_probs
from multitask.run import RunDir, load_npz

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="inductor's CPU backend needs a C++ compiler")


def test_a_compiled_fold_matches_the_eager_fold(demo_root, tmp_path, monkeypatch):
    import inspect

    # who compiles, and in which mode: the training step (engine.py) as well as prediction
    # (inference.py), or the match proves nothing. reduce-overhead's CUDA graphs are for a GPU; on the
    # CPU the mode is the default's kernels, but it must reach torch.compile on both paths
    callers, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *a, mode=None, **k: callers.append(
        (Path(inspect.stack()[2].filename).name, mode)) or real_compile(model, *a, mode=mode, **k))
    common = (f"data.cache_dir={tmp_path / 'cache'}", "aug.backend=torch", "train.fold=[0]", "train.epochs=2",
              "train.compile_mode=reduce-overhead")
    oof = {}
    for mode in ("false", "true"):
        out = tmp_path / f"compile_{mode}"
        train_run(tiny_config(demo_root, *common, f"train.compile={mode}"), out)
        oof[mode] = load_npz(RunDir(out).fold_dir(0, 0) / "oof.npz")
        assert ({"engine.py", "inference.py"} <= {name for name, _ in callers}) == (mode == "true")
        assert {m for _, m in callers} <= {"reduce-overhead"}
    eager, compiled = oof["false"], oof["true"]
    np.testing.assert_array_equal(eager["rows"], compiled["rows"])
    for name in ("p_mask", "p_gender", "p_age"):
        # same seed, batches and initial weights: only the kernels' float rounding differs (~1e-5 seen)
        np.testing.assert_allclose(compiled[name], eager[name], atol=1e-4)


def test_compiled_prediction_reuses_its_graphs_across_fold_models(demo_root):
    cfg = tiny_config(demo_root, "train.eval_batch_size=8", "aug.tta=[none, hflip]")
    compiled_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    _, heads = build_task(cfg)
    cpu = torch.device("cpu")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier compiles
    # three folds' models (different weights, one architecture) over sets whose last batches are
    # 4, 6 and 7 rows: a graph per short size, or one dynamic graph narrowed to 2-15 rows and another
    # for 16-31 (seen on the CPU), unless the short batch is padded
    for seed, n in enumerate((20, 22, 63)):
        images = RowImages.of(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        model = build_model(cfg.model, heads)
        eager = predict_probs(model, images, cfg, cpu)
        compiled = predict_probs(model, images, compiled_cfg, cpu)
        for name in eager:
            assert compiled[name].shape == eager[name].shape == (n, eager[name].shape[1])
            np.testing.assert_allclose(compiled[name], eager[name], atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
