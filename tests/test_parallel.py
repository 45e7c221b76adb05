"""Folds trained at once in worker processes: the same files and numbers as one after another,
progress relayed, failures raised in the parent."""
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import metrics_of, one_and_two_ranks, tiny_config, torchrun_cli
from multitask.kfold import train_run
from multitask.model import CheckpointError
from multitask.parallel import RelayProgress, _show
from multitask.pseudo import pseudo_label
from multitask.run import RunDir, load_npz


def _metrics(out, r, k):
    return metrics_of(RunDir(out).fold_dir(r, k) / "metrics.csv")


def test_two_jobs_give_what_one_gives(demo_root, tmp_path):
    # equal up to float summation order: each worker gets cpu_count // jobs torch threads, and the
    # thread count changes the order of some reductions in the last bits
    common = (f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.folds=3")
    one = tmp_path / "one"
    train_run(tiny_config(demo_root, *common), one)
    two = tmp_path / "two"
    train_run(tiny_config(demo_root, *common, "train.jobs=2"), two)
    for k in range(3):
        pd.testing.assert_frame_equal(_metrics(one, 0, k), _metrics(two, 0, k), check_exact=False, rtol=1e-4)
    a, b = load_npz(RunDir(one).round_dir(0) / "oof.npz"), load_npz(RunDir(two).round_dir(0) / "oof.npz")
    np.testing.assert_array_equal(a["rows"], b["rows"])
    np.testing.assert_allclose(a["p_mask"], b["p_mask"], atol=1e-4)
    ta = load_npz(RunDir(one).round_dir(0) / "test_probs.npz")
    tb = load_npz(RunDir(two).round_dir(0) / "test_probs.npz")
    np.testing.assert_allclose(ta["p_age"], tb["p_age"], atol=1e-4)

    # a pseudo-label round in workers rebuilds the pseudo-labelled images from the round's pseudo.csv
    reports = pseudo_label(two, precision=0.0, rounds=1, overrides=["train.jobs=2"])
    assert reports[0]["added"] == 4 * 7
    for k in range(3):
        metrics = _metrics(two, 1, k)
        assert len(metrics) == 2 and (RunDir(two).fold_dir(1, k) / "test.npz").exists()


def test_a_failing_worker_raises_in_the_parent(demo_root, tmp_path, monkeypatch):
    import multitask.kfold as kfold
    from multitask.config import ModelCfg
    from multitask.labels import mask_task
    from multitask.model import build_model

    # a checkpoint that `mt train` checks and loads up front, overwritten before the workers load it
    path = tmp_path / "weights.pth"
    torch.save({"model": build_model(ModelCfg(backbone="test_efficientnet"), mask_task().heads("class")).state_dict()},
               path)
    real = kfold.run_in_workers

    def overwritten_first(*args, **kwargs):
        path.write_bytes(b"not a checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(kfold, "run_in_workers", overwritten_first)
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.jobs=2", f"model.checkpoint={path}")
    with pytest.raises(CheckpointError, match="weights.pth: not the checkpoint this run started from") as info:
        train_run(cfg, tmp_path / "run")
    assert any("fold worker" in note for note in getattr(info.value, "__notes__", []))


def test_a_killed_worker_is_one_line_that_points_to_resume(demo_root, tmp_path, monkeypatch):
    """`kill -9` of a worker (or the system's, for memory) ended `mt train --jobs 2` with a traceback."""
    import multitask.kfold as kfold
    from multitask.parallel import WorkerDied
    from multitask.run import RunError

    def killed(*args, **kwargs):
        raise WorkerDied("fold worker 1 on cpu died (exit code -9)")

    monkeypatch.setattr(kfold, "run_in_workers", killed)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=rf"fold worker 1 on cpu died \(exit code -9\); the folds that finished are "
                                       rf"kept, and `mt resume --run {out}` trains the rest"):
        train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.jobs=2"), out)


class FakeProgress:
    def __init__(self):
        self.tasks, self.lines, self.n = {}, [], 0
        self.console = self

    def add_task(self, description, total=None):
        self.n += 1
        self.tasks[self.n] = [description, total, 0]
        return self.n

    def update(self, task_id, advance=0, description=None):
        self.tasks[task_id][2] += advance
        if description:
            self.tasks[task_id][0] = description

    def remove_task(self, task_id):
        del self.tasks[task_id]

    def print(self, text, soft_wrap=False):
        self.lines.append(text)


def test_relayed_progress_reaches_the_parents_display():
    events = []

    class Q:
        put = events.append

    shown, parent = {}, FakeProgress()
    workers = [RelayProgress(Q, 0), RelayProgress(Q, 1)]
    a = workers[0].add_task("fold 0", total=10)
    b = workers[1].add_task("fold 1", total=5)
    workers[0].update(a, advance=3, description="fold 0 epoch 2")
    workers[1].update(b, advance=5)
    workers[1].console.print("fold 1 done")
    workers[1].remove_task(b)
    for e in events:
        _show(parent, shown, e)
    assert list(parent.tasks.values()) == [["fold 0 epoch 2", 10, 3]]
    assert parent.lines == ["fold 1 done"]


def _raises(payload, items, device, progress):
    for item in items:
        if item == 2:
            raise ValueError(f"bad item {item}")


def _dies(payload, items, device, progress):
    import os

    for _ in items:
        os._exit(3)


def _dies_or_talks(payload, items, device, progress):
    import os
    import time

    for item in items:
        if item == 0:
            time.sleep(0.5)
            os._exit(3)
        for _ in range(600):  # a worker busy for a minute, with progress every 0.1 s
            progress.console.print("still here")
            time.sleep(0.1)


def test_a_dead_worker_is_seen_while_another_keeps_talking(monkeypatch):
    """The dead worker was looked for only when the events went quiet: a busy worker's progress hid it
    until that worker had trained every fold left."""
    import time

    import multitask.parallel as parallel
    from multitask.parallel import WorkerDied, run_in_workers

    monkeypatch.setattr(parallel, "GRACE_S", 1.0)  # its error, had it one, is in the queue before it exits
    GRACE_S = parallel.GRACE_S
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match="died .exit code 3"):
        run_in_workers(_dies_or_talks, None, [0, 1], jobs=2, devices=["cpu"], progress=FakeProgress())
    assert time.monotonic() - t0 < GRACE_S + 20  # not the minute the other worker talks for


