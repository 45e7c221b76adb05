"""File locks in a shared run directory: a process holds a fold while it trains it (so two processes,
or machines on one disk, never train the same fold) and a round while it writes its results. A lock
is a file created exclusively, holding its owner's host, pid and the process's start, and its owner
keeps an flock on it while it lives. So a lock left by a dead process can be told apart from a live
one on the same host: by the flock, which the kernel drops when its holder dies, whatever container
it ran in (containers that share a hostname do not see each other's pids); by the pid and its start
for a lock without one (an older mt, a filesystem without flock), even where the dead one's pid
now belongs to another process (a restarted container's entrypoint is pid 1 again). Such a stale
lock is replaced by one process at a time (`_take_over`).
"""
from __future__ import annotations

import fcntl
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


# A lock's content is written right after its exclusive create: an empty (or half-written) lock older
# than this was left by a process killed between the two, not one being written now.
UNWRITTEN_STALE_S = 10.0


def alive(pid: int) -> bool:
    """A process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks after boot, /proc/PID/stat's 22nd field), or None where
    there is no /proc (macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name start at the 3rd


def flock_free(fd: int) -> bool | None:
    """Whether nobody holds the flock of the open file `fd` (taken if so, until `fd` is closed), or
    None where this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def unlocked(path: Path) -> bool | None:
    """Whether nobody holds the flock of the lock file `path` (its holder keeps one while it lives,
    and the kernel drops it when the holder dies, in whatever container it ran), or None where
    this filesystem has no flock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return None
    try:
        return flock_free(fd)
    finally:
        os.close(fd)  # releases a flock just taken


def hold_flock(fd: int) -> bool:
    """Take the flock of a file just made, `fd`, for as long as it is open; False where the
    filesystem has none. Another process's look (`unlocked`) may hold it for an instant: that is
    waited out, not taken for a filesystem without flocks (the file would be judged by its pid alone,
    which another container sharing the hostname cannot see)."""
    for _ in range(400):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.005)
        except OSError:
            return False
    return False


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _still_at(path: Path, identity: tuple[int, int]) -> bool:
    """The file at `path` is the one with `identity`: not removed, nor replaced by another's lock."""
    try:
        return _identity(os.stat(path)) == identity
    except FileNotFoundError:
        return False


_HELD: set[str] = set()  # the locks this process holds: a lock naming this pid and not among them is stale


def _dead(holder: dict, path: Path) -> bool:
    """The lock's holder on this host is gone: no process has its pid, another process has it now,
    or it is this process's pid on a lock this process does not hold."""
    pid = holder["pid"]
    if not alive(pid):
        return True
    if pid == os.getpid():
        return os.path.realpath(path) not in _HELD
    started = holder.get("started")
    return started is not None and process_start(pid) not in (None, started)


