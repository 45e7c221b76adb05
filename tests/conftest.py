import pytest
import torch

from multitask.config import load_config
from multitask.data.synthetic import make_demo_dataset

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test may touch the user's ~/.cache/mt."""
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path / "mt_cache"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small generated data set in the competition layout (12 train, 4 test persons)."""
    root = tmp_path_factory.mktemp("demo_data")
    make_demo_dataset(root, n_train_persons=12, n_eval_persons=4, image_size=(64, 48), seed=0)
    return root


def tiny_config(root, *overrides):
    """A config that trains in seconds on the CPU: 2 folds, 1 epoch, 32 px, the tiniest timm model.
    On the CPU even where a GPU is present (the determinism tests need it); tests/test_cuda.py
    overrides the device."""
    return load_config(None, [
        f"data_root={root}", "train.device=cpu", "model.backbone=test_efficientnet", "data.img_size=[32, 32]",
        "train.folds=2", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64", *overrides])