def test_worker_failures_reach_the_parent(monkeypatch):
    import multitask.parallel as parallel
    from multitask.parallel import run_in_workers

    monkeypatch.setattr(parallel, "GRACE_S", 1.0)  # the raised error arrives before its worker ends all the same

    with pytest.raises(ValueError, match="bad item 2"):
        run_in_workers(_raises, None, [0, 1, 2, 3], jobs=2, devices=["cpu"])
    from multitask.parallel import WorkerDied

    with pytest.raises(WorkerDied, match="died .exit code 3"):
        run_in_workers(_dies, None, [0, 1], jobs=2, devices=["cpu"])


def _sleeps(folder, items, device, progress):
    import os
    import time
    from pathlib import Path

    Path(folder, f"worker-{os.getpid()}").touch()
    for _ in items:
        time.sleep(120)


def _gone(pid: int) -> bool:
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()  # a zombie has stopped too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_workers_stop_when_their_parent_is_killed(tmp_path, signal_name):
    """`kill` (SIGTERM) of `mt train --jobs 2` used to leave its fold workers training unseen, holding
    their folds' locks; SIGKILL (out of memory) too. They stop with it now."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    here = Path(__file__).parent
    parent = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(here)!r}); from test_parallel import _sleeps; "
        f"from multitask.parallel import run_in_workers; "
        f"run_in_workers(_sleeps, {str(tmp_path)!r}, [0, 1], jobs=2, devices=['cpu'])")])
    deadline = time.time() + 120
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2, "the workers did not start"
    parent.send_signal(getattr(signal, signal_name))
    parent.wait(timeout=30)
    deadline = time.time() + 30
    while not all(_gone(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if not _gone(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} went on after their parent's {signal_name}"
    if signal_name == "SIGTERM":
        assert parent.returncode == 128 + signal.SIGTERM


def test_a_worker_binds_its_cuda_device_before_any_work(monkeypatch):
    """Without set_device, a worker on cuda:1 opens a context on GPU 0 (pinned memory, allocator)."""
    import queue

    import torch

    from multitask.parallel import _worker

    bound, seen = [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(str(d)))
    todo, events = queue.Queue(), queue.Queue()
    todo.put(None)
    _worker(lambda payload, items, device, progress: seen.append((list(bound), device)), None, todo, events, 0,
            "cuda:1", torch.get_num_threads())
    assert seen == [(["cuda:1"], "cuda:1")]
    assert events.get_nowait() == ("exit", 0)
    _worker(lambda *a: None, None, todo, events, 0, "cpu", torch.get_num_threads())
    assert bound == ["cuda:1"]  # the CPU binds nothing


def test_resume_restores_the_training_devices_cuda_rng_with_fewer_gpus(monkeypatch):
    """A last.pt from a machine with four GPUs, resumed where fewer are visible: the training
    device's own generator state is restored, and the others are not asked for."""
    import torch

    from multitask.engine import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((s.tolist(), str(d))))
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    old_style = state | {"cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}
    set_rng_state(old_style, torch.device("cuda:2"))
    set_rng_state(old_style, torch.device("cuda:7"))  # beyond what was saved: left as it is
    set_rng_state(state | {"cuda": torch.tensor([9], dtype=torch.uint8)}, torch.device("cuda:0"))
    set_rng_state(old_style, torch.device("cpu"))
    assert restored == [([2], "cuda:2"), ([9], "cuda:0")]


def test_the_same_seed_twice_with_two_jobs_is_identical(demo_root, tmp_path):
    """Bit for bit, metrics, probabilities and submission: each worker's thread count is fixed, so
    two runs with the same jobs add in the same order."""
    from multitask.submit import make_submission

    common = (f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.folds=2", "train.jobs=2")
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        train_run(tiny_config(demo_root, *common), out)
        make_submission(out)
    for k in range(2):
        pd.testing.assert_frame_equal(_metrics(runs[0], 0, k), _metrics(runs[1], 0, k), check_exact=True)
    for name in ("oof.npz", "test_probs.npz"):
        a, b = load_npz(RunDir(runs[0]).round_dir(0) / name), load_npz(RunDir(runs[1]).round_dir(0) / name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    assert RunDir(runs[0]).submission.read_text() == RunDir(runs[1]).submission.read_text()


def test_ddp_on_two_cpu_processes_matches_one_process(demo_root, tmp_path):
    """torchrun with 2 CPU processes (gloo): each trains on half of every batch, gradients averaged;
    rank 0 alone writes. Stated tolerance: per-epoch training loss within 6% and validation NLL within
    2% of one process (BatchNorm sees half batches per process; measured 3.2% and 0.2%). `mt resume`
    under torchrun finishes a round started under it."""
    settings, mt = torchrun_cli(tmp_path, "cpu", timeout=300)

    one_and_two_ranks(mt, settings, demo_root, tmp_path)
    for k in range(2):
        a, b = _metrics(tmp_path / "one", 0, k), _metrics(tmp_path / "two", 0, k)
        assert len(b) == 2
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0.06)
        np.testing.assert_allclose(b["val_nll_total"], a["val_nll_total"], rtol=0.02)
    assert not list((tmp_path / "two").rglob("lock.json")) and not list((tmp_path / "two").rglob("*.tmp"))
    # a pseudo-label round under torchrun: rank 0 writes the labels, both ranks train every fold
    out = mt("pseudo-label", "--run", tmp_path / "two", "--precision", "0", ranks=2)
    assert out.count("pseudo-label rounds") == 1
    summary = pd.read_json(tmp_path / "two" / "round1" / "summary.json", typ="series")
    assert summary["folds_done"] == [0, 1] and summary["complete"] and summary["pseudo_added"] == {"0": 28, "1": 28}
    assert all(len(_metrics(tmp_path / "two", 1, k)) == 2 for k in range(2))


def test_a_rank_that_fails_alone_does_not_keep_the_others_waiting(tmp_path):
    # rank 0 meets an error of its own (a write of rank 0's fails) while rank 1 is already in the
    # next collective: rank 0's exit must not wait at a barrier rank 1 never reaches, or both wait
    # out the group's timeout (30 minutes under gloo)
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch, torch.distributed as td\n"
        "from multitask import dist\n"
        "dist.init_from_env('cpu')\n"
        "if dist.rank() == 0:\n"
        "    raise OSError('a write of rank 0 failed')\n"
        "td.all_reduce(torch.ones(1))\n")
    # the two ranks as torchrun starts them (its environment), without the launcher's own start-up
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert codes[0] != 0 and "a write of rank 0 failed" in ranks[0].stderr.read()
    assert codes[1] != 0  # its collective failed once rank 0 was gone: it left too


def test_the_clis_red_line_leaves_without_the_other_ranks(monkeypatch):
    # a user error printed as one line exits 2 without an exception: the exit's barrier is skipped
    # for it too (on one rank alone, it would wait for ranks that never come)
    import typer

    from multitask import dist
    from multitask.cli import progress_and_errors
    from multitask.config import ConfigError

    monkeypatch.setattr(dist, "_abandoned", False)
    with pytest.raises(typer.Exit):
        with progress_and_errors():
            raise ConfigError("refused on this rank")
    assert dist._abandoned


def test_torchrun_on_gpus_reduces_cpu_tensors_too(monkeypatch):
    """NCCL alone takes only CUDA tensors: the epoch's loss sums (a CPU tensor) would stop every
    multi-GPU run at its first epoch's end. On GPUs the group pairs NCCL with gloo for the CPU."""
    import torch
    import torch.distributed as td

    from multitask import dist

    assert dist.backend_for(cuda=True) == "cpu:gloo,cuda:nccl" and dist.backend_for(cuda=False) == "gloo"
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(td, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist.atexit, "register", lambda fn: None)
    dist.init_from_env("auto")
    dist.init_from_env("cpu")
    assert joined == ["cpu:gloo,cuda:nccl", "gloo"]


def test_pseudo_label_and_resume_join_torchrun_on_the_runs_device(monkeypatch, tmp_path):
    """They joined as `auto`: on a GPU host a CPU run's ranks took NCCL and a GPU each."""
    from multitask import cli, dist
    from multitask.config import dump_config, load_config

    RunDir(tmp_path).config.write_text(dump_config(load_config(None, ["train.device=cpu"])))
    joined = []
    monkeypatch.setattr(dist, "init_from_env", joined.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.join_run_torchrun(tmp_path, [])
    cli.join_run_torchrun(tmp_path, ["train.lr=1", "train.device=cuda:1"])
    assert joined == ["cpu", "cuda:1"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # not under torchrun: the config is not even read
    cli.join_run_torchrun(tmp_path / "nowhere", [])
    assert joined == ["cpu", "cuda:1"]