def _read(path: Path) -> tuple[str, dict | None, tuple[int, int] | None]:
    """("missing", None, None), ("stale", None, file): left by a dead process on this host, or left
    unwritten by a process killed as it made it, or ("held", holder, file): {} for a lock being
    written this instant. The content and the flock are read through one descriptor, so both are of
    one file (`file`, its identity), not of a lock made again between two opens."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing", None, None
    except OSError:
        return "held", {}, None
    try:
        try:
            st = os.fstat(fd)
            text = b"".join(iter(lambda: os.read(fd, 1 << 16), b"")).decode("utf-8", errors="replace")  # no JSON: unwritten
        except OSError:  # not a file (a folder of the lock's name), or unreadable: nobody's to take over
            return "held", {}, None
        age, file = time.time() - st.st_mtime, _identity(st)
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        if not isinstance(holder, dict):
            # its maker takes the flock before it writes: only a free one, on an old file, is a killed maker's
            stale = age > UNWRITTEN_STALE_S and flock_free(fd) is not False
            return ("stale", None, file) if stale else ("held", {}, file)
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            # containers that share a hostname (Docker's --network host, Kubernetes' hostNetwork) do not
            # share pids: each sees the other's live pid as gone. A lock that holds an flock is judged
            # by it, which the kernel keeps for a live holder whatever its PID namespace; a lock of an
            # mt before flocks, or on a filesystem without them, by its pid as before
            free = flock_free(fd) if holder.get("flock") else None
            if free if free is not None else _dead(holder, path):
                return "stale", None, file
        return "held", holder, file
    finally:
        os.close(fd)  # releases a flock just taken


def lock_holder(path: Path) -> dict | None:
    """Who holds a fold's lock: {host, pid, since}, or None when nobody does (no lock, or a stale one:
    see `_read`). A lock being written this instant reads as held ({})."""
    return _read(path)[1]


@contextmanager
def _takeover_turn(path: Path) -> Iterator[None]:
    """One process at a time may replace the stale lock `path`: an flock on a file beside it, which
    the kernel releases when its holder dies (so a killed taker leaves nothing to clean up). The file
    is removed by its holder before the flock is released; a process that got the flock of a file
    removed meanwhile tries again on the one now there."""
    turn = path.with_name(path.name + ".takeover")
    while True:
        fd = os.open(turn, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(turn).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        turn.unlink(missing_ok=True)
        os.close(fd)  # releases the flock


def _take_over(path: Path) -> None:
    """Remove the lock `path` if it is still stale when read again in one's turn. Without the turn,
    two processes that both read a dead holder would both remove and create it: the second would
    remove the first's fresh lock, and both would train the fold. In its turn, a process sees the
    lock the other made, alive, and leaves it. (A stale lock is never removed by anyone else: its
    owner is gone, and only a process in its turn removes another's.)"""
    with _takeover_turn(path):
        # only a lock read stale here: a missing one may be created by its next owner any moment
        state, _, file = _read(path)
        if state == "stale" and _still_at(path, file):
            path.unlink(missing_ok=True)


def held_lock(paths) -> tuple[Path, dict] | None:
    """The first of the lock files `paths` that a live process holds, with its holder; None if none is."""
    for path in paths:
        holder = lock_holder(path)
        if holder is not None:
            return path, holder
    return None


def wait_released(path: Path, timeout_s: float) -> dict | None:
    """Wait, without taking it, until nobody holds the lock `path` (a reader of what its holder
    writes); the holder still there after `timeout_s`, or None."""
    deadline = time.monotonic() + timeout_s
    while (holder := lock_holder(path)) is not None and time.monotonic() <= deadline:
        time.sleep(0.5)
    return holder


def describe_holder(holder: dict, doing: str = "trained", path: Path | None = None) -> str:
    """Who holds a lock; with its `path`, what to do where it is another machine's (this host cannot
    tell whether that process lives)."""
    if not holder:
        return "being claimed by another process"
    said = f"being {doing} by {holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}"
    if path is not None and holder.get("host") != socket.gethostname():
        said += f" (remove {path} if that machine is gone)"
    return said


@contextmanager
def file_lock(path: Path, doing: str = "trained") -> Iterator[str | None]:
    """Create `path` exclusively and hold it for the block: yields None when held, else who holds it
    (`doing`: what the holder does, in those words). A lock left by a dead process on this host is
    taken over; one from another host stays until its file is removed by hand (this host cannot
    tell whether that machine is gone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "started": process_start(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask, as open() gives
        except FileExistsError:
            state, holder, _ = _read(path)
            if state == "stale":
                _take_over(path)
            if state != "held":  # stale and now removed, or released since: try again
                continue
            yield describe_holder(holder, doing, path)
            return
        # held until the block ends: what tells a live holder in another container from a dead one (on a
        # filesystem without flock, the lock is judged by its pid alone)
        flocked = {"flock": True} if hold_flock(fd) else {}
        _HELD.add(os.path.realpath(path))
        try:
            os.write(fd, json.dumps(me | flocked).encode())
            yield None
        finally:
            # before the flock goes, or a reader would take it for stale; and only if it is still this
            # lock: one removed by hand (or `mt train --force`) may have been taken by another since
            if _still_at(path, _identity(os.fstat(fd))):
                path.unlink(missing_ok=True)
            _HELD.discard(os.path.realpath(path))
            os.close(fd)
        return
    yield "claimed and released by other processes over and over"


@contextmanager
def waiting_lock(path: Path, timeout_s: float = 600, doing: str = "trained") -> Iterator[None]:
    """`file_lock`, waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        with file_lock(path, doing) as holder:
            if holder is None:
                yield
                return
        if time.monotonic() > deadline:
            raise LockError(f"{path}: {holder} for more than {timeout_s:.0f} s")
        time.sleep(0.05)
