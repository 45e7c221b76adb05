"""Work items (folds) spread over worker processes, with their progress relayed to the parent's display.

Several folds at once spread a round over several GPUs, and on one GPU let one fold's host work
(evaluation, checkpoint writes, Python) overlap another's kernels; the GPU time-slices between
processes, so whether that pays is measured (scripts/bench_kfold.py), not assumed.
Workers are spawned, not forked (CUDA cannot be used in a forked child), and pull the next item
from a shared queue, so a slow fold does not hold up the others' share.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

POLL_S = 0.2
GRACE_S = 5.0  # for a failed worker's error to arrive before it counts as killed without a word


class RelayProgress:
    """The part of rich's Progress the library uses, sent over a queue to the parent's real one."""

    def __init__(self, events, worker: int):
        self.events, self.worker, self.n = events, worker, 0
        self.console = self

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        self.n += 1
        self.events.put(("add", self.worker, self.n, description, total))
        return self.n

    def update(self, task_id: int, advance: float = 0, description: str | None = None, **_) -> None:
        self.events.put(("update", self.worker, task_id, advance, description))

    def remove_task(self, task_id: int) -> None:
        self.events.put(("remove", self.worker, task_id))

    def print(self, text: Any = "", **_) -> None:
        self.events.put(("print", self.worker, str(text)))


def _pull(todo) -> Iterator[Any]:
    while (item := todo.get()) is not None:
        yield item


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling (so the parent raises the same type), else its text."""
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _die_with(parent: int) -> None:
    """End this worker when its parent ends, however it ends (SIGKILL, out of memory): a fold left
    training unseen would hold its lock while `mt resume` skips it. Linux only; elsewhere the parent's
    own handling (run_in_workers) is what there is."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:  # the parent ended before the request was made
        os._exit(1)


def _spawned(parent: int, *args) -> None:
    _die_with(parent)
    _worker(*args)


def _worker(target: Callable, payload: Any, todo, events, worker: int, device: str, threads: int) -> None:
    import torch

    from multitask.device import bind

    torch.set_num_threads(threads)
    try:
        bind(device)
        target(payload, _pull(todo), device, RelayProgress(events, worker))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent, which raises it
        events.put(("error", worker, _portable(e), traceback.format_exc()))
        raise SystemExit(1)
    events.put(("exit", worker))


class WorkerDied(RuntimeError):
    """A worker process ended without a word (killed, out of memory): no error of its own to raise."""


def run_in_workers(target: Callable, payload: Any, items: list, jobs: int, devices: list[str],
                   progress=None) -> None:
    """Call `target(payload, items_iterator, device, progress)` in `jobs` spawned processes; worker i
    gets `devices[i % len(devices)]` and a share of the CPU threads. The first failure stops the rest
    and is raised here (files the finished items wrote stay)."""
    jobs = max(1, min(jobs, len(items)))
    ctx = mp.get_context("spawn")
    todo, events = ctx.Queue(), ctx.Queue()
    for item in items:
        todo.put(item)
    for _ in range(jobs):
        todo.put(None)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_spawned, args=(os.getpid(), target, payload, todo, events, i,
                                                devices[i % len(devices)], threads))
             for i in range(jobs)]
    shown: dict[tuple[int, int], Any] = {}
    running = set(range(jobs))
    with stopped_by_signals():
        try:
            for p in procs:
                p.start()
            died: dict[int, float] = {}  # worker -> when it was first seen ended with a failure
            while running:
                try:
                    event = events.get(timeout=POLL_S)
                except queue.Empty:
                    event = None
                if event is not None:
                    kind, worker = event[0], event[1]
                    if kind == "exit":
                        running.discard(worker)
                    elif kind == "error":
                        error, trace = event[2], event[3]
                        error.add_note(f"in fold worker {worker} on {devices[worker % len(devices)]}:\n{trace}")
                        raise error
                    elif progress is not None:
                        _show(progress, shown, event)
                # looked at after every event, not only when the queue is quiet: another worker's
                # progress must not hide a dead one. A worker that raised put its error just before
                # exiting, so it is given GRACE_S to arrive; after that it was killed without a word
                now = time.monotonic()
                for i in running:
                    if procs[i].exitcode not in (None, 0):
                        died.setdefault(i, now)
                gone = [i for i in sorted(died) if i in running and now - died[i] > GRACE_S]
                if gone:
                    i = gone[0]
                    raise WorkerDied(f"fold worker {i} on {devices[i % len(devices)]} died (exit code {procs[i].exitcode})")
        finally:
            for p in procs:
                if p.pid is None:  # never started
                    continue
                if p.is_alive() and running:
                    p.terminate()
                p.join()
            if progress is not None:
                for task_id in shown.values():
                    progress.remove_task(task_id)


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, a closed terminal, a scheduler) raise SystemExit in the block, as
    Ctrl-C raises KeyboardInterrupt, so that the workers are stopped on the way out instead of
    training on, unseen, with their folds' locks."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    kept = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def _show(progress, shown: dict, event: tuple) -> None:
    kind, worker = event[0], event[1]
    if kind == "add":
        shown[(worker, event[2])] = progress.add_task(event[3], total=event[4])
    elif kind == "update":
        task_id = shown.get((worker, event[2]))
        if task_id is not None:
            kw = {"description": event[4]} if event[4] is not None else {}
            progress.update(task_id, advance=event[3], **kw)
    elif kind == "remove":
        task_id = shown.pop((worker, event[2]), None)
        if task_id is not None:
            progress.remove_task(task_id)
    elif kind == "print":
        progress.console.print(event[2], soft_wrap=True)
