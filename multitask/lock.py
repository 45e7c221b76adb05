"""File locks in a shared run directory: a process holds a fold while it trains it (so two processes,
or machines on one disk, never train the same fold) and a round while it writes its results. A lock
is a file created exclusively, holding its owner's host, pid and start time, so a lock left by a
dead process can be told apart from a live one on the same host.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LockError(ValueError):
    """A lock held by another process for longer than one would wait."""


LOCK = "lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(path: Path) -> dict | None:
    """Who holds a fold's lock: {host, pid, since}, or None when nobody does (no lock, or one left by
    a dead process on this host). A lock being written this instant reads as held."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        return None
    return holder


def describe_holder(holder: dict) -> str:
    if not holder:
        return "being claimed by another process"
    return f"being trained by {holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}"


@contextmanager
def file_lock(path: Path) -> Iterator[str | None]:
    """Create `path` exclusively and hold it for the block: yields None when held, else who holds it.
    A lock left by a dead process on this host is taken over; one from another host stays until its
    file is removed by hand (this host cannot tell whether that machine is gone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask, as open() gives
        except FileExistsError:
            holder = lock_holder(path)
            if holder is None:  # stale: its process is gone
                path.unlink(missing_ok=True)
                continue
            yield describe_holder(holder) + (f" (remove {path} if that machine is gone)"
                                             if holder.get("host") != me["host"] else "")
            return
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)
        return
    yield "claimed and released by other processes over and over"


@contextmanager
def waiting_lock(path: Path, timeout_s: float = 600) -> Iterator[None]:
    """`file_lock`, waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        with file_lock(path) as holder:
            if holder is None:
                yield
                return
        if time.monotonic() > deadline:
            raise LockError(f"{path}: {holder} for more than {timeout_s:.0f} s")
        time.sleep(0.05)
