"""The image table every stage reads, and the reader of table tasks (a CSV or parquet file with one
row per training image, its factors described in the config).

Train rows carry `group` (rows of a group never split across folds), `path`, `where` (the file and
line they came from, for error messages), one integer column per factor (its class index) and, for a
binned numeric factor, `<factor>_value` with the number itself. Test rows carry `image_id` and `path`.
The competition reader (`layout.py`) returns the same table, so one path leads from either to folds,
cache, heads, voting, pseudo-labels and predictions.
"""
from __future__ import annotations

import csv
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.config import TableTaskCfg
from multitask.labels import Task

MAX_LISTED = 50  # problems listed in one error; the rest are counted


class DataError(ValueError):
    pass


SKIPPED_COLUMNS = ["where", "path", "reason"]


@dataclass
class ImageTable:
    train: pd.DataFrame
    test: pd.DataFrame | None  # None when the task has no test images
    info_csv: Path | None = None  # the competition's info.csv: its submission follows that file
    # training items left out by `data.skip_bad`, and why
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))

    def test_ids(self) -> np.ndarray:
        """The test images' ids as strings, in the test list's order: what every file of test
        predictions records, and is checked against."""
        return self.test["image_id"].to_numpy().astype(str)

    def train_ids(self) -> np.ndarray:
        """Each training image's path below the folder that holds them all: the same wherever the data
        set is moved, and different when the table lists other images."""
        paths = self.train["path"].astype(str).tolist()
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        return np.array([os.path.relpath(p, root) for p in paths])

    def skip(self, rows, reasons: list[str]) -> None:
        """Leave out train rows (positions in `train`), recording why."""
        rows = np.asarray(rows, dtype=np.int64)
        gone = self.train.iloc[rows]
        self.skipped = pd.concat([self.skipped, pd.DataFrame({
            "where": gone["where"].to_numpy() if "where" in gone else gone["path"].to_numpy(),
            "path": gone["path"].to_numpy(), "reason": list(reasons)})], ignore_index=True)
        self.train = self.train.drop(index=self.train.index[rows]).reset_index(drop=True)
        if self.train.empty:
            raise DataError("every training item has a problem; nothing is left to train on:\n  "
                            + "\n  ".join(f"{w}: {r}" for w, r in zip(self.skipped["where"].head(MAX_LISTED),
                                                                     self.skipped["reason"])))


def value_column(factor: str) -> str:
    return f"{factor}_value"


def factor_values(df: pd.DataFrame, task: Task) -> np.ndarray:
    """The table's factor columns as an (N, F) int64 array in task order."""
    return df[task.factor_names].to_numpy(dtype=np.int64)


def numeric_values(df: pd.DataFrame, task: Task) -> dict[str, np.ndarray]:
    """The numbers behind each binned factor, float64 (N,)."""
    return {f.name: df[value_column(f.name)].to_numpy(dtype=np.float64) for f in task.numeric_factors}


def numeric_matrix(df: pd.DataFrame, task: Task) -> np.ndarray:
    """(N, V) the numbers behind the task's numeric factors, in task order (V may be 0)."""
    return np.column_stack([np.zeros((len(df), 0)), *numeric_values(df, task).values()])


def first_line(problem: str) -> float:
    """The first line (or row) a problem names: the checks run column by column, the list reads by line."""
    m = re.search(r"\b(?:line|row) (\d+)", problem)
    return int(m.group(1)) if m else math.inf


def problems_error(source: Path | str, problems: list[str], kind: type[DataError] = DataError) -> DataError:
    listed = sorted(problems, key=first_line)[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return kind(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(listed) + more)


def read_csv_cells(path: Path) -> pd.DataFrame:
    """Every cell of a CSV as a string ('' where missing). A row with more fields than the header is
    refused by its line: on the first data row pandas would take the first column for an index and
    shift every other one left (a trailing comma on every row, as some spreadsheets write, alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
        except pd.errors.ParserWarning:
            pass
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = next(rows)
        line, n = next(((rows.line_num, len(r)) for r in rows if len(r) > len(header)), (None, None))
    if line is None:  # the csv module split the rows otherwise than pandas did
        raise ValueError(f"a row has more fields than the header's {len(header)}")
    raise ValueError(f"line {line} has {n} fields, the header {len(header)}")


def read_frame(path: Path, named_by: str) -> tuple[pd.DataFrame, str]:
    """Every cell as a string ('' where missing), and how its rows are named in messages ('line' for
    a CSV, counting the header; 'row' for parquet)."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder; a table task reads a table file, CSV or parquet ({named_by})")
    if not path.is_file():
        raise DataError(f"{path}: file not found ({named_by})")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            # nullable dtypes: an integer column with a null stays integer (numpy's would make 0 read '0.0')
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")
            return df.astype(object).where(df.notna(), "").astype(str), "row"
        return read_csv_cells(path), "line"
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow ({e}); `pip install pyarrow`, or use CSV") from None
    except Exception as e:  # pandas raises many kinds for a broken file
        raise DataError(f"{path}: cannot be read as a table ({e})") from None


