"""What a prediction reads and writes, in plain Python and numpy (no torch, no pandas): the images
`mt predict` names, the final class under a decision's offsets, and the predictions file. The torch
path (`predict.py`) and the ONNX path (`serve.py`) share it, so both list the same images, decide
alike and write the same columns."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np

from multitask.data.cache import IMAGE_SUFFIXES, ImageDecodeError, undecodable_error
from multitask.labels import Task
from multitask.run import atomic_write_text, atomic_writer

LOG_FLOOR = 1e-12  # added before the log of a probability: a class at exactly 0 still ranks

CHUNK = 2048  # images decoded at a time when predicting: memory stays bounded, whatever the number of images


class ImageListError(ValueError):
    pass


def walk_files(root: Path) -> list[Path]:
    """Every file below `root`, through linked folders too (once each: a link back up would loop),
    and links whose target is gone: listed, the decoder names them, where leaving them out would
    drop images from the predictions unsaid."""
    seen, out = set(), []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [Path(folder) / f for f in files]
    return out


def list_images(source: str | Path) -> tuple[list[str], list[str]]:
    """(ids, paths) of what `mt predict --images` names: a folder (recursively, image files only,
    hidden files and folders skipped; ids relative to it), a CSV with a `path` column (relative to
    the CSV's folder unless absolute; ids as listed), or one image file."""
    src = Path(source)
    if src.is_dir():
        found = sorted(p for p in walk_files(src) if p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not found:
            raise FileNotFoundError(f"{src}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        ids = [p.relative_to(src).as_posix() for p in found]
        check_names(src, ids)
        return ids, [str(p) for p in found]
    if src.suffix.lower() == ".csv":
        if not src.is_file():
            raise FileNotFoundError(f"{src}: file not found")
        try:
            with open(src, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                if "path" not in columns:
                    raise ImageListError(f"{src}: missing column 'path'; found {list(columns)}")
                ids, lines = [], []
                for row in reader:  # the line each row ends on: blank lines are skipped, not counted out
                    ids.append(row["path"] or "")
                    lines.append(reader.line_num)
        except (UnicodeDecodeError, csv.Error) as e:
            raise ImageListError(f"{src}: cannot be read as a CSV file ({e})") from None
        if not ids:
            raise ImageListError(f"{src}: no rows")
        empty = [line for line, p in zip(lines, ids) if not p.strip()]
        if empty:
            more = f" and {len(empty) - 20} more" if len(empty) > 20 else ""
            raise ImageListError(f"{src}: an empty path on line(s) {', '.join(map(str, empty[:20]))}{more}")
        return ids, [p if Path(p).is_absolute() else str(src.parent / p) for p in ids]
    if src.is_file():
        check_names(src.parent, [str(source)])
        return [str(source)], [str(src)]
    raise FileNotFoundError(f"{src}: not found (expected a folder, a CSV with a path column, or an image file)")


def check_names(where: Path, ids: list[str]) -> None:
    """The predictions file is UTF-8 text: a file name the file system holds in another encoding
    cannot be written into it (nor matched back), so it is refused before any work, by its bytes."""
    bad = []
    for name in ids:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(os.fsencode(name))
    if bad:
        listed = ", ".join(repr(b) for b in bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ImageListError(f"{where}: {len(bad)} file name(s) are not UTF-8, which the predictions file must be: "
                             f"{listed}; rename them")


def decide_classes(combined: np.ndarray, offsets) -> np.ndarray:
    """The final classes: the argmax of the final-class probabilities, after a decision's log-prior
    offsets where it has them (None: none)."""
    if offsets is None:
        return combined.argmax(1)
    return (np.log(combined.astype(np.float64) + LOG_FLOOR) + np.asarray(offsets)[None, :]).argmax(1)


def prediction_table(task: Task, ids, combined: np.ndarray, classes: np.ndarray,
                     with_probs: bool = False) -> tuple[list[str], list[list]]:
    """(columns, rows): path, each factor's class name, the final class (mixed radix over the
    factors' class indices) and its probability; with `with_probs`, every factor's probabilities
    (summed out of the final class's, so they hold for any head layout) as p_<factor>_<class>."""
    classes = np.asarray(classes, dtype=np.int64)
    names = task.class_names(classes)
    prob = np.asarray(combined, dtype=np.float64)[np.arange(len(classes)), classes]
    columns = ["path", *task.factor_names, "class", "prob"]
    blocks = [np.asarray(list(ids), dtype=object)[:, None], names, classes[:, None].astype(object),
              prob[:, None].astype(object)]
    if with_probs:
        for i, f in enumerate(task.factors):
            columns += [f"p_{f.name}_{c}" for c in f.classes]
            blocks.append(task.marginal(np.asarray(combined, dtype=np.float64), i).astype(object))
    table = np.concatenate(blocks, axis=1) if len(classes) else np.empty((0, len(columns)), dtype=object)
    return columns, table.tolist()


def write_rows(fh, columns: list[str], rows: list[list], header: bool = True) -> None:
    """CSV as pandas writes it (minimal quoting, '\\n' line ends)."""
    writer = csv.writer(fh, lineterminator="\n")
    if header:
        writer.writerow(columns)
    writer.writerows(rows)


def stream_predictions(task: Task, ids: list[str], paths: list[str], out: str | Path, chunk: int,
                       decode: Callable, predict: Callable, with_probs: bool = False, skip_bad: bool = False,
                       advance: Callable[[int], None] | None = None) -> dict:
    """Write the predictions file `chunk` images at a time (into a temp file, renamed at the end), so
    a test set larger than memory is predicted in bounded memory. `decode(paths)` gives (decoded,
    [(index, why), ...] of the images that failed); `predict(decoded, keep)` gives (final-class
    probabilities, classes) of the kept rows. Undecodable images stop it, all listed at once; with
    `skip_bad` they are left out and listed in <out>.skipped.csv."""
    if chunk < 1:
        raise ValueError(f"chunk {chunk}: images are predicted at least one at a time")
    out = Path(out)
    skipped_file = out.with_name(out.stem + ".skipped.csv")
    bad, written = [], 0
    with atomic_writer(out, "w") as fh:
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            decoded, chunk_bad = decode(part)
            bad += [(start + i, why) for i, why in chunk_bad]
            keep = np.setdiff1d(np.arange(len(part)), [i for i, _ in chunk_bad])
            if len(keep) and (skip_bad or not bad):  # else go on decoding only to list every bad image at once
                combined, classes = predict(decoded, keep)
                columns, rows = prediction_table(task, [ids[start + i] for i in keep], combined, classes, with_probs)
                write_rows(fh, columns, rows, header=written == 0)
                written += len(keep)
            if advance:  # every chunk looked at, predicted or not: the bar reaches its end
                advance(len(part))
        if bad and not skip_bad:
            raise undecodable_error(paths, bad)
        if not written:  # nothing is replaced: an earlier file and its listing stay together
            raise ImageDecodeError(f"none of the {len(paths)} image(s) could be decoded; {undecodable_error(paths, bad)}",
                                   bad)
        # the earlier listing goes before the file it lists for is replaced, the new one comes after it:
        # a kill between the two leaves no listing, never one beside a file it does not describe
        skipped_file.unlink(missing_ok=True)
    if bad:
        listing = io.StringIO()
        write_rows(listing, ["path", "reason"], [[ids[i], why] for i, why in bad])
        atomic_write_text(skipped_file, listing.getvalue())
    return {"out": str(out), "predicted": written, "skipped": len(bad), "skipped_file": str(skipped_file) if bad else None}
