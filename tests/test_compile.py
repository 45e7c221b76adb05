"""train.compile on the CPU: the torch.compile path runs in CI too (inductor's CPU backend), and a
compiled fold learns what the eager fold learns. The CUDA variant is in tests/test_cuda.py."""
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from multitask.kfold import train_run
from multitask.run import RunDir, load_npz

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="inductor's CPU backend needs a C compiler")


def test_a_compiled_fold_matches_the_eager_fold(demo_root, tmp_path):
    common = (f"data.cache_dir={tmp_path / 'cache'}", "aug.backend=torch", "train.fold=[0]", "train.epochs=2")
    oof = {}
    for mode in ("false", "true"):
        out = tmp_path / f"compile_{mode}"
        train_run(tiny_config(demo_root, *common, f"train.compile={mode}"), out)
        oof[mode] = load_npz(RunDir(out).fold_dir(0, 0) / "oof.npz")
    eager, compiled = oof["false"], oof["true"]
    np.testing.assert_array_equal(eager["rows"], compiled["rows"])
    for name in ("p_mask", "p_gender", "p_age"):
        # same seed, batches and initial weights: only the kernels' float rounding differs (~1e-5 seen)
        np.testing.assert_allclose(compiled[name], eager[name], atol=1e-4)
