"""The run directory: where one stage hands its result to the next, and atomic writes.

RUN/config.yaml  folds.csv  summary.json  submission.csv (+ .json: what made it)  (skipped.csv: what
     --skip-bad left out)
RUN/round0/fold0/{best.pt,last.pt,metrics.csv,oof.npz,test.npz}   (+ lock.json while a process trains it)
RUN/round0/{oof.npz,test_probs.npz,summary.json}     RUN/round1/... (pseudo-label rounds)
"""
from __future__ import annotations

import errno
import glob
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from multitask.lock import (LOCK, alive, describe_holder, file_lock, hold_flock, lock_holder, unlocked, wait_released,
                            waiting_lock)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


T = TypeVar("T")
FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's own 0600 would hide results from other users


class StorageError(ValueError):
    """The disk cannot take what is about to be written: no space, or no permission."""


def check_writable(path: Path) -> None:
    """Fail before any work when the folder `path` (made later, if missing) could not be written."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise StorageError(f"{path}: cannot be made a folder ({p} is a file)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise StorageError(f"{path}: cannot write into {p} (permission denied)")


def check_output_file(path: Path) -> None:
    """Fail before any work when the file `path` could not be written: a folder is there, or its
    folder cannot be made or written."""
    if Path(path).is_dir():
        raise StorageError(f"{path}: is a folder; name a file to write")
    check_writable(Path(path).parent)


def check_space(folder: Path, need: int, what: str) -> None:
    """Fail before writing `need` bytes into `folder` when its disk has less room."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise StorageError(f"{folder}: {what} needs {need / 2**20:,.0f} MiB, the disk has {free / 2**20:,.0f} MiB free; "
                           f"free some space or choose another folder (data.cache_dir for the cache)")


# A temp file names its writer (.NAME~HOST~PID~RANDOM.tmp), so that `mt resume` removes those of
# killed writes and leaves those of processes still writing into the same run (folds trained from
# several shells). "~" is in neither a host name nor mkstemp's random part.
WRITER_SEP = "~"
TEMP_NAME = re.compile(r"\.(?P<name>.*)~(?P<host>[^~]*)~(?P<pid>\d+)~[^~]*\.tmp")


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process writing the temp file `name`; None for a name without them."""
    m = TEMP_NAME.fullmatch(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


def writer_prefix(name: str) -> str:
    """The start of a temp file's (or staging folder's) name for `name`, naming this process."""
    return f".{name}{WRITER_SEP}{socket.gethostname()}{WRITER_SEP}{os.getpid()}{WRITER_SEP}"


def sweep_killed(paths: Iterable[Path]) -> None:
    """Remove the temp files and staging folders among `paths` that killed writes left."""
    for p in paths:
        if killed_write(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def sweep_killed_beside(path: Path) -> None:
    """Remove what killed writes of `path` left beside it (temp files, work or staging folders named
    by writer_prefix), before a new write of it starts."""
    sweep_killed(list(path.parent.glob(f".{glob.escape(path.name)}{WRITER_SEP}*.tmp")))


def killed_write(path: Path) -> bool:
    """The temp file (or staging folder) `path` is left by a write that will never finish: its writer
    was on this host and is gone, or (a name without its writer) it was made by an mt before writers
    were named, which no process running now can be. A writer in another container that shares the
    hostname has a pid this one cannot see: a temp file whose flock is held (`lock.hold_flock`, kept until the rename)
    is such a live writer's."""
    writer = temp_writer(path.name)
    if writer is None:
        return True
    host, pid = writer
    if host != socket.gethostname() or alive(pid):
        return False
    return path.is_dir() or unlocked(path) is not False