def row_names(path: Path, kind: str, n: int) -> list[str]:
    """Where each of the n rows read from `path` is: a CSV row by the line it starts on (pandas skips
    blank lines and a quoted field may hold line breaks, so row i is not always line i + 2), a
    parquet row, or a CSV row the csv module splits otherwise than pandas did, by its number."""
    if kind == "line":
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = csv.reader(fh)
                next(rows, None)
                starts, end = [], rows.line_num
                for record in rows:
                    if any(field.strip() for field in record) or len(record) > 1:  # as pandas skips blank lines
                        starts.append(end + 1)
                    end = rows.line_num
        except (OSError, UnicodeDecodeError, csv.Error):  # a compressed CSV (pandas reads .csv.gz), a huge field
            starts = []
        if len(starts) == n:
            return [f"line {line}" for line in starts]
    return [f"row {i + 1}" for i in range(n)]


def image_path(root: Path, rel: str, folder: bool = False) -> tuple[Path | None, str | None]:
    """The image's path under `root` (a folder's with `folder`), or why it is refused: missing,
    absolute, escaping the root (by '..' or a link), or not a file."""
    if not rel.strip():
        return None, "empty path"
    if Path(rel).is_absolute():
        return None, f"path {rel!r} is absolute; paths are relative to {root}"
    p = root / rel
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        links = [root.joinpath(*Path(rel).parts[:i]) for i in range(1, len(Path(rel).parts) + 1)]
        link = next((q for q in links if q.is_symlink()), None)
        if link is None:
            return None, f"path {rel!r} leads out of {root}"
        # a link out of the root is refused: a test image linked to a training image would be both
        return None, (f"path {rel!r} leads out of {root} through the link {link} (to {link.resolve()}); "
                      f"make the root the folder the files are in (task.images for a table), or copy them")
    try:
        mode = p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = 0
    except OSError as e:  # a name too long for the filesystem, a folder it may not enter
        return None, f"path {rel!r} cannot be read: {e.strerror or e}"
    if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        return None, f"{'image folder' if folder else 'image'} {p} not found"
    return p, None


def listed_before(seen: dict[Path, tuple[str, str]], path: Path, name: str, where: str) -> str | None:
    """Where the file or folder `path` was listed before ("first at WHERE", with ", as 'NAME'" where it
    was named otherwise), or None the first time, when it is recorded in `seen`. By the file itself,
    not the string: `a/0.jpg` and `./a/0.jpg`, or `person` and `person/`, would otherwise be two rows
    (two groups), and one picture could sit in a training and a validation fold."""
    key = path.resolve()
    if key not in seen:
        seen[key] = (where, name)
        return None
    first, first_name = seen[key]
    return f"first at {first}" + ("" if first_name == name else f", as {first_name!r}")


def check_paths(df: pd.DataFrame, col: str, root: Path, where: list[str], problems: list[str]) -> list[str | None]:
    paths = []
    seen: dict[Path, tuple[str, str]] = {}
    for rel, w in zip(df[col], where):
        p, why = image_path(root, rel)
        if why:
            problems.append(f"{w}: {why}")
        elif first := listed_before(seen, p, rel, w):
            problems.append(f"{w}: duplicate path {rel!r} ({first})")
            p = None
        paths.append(str(p) if p else None)
    return paths


