#!/usr/bin/env python3
"""Turn the UTKFace crops (../shared/data/utkface) into a table task for the `mt` framework.

Makes, under --out:
  images/<name>   a copy of each selected face (real files, no symlinks)
  train.csv       path,age,gender,race  (path = images/<name>; one face per row, no groups)
  test.csv        path                  (the held-out faces)
  answers.csv     path,age,gender,race  (labels of test.csv, same order; keep it away from training)

Labels come from the file name AGE_GENDER_RACE_TIMESTAMP.jpg.chip.jpg (gender 0 male / 1 female;
race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others). Files whose name does not parse are skipped
and reported on stderr. Deterministic for a given --seed.

Caveat: two builds with different --limit share faces (the first N of the same shuffle, and the
test set is the tail of those N), so score a model only against its own build's answers.csv.

  python scripts/utkface_table.py --faces ../shared/data/utkface --out /tmp/utktable --limit 300
"""
import argparse
import csv
import json
import os
import re
import shutil
import sys

import numpy as np

NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg\.chip\.jpg$")


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= test-frac < 1, got {text}")
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def write_csv(path, header, rows):
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", required=True, help="folder of UTKFace *.jpg.chip.jpg crops")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--limit", type=positive, default=None, help="use the first N shuffled faces")
    ap.add_argument("--test-frac", type=fraction, default=0.2, help="held-out fraction, 0 <= f < 1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    names = sorted(e.name for e in os.scandir(args.faces) if e.is_file())
    faces = [(n, NAME.match(n)) for n in names]
    skipped = [n for n, m in faces if m is None]
    faces = [(n, m) for n, m in faces if m is not None]
    faces = [faces[i] for i in np.random.default_rng(args.seed).permutation(len(faces))]
    faces = faces[: args.limit]
    n_test = round(args.test_frac * len(faces))
    if len(faces) - n_test < 1:
        sys.exit(f"error: no training faces left ({len(faces)} parsed, {n_test} held out)")

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    rows = []
    for name, m in faces:
        src, dst = os.path.join(args.faces, name), os.path.join(args.out, "images", name)
        if not (os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(src)):
            if os.path.lexists(dst):
                os.remove(dst)  # a copy of a read-only source cannot be overwritten in place
            shutil.copy2(src, dst)
        rows.append([f"images/{name}", int(m[1]), m[2], m[3]])
    train, test = rows[: len(rows) - n_test], rows[len(rows) - n_test:]

    header = ["path", "age", "gender", "race"]
    write_csv(os.path.join(args.out, "train.csv"), header, train)
    write_csv(os.path.join(args.out, "test.csv"), ["path"], [r[:1] for r in test])
    write_csv(os.path.join(args.out, "answers.csv"), header, test)
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} file(s) whose name does not parse: {shown}", file=sys.stderr)
    print(json.dumps({"train": len(train), "test": len(test), "skipped_names": len(skipped),
                      "out": os.path.abspath(args.out)}))


if __name__ == "__main__":
    main()
