#!/usr/bin/env python3
"""The UTKFace faces a competition-layout build did not use: material for a checkpoint that already
knows faces (docs/RESULTS.md, "Weights that already know faces"), with none of the build's persons in it.

build_maskset.py shuffles the faces with --seed and keeps the first --limit; this script repeats that
shuffle, checks it against the build's train.csv (each training person's age, gender and race), and
links every other face into --out, leaving out those whose picture looks like one of the build's
(the correlation of their 32 x 32 grey pictures above --alike: UTKFace holds near-copies of some
photos under other names and ages).

  python scripts/faces_outside.py --faces ../shared/data/utkface --build /tmp/mask600 --limit 600 --out /tmp/other

Prints one JSON line: the build's faces, the faces outside it, and those left out as alike.
"""
import argparse
import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


def builder(tools: Path):
    """build_maskset.py as a module: its own parsing and label names, so the shuffle is its own."""
    if not (tools / "build_maskset.py").is_file():
        sys.exit(f"{tools / 'build_maskset.py'}: not found (--tools names the folder that holds it)")
    sys.path.insert(0, str(tools))
    import build_maskset

    return build_maskset


def shuffled_faces(b, faces_dir: Path, seed: int) -> list[tuple]:
    """(file, age, gender, race) in the order build_maskset.py gives its persons."""
    faces = []
    for f in sorted(faces_dir.glob("*.jpg")):
        lab = b.parse_face(f.name)
        if lab and lab[0] >= 18 and lab[1] in b.GENDERS and lab[2] in b.RACES:
            faces.append((f, *lab))
    random.Random(seed).shuffle(faces)
    return faces


def check_build(b, faces: list[tuple], build: Path, limit: int, used: int) -> None:
    """Every training person of the build is the face this shuffle puts at its place, and the last of
    them is face `used`, the number of faces a build with --limit `limit` takes (its training persons
    are the last of them)."""
    table = build / "train" / "train.csv"
    last = 0
    with open(table, newline="") as fh:
        for row in csv.DictReader(fh):
            last = max(last, int(row["id"]))
            i = int(row["id"]) - 1
            want = (int(row["age"]), row["gender"], row["race"])
            got = (faces[i][1], b.GENDERS[faces[i][2]], b.RACES[faces[i][3]]) if i < len(faces) else "no face"
            if got != want:
                sys.exit(f"{table}: person {row['id']} is {want}, and this shuffle puts {got} there: not a build "
                         f"of these faces with this --seed")
    if last != used:  # a smaller --limit would put the build's own later persons among the outside faces
        sys.exit(f"{table}: the build's last person is face {last}, so it was built with --limit {last}, not {limit}")


def grey(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("L").resize((32, 32)), dtype=np.float32).ravel()
    a = a - a.mean()
    return a / (np.linalg.norm(a) + 1e-6)


def alike(inside: list[Path], outside: list[Path], threshold: float) -> np.ndarray:
    """For each outside picture: does it correlate above `threshold` with any inside one?"""
    if not inside or not outside:
        return np.zeros(len(outside), bool)
    a, b = np.stack([grey(p) for p in inside]), np.stack([grey(p) for p in outside])
    return (b @ a.T).max(1) > threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", required=True, type=Path, help="the folder build_maskset.py read")
    ap.add_argument("--build", required=True, type=Path, help="the build (its train/train.csv is checked)")
    ap.add_argument("--limit", required=True, type=int, help="the build's --limit")
    ap.add_argument("--seed", type=int, default=0, help="the build's --seed")
    ap.add_argument("--out", required=True, type=Path, help="folder for links to the faces outside the build")
    ap.add_argument("--alike", type=float, default=0.9, help="leave out faces that correlate above this with one of the build's")
    ap.add_argument("--tools", type=Path, default=TOOLS, help="the folder of build_maskset.py")
    a = ap.parse_args()
    b = builder(a.tools)
    faces = shuffled_faces(b, a.faces, a.seed)
    used = min(a.limit, len(faces)) if a.limit > 0 else len(faces)  # build_maskset.py's 0 (or more than there are): all
    check_build(b, faces, a.build, a.limit, used)
    inside, outside = faces[:used], faces[used:]
    near = alike([f for f, *_ in inside], [f for f, *_ in outside], a.alike)
    a.out.mkdir(parents=True, exist_ok=True)
    if any(a.out.iterdir()):
        sys.exit(f"{a.out}: not empty; give a new folder")
    for (f, *_), drop in zip(outside, near):
        if not drop:
            (a.out / f.name).symlink_to(f.resolve())
    print(json.dumps({"build_faces": len(inside), "outside": int((~near).sum()), "left_out_alike": int(near.sum()),
                      "out": str(a.out)}))


if __name__ == "__main__":
    main()