def sync_file(fd: int) -> None:
    """Put a file's content on disk before it is renamed into place. A filesystem that cannot
    (some shared folders of virtual machines, FUSE mounts) answers EINVAL: the write goes on unsynced,
    as every write did before; a failure to write (EIO, ENOSPC) is raised."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def sync_dir(folder: Path) -> None:
    """Put a rename into `folder` on disk (the folder's entry, as fsync does a file's content)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot sync a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator:
    """A file handle on a temp file in the same folder, renamed to `path` when the block ends well
    (and removed when it does not), so a crash never leaves half a file; a long output can be
    written as it is made. Text is UTF-8 whatever the locale, with line ends as written."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_killed_beside(path)  # a killed earlier write's (`mt predict` of a large set leaves a large one)
    fd, tmp = tempfile.mkstemp(prefix=writer_prefix(path.name), suffix=".tmp", dir=path.parent)
    hold_flock(fd)  # kept past the rename: see killed_write
    try:
        # a second descriptor to write through: `fd`, and the flock with it, stays open past the rename
        with os.fdopen(os.dup(fd), mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            fh.flush()
        sync_file(fd)  # on disk before the rename: a crash must not leave an empty file under the final name
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        sync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


MERGING = ".mt-merging"  # in a folder while staged_dir merges a run into it


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to build a whole directory in, moved to `out` when the block ends
    well and removed when it does not: an interrupted command leaves nothing half made at `out`
    (which a retry would take for a finished run). `out` may exist, empty or holding other files; the
    staged entries join it with config.yaml, the mark of a run, last. A file or folder of the user's
    named as one of the run's is never replaced: the merge is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StorageError(f"{out}: is a file; name a folder to write the run into")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_killed_beside(out)  # an earlier try's, killed
    staging = Path(tempfile.mkdtemp(prefix=writer_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            try:
                os.replace(staging, out)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise StorageError(f"{out}: made by another command meanwhile (two commands writing one --out?); "
                                   f"nothing of this one was written there, choose another --out") from None
            sync_dir(out.parent)
            return
        # a merge marks `out` while it runs: a name of the run's already there is then an earlier
        # merge's, killed halfway, and is replaced; without the mark it is the user's, and is kept
        marker = out / MERGING
        clash = sorted(e.name for e in staging.iterdir() if os.path.lexists(out / e.name))
        if clash and not marker.exists():
            raise StorageError(f"{out}: already holds {', '.join(clash)}, which this command would replace; "
                               f"choose another --out, or move them away")
        marker.touch()
        for entry in sorted(staging.iterdir(), key=lambda e: e.name == "config.yaml"):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        sync_dir(out)
        marker.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def provenance_file(out: Path) -> Path:
    """Where a submission's record of what made it is kept: beside it, named after it."""
    return out.with_name(out.name + ".json")


def read_record(out: Path) -> dict | None:
    """The record beside the submission `out`, or None where there is none or the file there is not
    one (not JSON, or without the file's name and digest)."""
    try:
        record = json.loads(provenance_file(out).read_bytes())
    except (OSError, ValueError):  # missing, a folder, bytes that are no JSON (UnicodeDecodeError included)
        return None
    return record if isinstance(record, dict) and {"file", "sha256"} <= record.keys() else None


def damaged(path: Path, kind: str, e: BaseException, remedy: str = "") -> "RunError":
    """The error for a file mt wrote that cannot be read back (damaged outside mt: atomic writes
    leave none half-written), naming the file; the library's own words are often about a buffer."""
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RunError(f"{path}: damaged, cannot be read as {kind} ({why}){remedy}")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, "JSON", e) from None


def save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


NPZ_DAMAGE = (ValueError, EOFError, zipfile.BadZipFile, KeyError)  # what np.load raises on a file that is not an npz


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except NPZ_DAMAGE as e:
        raise damaged(path, "an npz file", e) from None


def npz_item(path: Path, key: str, default=None):
    """One array of an npz file, without reading the others."""
    return npz_items(path, (key,), default)[key]


def npz_items(path: Path, keys, default=None) -> dict:
    """Some arrays of an npz file, in one open, without reading the others."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] if key in z.files else default for key in keys}
    except NPZ_DAMAGE as e:
        raise damaged(path, "an npz file", e) from None


def head_probs(z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The probabilities in a loaded npz (saved as p_<head>), by head or output name."""
    return {k[2:]: v for k, v in z.items() if k.startswith("p_")}


def as_id(value) -> str | None:
    return None if value is None else str(value)


def fold_train_id(fold_dir: Path) -> str | None:
    """The id of the training that wrote the fold's latest metrics row (None for runs made before ids)."""
    import pandas as pd

    path = fold_dir / "metrics.csv"
    if not path.exists():
        return None
    ids = pd.read_csv(path, dtype={"train_id": str}).get("train_id")
    return str(ids.iloc[-1]) if ids is not None and len(ids) else None