def read_table(cfg: TableTaskCfg, task: Task, skip_bad: bool = False) -> ImageTable:
    """Read and check a table task; every problem is listed at once, by file and line. With
    `skip_bad`, rows with a problem are left out instead (a group's problem leaves out the group),
    and the table says which and why."""
    table = Path(cfg.table)
    images = Path(cfg.images) if cfg.images else table.parent
    df, kind = read_frame(table, "task.table in the config, or --data TABLE.csv")
    columns = [cfg.path_col] + ([cfg.group_col] if cfg.group_col else []) + [f.column or f.name for f in cfg.factors]
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise DataError(f"{table}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise DataError(f"{table}: the table has no rows")
    where = row_names(table, kind, len(df))
    problems: list[str] = []
    paths = check_paths(df, cfg.path_col, images, where, problems)
    out = pd.DataFrame({"path": paths, "where": [f"{table} {w}" for w in where]})
    out["group"] = df[cfg.group_col].str.strip().to_numpy() if cfg.group_col else df[cfg.path_col].to_numpy()
    if cfg.group_col:
        problems += [f"{w}: empty group ({cfg.group_col!r})" for w, g in zip(where, out["group"]) if not g]
    for fc, factor in zip(cfg.factors, task.factors):
        col = df[fc.column or fc.name].str.strip()
        if factor.numeric:
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            bad = ~np.isfinite(values)
            problems += [f"{w}: {fc.name} {v!r} is not a number" for w, v, b in zip(where, col, bad) if b]
            if factor.integer:
                broken = ~bad & (values != np.round(values))
                problems += [f"{w}: {fc.name} {v!r} is not a whole number (the factor says integer: true)"
                             for w, v, b in zip(where, col, broken) if b]
                bad |= broken
            out[value_column(fc.name)] = values
            out[fc.name] = np.where(bad, -1, factor.bin(np.nan_to_num(values)))
        else:
            index = {c: i for i, c in enumerate(factor.classes)}
            codes = col.map(index)
            problems += [f"{w}: {fc.name} {v!r} is not one of {list(factor.classes)}"
                         for w, v, c in zip(where, col, codes) if pd.isna(c)]
            out[fc.name] = codes.fillna(-1).to_numpy(dtype=np.int64)
    for fc in cfg.factors:
        if fc.per_group:
            problems += group_disagreements(out, fc.name)
    reasons, unplaced = problems_by_row(problems, where, out["group"].tolist())
    try:  # the test table's problems are listed with the training table's, not found on the next try
        test, test_error = read_test_table(cfg, images, out), None
    except DataError as e:
        test, test_error = None, e
    if problems and (not skip_bad or unplaced):
        error = problems_error(table, problems)
        raise DataError(f"{error}\n{test_error}") if test_error else error
    if test_error:
        raise test_error
    result = ImageTable(out, test)
    if problems:
        rows = [i for i, r in enumerate(reasons) if r]
        result.skip(rows, [reasons[i] for i in rows])
    return result


def problems_by_row(problems: list[str], where: list[str], groups: list[str]) -> tuple[list[str], list[str]]:
    """Each row's problems ('' for none), from messages that start with the row's name or with its
    group (`group 'g': ...`); and the problems that name neither."""
    index = {w: i for i, w in enumerate(where)}
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(repr(g), []).append(i)
    out: list[list[str]] = [[] for _ in where]
    unplaced = []
    for text in problems:
        rows, cut = [], text.find(": ")
        while not rows and cut >= 0:  # a group's name may hold ": " itself: try each place the head may end
            head, rest = text[:cut], text[cut + 2:]
            rows = [index[head]] if head in index else members.get(head[len("group "):], []) if head.startswith("group ") else []
            cut = text.find(": ", cut + 1)
        for i in rows:
            out[i].append(rest)
        if not rows:
            unplaced.append(text)
    return ["; ".join(x) for x in out], unplaced


def group_disagreements(df: pd.DataFrame, factor: str) -> list[str]:
    valid = df[df[factor] >= 0]
    counts = valid.groupby("group")[factor].nunique()
    out = []
    for g in counts[counts > 1].index:
        rows = valid[valid["group"] == g]
        lines = ", ".join(rows["where"].str.rsplit(" ", n=2).str[-2:].str.join(" ").head(4))
        out.append(f"group {g!r}: rows disagree on {factor} ({lines}), which is set per group")
    return out


def read_test_table(cfg: TableTaskCfg, images: Path, train: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """The test images; one that is also a training image (of `train`) is refused: through pseudo
    labels it would teach each fold its own validation pictures, and it would score itself."""
    if not cfg.test:
        return None
    path = Path(cfg.test)
    df, kind = read_frame(path, "task.test in the config, relative to the table's folder")
    if cfg.path_col not in df.columns:
        raise DataError(f"{path}: missing column {cfg.path_col!r}; found {list(df.columns)}")
    if df.empty:
        raise DataError(f"{path}: the table has no rows")
    problems: list[str] = []
    where = row_names(path, kind, len(df))
    paths = check_paths(df, cfg.path_col, images, where, problems)
    if train is not None:
        # by the file itself, as listed_before: `a/../a/0.jpg` or a link inside the root is the same picture
        trained = {Path(p).resolve(): w for p, w in zip(train["path"], train["where"]) if pd.notna(p)}
        for w, p in zip(where, paths):
            first = trained.get(Path(p).resolve()) if p is not None else None
            if first is not None:
                problems.append(f"{w}: {p} is also a training image ({first}); a test image must be one the folds "
                                f"do not train on")
    if problems:
        raise problems_error(path, problems)
    return pd.DataFrame({"image_id": df[cfg.path_col].to_numpy(), "path": paths})
