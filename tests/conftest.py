from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from multitask.config import load_config
from multitask.data.synthetic import make_demo_dataset

torch.set_num_threads(2)
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


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


@pytest.fixture
def script_module(monkeypatch):
    """A script under scripts/ as a module, to call its main in this process (a process of its own
    costs seconds of importing torch and timm). Importable by its name meanwhile: a DataLoader worker
    that is spawned, not forked (macOS, newer Pythons), unpickles the script's classes by it."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(SCRIPTS))
    loaded = []

    def load(name: str):
        loaded.append(name)
        return importlib.import_module(name)
    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def tiny_config(root, *overrides):
    """A config that trains in seconds on the CPU: 2 folds, 1 epoch, 32 px, the tiniest timm model.
    On the CPU even where a GPU is present (the determinism tests need it); tests/test_cuda.py
    overrides the device."""
    return load_config(None, [
        f"data_root={root}", "train.device=cpu", "model.backbone=test_efficientnet", "data.img_size=[32, 32]",
        "train.folds=2", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64", *overrides])


@contextmanager
def stopped_in(monkeypatch, module, name: str):
    """The block is stopped (KeyboardInterrupt, as a user's Ctrl-C) where it calls `module.name`."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt(f"stopped in {name}")
    with monkeypatch.context() as m:
        m.setattr(module, name, stop)
        with pytest.raises(KeyboardInterrupt):
            yield


def metrics_of(path):
    """A fold's metrics.csv without what differs between two identical trainings: the timings and the
    training's id."""
    return pd.read_csv(path).drop(columns=["train_img_s", "train_s", "validate_s", "train_id"])


def torchrun_cli(tmp_path, device: str, timeout: int):
    """(settings, mt): a two-fold, two-epoch tiny run's settings on `device`, and `mt(*args, ranks=1)`,
    the CLI in one process or under torchrun with `ranks` processes; it asserts the command exits 0
    and returns what it printed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    settings = ["--folds", "2", "--epochs", "2", "--set", "model.backbone=test_efficientnet", "--set",
                "data.img_size=[32,32]", "--set", "train.batch_size=16", "--set", "train.eval_batch_size=64",
                "--set", f"train.device={device}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def mt(*args, ranks=1):
        # "--": torchrun would take `--run` for an abbreviation of its own --run-path
        launcher = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m", "multitask.cli", "--"] \
            if ranks > 1 else [sys.executable, "-m", "multitask.cli"]
        done = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return settings, mt


def one_and_two_ranks(mt, settings, demo_root, tmp_path) -> None:
    """Round 0 trained by one process into `one`, and under torchrun into `two`: two ranks train fold
    0, `mt resume` with two ranks finishes the round, and one rank speaks."""
    import pandas as pd

    mt("train", "--data", demo_root, "--out", tmp_path / "one", *settings)
    out = mt("train", "--data", demo_root, "--out", tmp_path / "two", "--fold", "0", *settings, ranks=2)
    assert out.count("round 0 out-of-fold") == 1
    mt("resume", "--run", tmp_path / "two", ranks=2)
    summary = pd.read_json(tmp_path / "two" / "round0" / "summary.json", typ="series")
    assert summary["folds_done"] == [0, 1] and summary["complete"]