def load_torch(path: Path, remedy: str = "") -> dict:
    """A checkpoint mt wrote (best.pt, last.pt), on the CPU."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise damaged(path, "a checkpoint", e, remedy) from None


def save_torch(path: Path, obj) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def fold_checkpoint(cfg) -> str:
    """The fold checkpoint that makes its OOF and test predictions: the single best epoch, or the
    average of the best `train.avg_top_k` epochs."""
    return "avg.pt" if cfg.train.avg_top_k > 0 else "best.pt"


RESULTS_WAIT_S = 600.0  # how long a reader waits for a round's results being written on this host
OTHER_HOST_WAIT_S = 30.0  # and on another: a lock its killed writer left there is never released
SOFT_FILE = "pseudo_soft.npz"  # a soft pseudo-label round's labels: image_id, and fold<k> final-class probabilities


class RunError(ValueError):
    """A run directory whose parts do not belong together."""


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    folds = property(lambda self: self.root / "folds.csv")
    summary = property(lambda self: self.root / "summary.json")
    submission = property(lambda self: self.root / "submission.csv")
    # `mt submit --onnx`'s, beside the run's own: it reads no subjects, and must not replace the one
    # `mt submit` made (nor be scored by `mt runs` in its place)
    submission_onnx = property(lambda self: self.root / "submission_onnx.csv")
    skipped = property(lambda self: self.root / "skipped.csv")  # training items `--skip-bad` left out
    teacher = property(lambda self: self.root / "teacher.npz")  # a student's targets (`mt distill`)
    report = property(lambda self: self.root / "report.html")  # `mt report`
    onnx = property(lambda self: self.root / "model.onnx")  # `mt export`'s default file
    onnx_int8 = property(lambda self: self.root / "model.int8.onnx")  # and with --int8

    def round_dir(self, r: int) -> Path:
        return self.root / f"round{r}"

    def fold_dir(self, r: int, k: int) -> Path:
        return self.round_dir(r) / f"fold{k}"

    def fold_lock(self, r: int, k: int):
        """Held while a process trains fold k of round r, so that two processes (or machines sharing
        the run directory) never train the same fold: see `file_lock`."""
        return file_lock(self.fold_dir(r, k) / LOCK)

    def round_lock(self, r: int):
        """Held while a process writes round r's results from its folds, so that the last writer is
        the one that saw the most folds."""
        return waiting_lock(self.round_dir(r) / LOCK, RESULTS_WAIT_S, "written")

    def fold_done(self, r: int, k: int, with_test: bool) -> bool:
        """Fold k of round r has its OOF (and, `with_test`, test) predictions, made by the fold's
        latest training: a fold retrained since (new metrics and checkpoints, old predictions) is not
        done. Runs made before training ids have none on either side, and count as done."""
        fold_dir = self.fold_dir(r, k)
        outputs = [fold_dir / "oof.npz"] + ([fold_dir / "test.npz"] if with_test else [])
        if not all(p.exists() for p in outputs):
            return False
        made_by = fold_train_id(fold_dir)
        return all(as_id(npz_item(p, "train_id")) == made_by for p in outputs)

    def why_missing(self, r: int, k: int) -> str:
        """Why fold k of round r has no outputs: being trained elsewhere, started and stopped, or never started."""
        holder = lock_holder(self.fold_dir(r, k) / LOCK)
        if holder is not None:
            return describe_holder(holder, path=self.fold_dir(r, k) / LOCK)
        fold_dir = self.fold_dir(r, k)
        if fold_dir.is_dir() and any(p.name != LOCK for p in fold_dir.iterdir()):
            return "started, not finished"
        return "not started"

    def why_missing_now(self, r: int, k: int) -> str:
        """Why fold k is missing from round r's results, as things stand now."""
        if self.fold_done(r, k, with_test=False):
            return f"finished since the round's results were written; `mt resume --run {self.root}` adds it"
        return self.why_missing(r, k)

    def sweep_killed_writes(self) -> None:
        """Remove the temp files of writes a kill interrupted (atomic writes leave nothing else). Those
        of live writers (other processes training folds of this run) stay, and so do those of another
        host's, which this host cannot tell alive from dead."""
        sweep_killed(list(self.root.rglob(".*.tmp")))  # files, and the staging folder of a killed `mt ensemble`

    def started_rounds(self) -> list[int]:
        """Rounds with a folder, finished or not, in order."""
        found = [re.fullmatch(r"round(\d+)", p.name) for p in self.root.glob("round*") if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def rounds(self) -> list[int]:
        """Rounds that have aggregated results, in order: their summary.json, which the aggregate
        writes last (a process killed after the round's oof.npz leaves a round that is not one yet)."""
        return [r for r in self.started_rounds() if (self.round_dir(r) / "summary.json").exists()]

    def latest_round(self) -> int:
        rounds = self.rounds()
        if not rounds:
            raise FileNotFoundError(self.unfinished(None))
        return rounds[-1]

    def unfinished(self, n_folds: int | None) -> str:
        """What a reader of a run without a finished round is told: which folds are done, and how to
        finish them."""
        started = self.started_rounds()
        if not started and not self.config.exists():
            return f"{self.root}: no trained round found (is it a run directory? `mt train` makes one)"
        r = started[-1] if started else 0
        resume = f"`mt resume --run {self.root}` finishes it"
        if not n_folds:  # a caller that knows no config (latest_round) knows no number of folds
            return f"{self.root}: round {r} is not finished; {resume}"
        done = [k for k in range(n_folds) if self.fold_done(r, k, with_test=False)]
        missing = [k for k in range(n_folds) if k not in done]
        detail = (f"folds done: {done or 'none'}; not done: {missing}" if missing
                  else "every fold is done; their results were not gathered into the round's")
        return f"{self.root}: round {r} is not finished ({detail}); {resume}"

    def round_train_ids(self, r: int) -> dict[str, str | None] | None:
        """Which training of each fold round r's results were built from (fold -> id); None for a
        round made before training ids, or one with no fold models of its own (an ensemble)."""
        return read_json(self.round_dir(r) / "summary.json").get("train_ids")

    def check_round_current(self, r: int, n_folds: int, settings: tuple[str, ...] | None = None,
                            hint: str = "") -> None:
        """Round r's results (OOF, voted test probabilities, decision) were built from the fold
        outputs that are there now, and (given `settings`, context.run_settings_hashes) every fold
        was trained under the settings config.yaml holds: `submit`, `predict`, `export`, `distill` and
        `pseudo-label` read them only then."""
        made = self.round_train_ids(r)
        if made is None:  # a run made before training ids
            return
        with_test = (self.round_dir(r) / "test_probs.npz").exists()
        done = [k for k in range(n_folds) if self.fold_done(r, k, with_test)]
        stamps = {k: npz_items(self.fold_dir(r, k) / "oof.npz", ("train_id", "settings")) for k in done}
        current = {str(k): as_id(s["train_id"]) for k, s in stamps.items()}
        if current != made:
            changed = sorted(set(current) ^ set(made) | {k for k in set(current) & set(made) if current[k] != made[k]})
            raise RunError(f"{self.round_dir(r)}: the round's results were built from other outputs of fold(s) "
                           f"{', '.join(changed)} than the run holds now; `mt resume --run {self.root}` rebuilds them")
        if settings is not None:
            self.check_fold_settings(r, {k: s["settings"] for k, s in stamps.items()}, settings, hint)

    def check_fold_settings(self, r: int, trained: dict, settings: tuple[str, ...], hint: str = "") -> None:
        """Folds of round r were trained under `settings` (context.run_settings_hashes of what
        config.yaml holds now: any of them); `trained`: each fold's recorded hash (None: made before
        hashes). `hint` ends the error: what else it may be."""
        other = [str(k) for k, h in trained.items() if h is not None and as_id(h) not in settings]
        if other:
            raise RunError(f"{self.round_dir(r)}: fold(s) {', '.join(other)} were trained under other settings than "
                           f"{self.config} holds now (was it edited?); a run's settings cannot change: put them "
                           f"back, or start a run with these settings (`mt train --out NEW`){hint}")

    def wait_for_results(self, r: int) -> None:
        """Round r's results are written file by file (oof.npz first, summary.json last): read while a
        process writes them, they mixed the old summary with the new folds, and called the fold just
        finished "not started". Wait until none does (a few seconds, as a rule), and say so."""
        lock = self.round_dir(r) / LOCK
        holder = lock_holder(lock)
        if holder is None:
            return
        timeout_s = RESULTS_WAIT_S if holder.get("host") in (None, socket.gethostname()) else OTHER_HOST_WAIT_S
        print(f"{self.round_dir(r)}: its results are {describe_holder(holder, 'written')}; waiting for them "
              f"(up to {timeout_s:.0f} s)", file=sys.stderr)
        holder = wait_released(lock, timeout_s)
        if holder is not None:
            raise RunError(f"{self.round_dir(r)}: its results are {describe_holder(holder, 'written', lock)} for "
                           f"more than {timeout_s:.0f} s; run the command again when they are done")

    RESULT_FILES = ("summary.json", "oof.npz", "test_probs.npz", "decision.json")

    def results_state(self, r: int) -> tuple:
        """What changes when round r's results are written again: each result file's identity (an
        atomic write makes a new file) and time."""
        def state(name):
            try:
                st = os.stat(self.round_dir(r) / name)
            except FileNotFoundError:
                return None
            return st.st_dev, st.st_ino, st.st_mtime_ns
        return tuple(state(name) for name in self.RESULT_FILES)

    def read_settled(self, r: int, read: Callable[[], T], tries: int = 3) -> T:
        """`read()` of round r's results, all of one writing: read again where a process wrote them
        meanwhile (`mt train --fold K` finishing in another shell rewrites the round's vote, decision and
        summary file by file), so that a submission never pairs one fold set's vote with another's
        decision."""
        for _ in range(tries):
            self.wait_for_results(r)
            before = self.results_state(r)
            out = read()
            if lock_holder(self.round_dir(r) / LOCK) is None and self.results_state(r) == before:
                return out
        raise RunError(f"{self.round_dir(r)}: its results were written again while they were read, {tries} times "
                       f"over; run the command again once the folds training into it are done")

    def choose_round(self, n_folds: int, r: int | None = None, can_pick: bool = True) -> tuple[int, str]:
        """Round r, or by default the complete round (every fold done) with the best OOF macro F1
        (rounds are comparable: the same groups in the same folds, and pseudo labels only ever
        train). Returns the round and a line that says why it was chosen, what it lacks, and which
        later rounds are unfinished. `can_pick`: the command has a --round to name one with."""
        for q in self.started_rounds():
            self.wait_for_results(q)
        rounds = self.rounds()
        if not rounds:
            raise FileNotFoundError(self.unfinished(n_folds))
        summaries = {q: read_json(self.round_dir(q) / "summary.json") for q in rounds}
        # a summary's reasons are as old as it is: a fold it found not started may be training now
        missing = {q: {k: self.why_missing_now(q, int(k)) for k in s.get("folds_missing", {})}
                   for q, s in summaries.items()}
        if r is not None:
            if r not in rounds:
                raise FileNotFoundError(f"{self.root}: round {r} is not a finished round (finished: {rounds})")
            why = f"round {r} (asked for)"
        else:
            complete = [q for q in rounds if not missing[q]]
            if not complete:
                q = rounds[-1]
                raise FileNotFoundError(
                    f"{self.root}: no round has every fold done; round {q} lacks "
                    + "; ".join(f"fold {k} ({why})" for k, why in missing[q].items())
                    + f". Finish them (`mt resume --run {self.root}`, or `mt train --fold K` where they are trained)"
                    + (f", or pass --round {q} to use the folds that are done" if can_pick else ""))
            f1 = {q: summaries[q]["oof"]["f1"] for q in complete}
            r = max(complete, key=lambda q: (f1[q], -q))  # a tie goes to the earlier round
            why = (f"round {r}: the best OOF macro F1 of the complete rounds ("
                   + ", ".join(f"round {q} {f1[q]:.4f}" for q in complete) + ")")
        if missing[r]:
            why += f"; only folds {summaries[r]['folds_done']} (missing {', '.join(missing[r])})"
        later = [q for q in self.started_rounds() if q > rounds[-1]]
        if later:
            why += f"; round {later[-1]} is not finished (`mt resume --run {self.root}` finishes it)"
        return r, why

    def shown_round(self, n_folds: int) -> tuple[int, str]:
        """The round to show (report, leaderboard): the one `submit` uses, or where no round has
        every fold, the latest partial one, said so."""
        try:
            return self.choose_round(n_folds)
        except FileNotFoundError:
            rounds = self.rounds()
            if not rounds:
                raise
            return rounds[-1], f"round {rounds[-1]} (the latest; no round has every fold)"
