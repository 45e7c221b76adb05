"""A small synthetic stand-in for the mask competition, written in its exact on-disk layout.

Cartoon faces carry the three labels as drawn cues big enough to survive a 64x64 resize:
mask (worn / below the nose or on the chin / none), gender (short hair on top / long hair down to
the shoulders) and age group (dark / salt-and-pepper / white hair, plus forehead wrinkles).
Class = mask*6 + gender*3 + age_group, as in `multitask.labels.mask_task()`.

Everything is drawn from seeded numpy Generators, so a seed gives byte-identical files; it lets the
whole pipeline (layout reader, cache, training, voting, submission) run end to end without the real
photos.

`make_table_dataset` writes a second, simpler set for the table-task mode (a CSV of picture paths
with a group column and several label columns): one filled circle or square per picture, whose shape
and size belong to the group and whose colour belongs to the picture.
"""
from __future__ import annotations

import csv
import hashlib
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TRAIN_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_STEM = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = ("male", "female")
RACES = ("White", "Black", "Asian", "Indian", "Others")
AGE_RANGES = ((18, 29), (30, 59), (60, 80))  # inclusive, one per age group
AGE_EDGES = (30, 60)  # where AGE_RANGES' groups meet: the answers' age groups
JPEG_QUALITY = 90

SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 86), (141, 85, 54), (100, 62, 40))
YOUNG_HAIR = ((40, 26, 16), (22, 18, 18), (70, 45, 25), (168, 128, 60))  # brown, black, dark brown, dark blond
MID_HAIR = ((95, 92, 90), (110, 104, 98), (85, 80, 78))  # darker grey base, speckled lighter below
OLD_HAIR = ((236, 236, 232), (215, 215, 212), (245, 242, 235))
MASK_COLOURS = ((150, 200, 235), (245, 245, 245), (30, 30, 35), (235, 150, 180), (35, 50, 110),
                (120, 190, 120), (140, 140, 150), (200, 60, 50))
SHIRT_COLOURS = ((60, 90, 160), (160, 40, 50), (40, 120, 80), (200, 180, 60), (90, 90, 90), (220, 220, 220))

TABLE_SHAPES = ("circle", "square")
TABLE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
TABLE_SIZE_BINS = ((10, 20), (20, 30), (30, 40))  # [lo, hi) of `size`; drawn in tenths, so never rounds across


def make_demo_dataset(out, n_train_persons: int = 60, n_eval_persons: int = 20,
                      image_size: tuple[int, int] = (128, 96), seed: int = 0, workers: int = 1) -> dict:
    """Write the data set under `out` (str or Path); return {"root": Path, "answers": Path, "n_train_images": int, "n_eval_images": int}.

    Layout: train/train.csv + train/images/<id_gender_race_age>/{mask1..5,incorrect_mask,normal}.<ext>,
    eval/info.csv + eval/images/<sha1>.jpg, and answers.csv (true classes of the eval images) beside,
    not inside, eval/ so a reader of eval/ cannot peek. `image_size` is (height, width). `workers`
    processes draw persons in parallel (a competition-size set is minutes of drawing on one core);
    each person has its own generator, so the files do not depend on it.
    """
    if n_train_persons < 0 or n_eval_persons < 0:
        raise ValueError("person counts must be >= 0")
    height, width = (int(v) for v in image_size)
    if height < 32 or width < 24:
        raise ValueError(f"image_size (height, width) must be at least (32, 24), got {image_size}")
    root = Path(out)
    train_dir, eval_dir = root / "train", root / "eval"
    (train_dir / "images").mkdir(parents=True, exist_ok=True)
    if n_eval_persons:
        (eval_dir / "images").mkdir(parents=True, exist_ok=True)
    elif eval_dir.is_dir():
        # no eval/ at all without test persons (an info.csv listing none is refused); an earlier
        # call's would be read as this set's test images while answers.csv lists none
        shutil.rmtree(eval_dir)

    jobs = [(_write_train_person, (train_dir, i, p, (height, width)))
            for i, p in enumerate(_people(n_train_persons, seed, split=0))]
    # eval ids continue after train's so eval people are never train people, even in the hash
    jobs += [(_write_eval_person, (eval_dir, f"{n_train_persons + j + 1:06d}", p, (height, width), seed))
             for j, p in enumerate(_people(n_eval_persons, seed, split=1))]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may hold CUDA or threads, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_call, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        results = [_call(job) for job in jobs]
    train_rows = results[:n_train_persons]
    eval_rows = [row for rows in results[n_train_persons:] for row in rows]
    # the competition's info.csv is not grouped by person; a grouped order would leak identity
    order = np.random.default_rng([seed, 2]).permutation(len(eval_rows))
    eval_rows = [eval_rows[k] for k in order]

    _write_csv(train_dir / "train.csv", ["id", "gender", "race", "age", "path"], train_rows)
    if n_eval_persons:
        _write_csv(eval_dir / "info.csv", ["ImageID", "ans"], [[r[0], 0] for r in eval_rows])
    answers = root / "answers.csv"
    _write_csv(answers, ["ImageID", "ans"], eval_rows)
    return {"root": root, "answers": answers,
            "n_train_images": len(train_rows) * len(TRAIN_STEMS), "n_eval_images": len(eval_rows)}


def make_table_dataset(out, n_train_groups: int = 12, n_test_groups: int = 4, per_group: int = 3,
                       image_size: tuple[int, int] = (48, 48), seed: int = 0) -> dict:
    """Write the table-task set under `out` (str or Path); return {"root", "table", "test", "answers": Path,
    "n_train_images", "n_test_images": int}.

    Layout: images/<group>/<k>.<jpg|png>, train.csv (path,group,shape,colour,size), test.csv (path)
    and answers.csv (path,shape,colour,size, in test.csv's order); paths are relative to `out` with
    forward slashes. shape and size are per group, colour per picture, so a reader must keep group
    labels and picture labels apart. Test groups are numbered after the train ones so no group name
    is shared. `image_size` is (height, width).
    """
    if n_train_groups < 0 or n_test_groups < 0:
        raise ValueError("group counts must be >= 0")
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    height, width = (int(v) for v in image_size)
    if height < 24 or width < 24:
        raise ValueError(f"image_size (height, width) must be at least (24, 24), got {image_size}")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)

    train_rows = []
    for i, g in enumerate(_table_groups(n_train_groups, per_group, seed, split=0)):
        train_rows += _write_table_group(root, f"g{i + 1:04d}", g, (height, width))
    test_rows = []
    for j, g in enumerate(_table_groups(n_test_groups, per_group, seed, split=1)):
        test_rows += _write_table_group(root, f"g{n_train_groups + j + 1:04d}", g, (height, width))
    # grouped, the test order would tell a reader which pictures share a group (hence shape and size)
    order = np.random.default_rng([seed, 2, 13]).permutation(len(test_rows))
    test_rows = [test_rows[k] for k in order]

    table, test, answers = root / "train.csv", root / "test.csv", root / "answers.csv"
    _write_csv(table, ["path", "group", "shape", "colour", "size"], train_rows)
    _write_csv(test, ["path"], [[r[0]] for r in test_rows])
    _write_csv(answers, ["path", "shape", "colour", "size"], [[r[0], r[2], r[3], r[4]] for r in test_rows])
    return {"root": root, "table": table, "test": test, "answers": answers,
            "n_train_images": len(train_rows), "n_test_images": len(test_rows)}


def _table_groups(n: int, per_group: int, seed: int, split: int) -> list[dict]:
    """Per-group labels and per-picture colours.

    (shape, size bin) is a shuffled balanced cycle, as in `_people`, so any n >= 6 covers both shapes
    and all three size bins. Colours follow the split's picture index j in blocks of four, each block
    a permutation of the four colours with its own generator: any 8 consecutive pictures of a split
    (so any group of >= 8 and the train set of >= 8 pictures) show every colour, colour stays independent of
    shape and size, and earlier blocks don't shift when counts change.
    """
    rng = np.random.default_rng([seed, split, 11])
    n_combos = len(TABLE_SHAPES) * len(TABLE_SIZE_BINS)
    combos = rng.permutation(np.tile(np.arange(n_combos), -(-n // n_combos))[:n]) if n else np.zeros(0, int)
    names = list(TABLE_COLOURS)
    blocks: dict[int, np.ndarray] = {}
    groups = []
    for i, combo in enumerate(combos):
        # one generator per group: a group's pictures don't shift when n changes elsewhere
        grng = np.random.default_rng([seed, split, i, 13])
        shape, size_bin = TABLE_SHAPES[int(combo) // 3], int(combo) % 3
        lo, hi = TABLE_SIZE_BINS[size_bin]
        size = int(grng.integers(lo * 10, hi * 10)) / 10  # the written value is the drawn one, exactly
        colours, exts = [], []
        for k in range(per_group):
            j = i * per_group + k
            if j // 4 not in blocks:
                blocks[j // 4] = np.random.default_rng([seed, split, j // 4, 5]).permutation(4)
            colours.append(names[int(blocks[j // 4][j % 4])])
            exts.append(".png" if j % 4 == 3 else ".jpg")  # by index: both formats in any 4 pictures
        groups.append({"rng": grng, "shape": shape, "size": size, "colours": colours, "exts": exts})
    return groups


def _write_table_group(root: Path, name: str, g: dict, size: tuple[int, int]) -> list[list]:
    group_dir = root / "images" / name
    group_dir.mkdir(exist_ok=True)
    rows = []
    for k, (colour, ext) in enumerate(zip(g["colours"], g["exts"])):
        _save(_draw_table_picture(g["shape"], colour, g["size"], size, g["rng"]), group_dir / f"{k}{ext}")
        rows.append([f"images/{name}/{k}{ext}", name, g["shape"], colour, f"{g['size']:.1f}"])
    return rows


def _draw_table_picture(shape: str, colour: str, label_size: float, size: tuple[int, int],
                        rng: np.random.Generator) -> Image.Image:
    """A grey, mildly noisy background with one filled shape.

    Grey, not `_background`'s random tint, so the colour label is the only saturated colour in the
    picture. radius = size/40 * 0.45 * min(h, w): from 11% to 45% of the short side, still a few
    pixels apart per size bin after a 32x32 resize. The centre jitter is capped at 6% of the short
    side and by the room left to the edges, so the shape stays inside the frame and covers the
    middle of the picture.
    """
    h, w = size
    grey = rng.uniform(90, 200)
    arr = grey + rng.uniform(-12, 12, 3) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    r = label_size / 40 * 0.45 * min(h, w)
    jx = max(0.0, min(0.06 * min(h, w), w / 2 - r - 1))
    jy = max(0.0, min(0.06 * min(h, w), h / 2 - r - 1))
    cx, cy = w / 2 + rng.uniform(-jx, jx), h / 2 + rng.uniform(-jy, jy)
    fill = tuple(int(v) for v in np.clip(np.array(TABLE_COLOURS[colour]) + rng.uniform(-10, 10, 3), 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.rectangle(box, fill=fill)
    arr = np.asarray(img, float) + rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _call(job):
    fn, args = job
    return fn(*args)


def _write_train_person(train_dir: Path, i: int, person: dict, size: tuple[int, int]) -> list:
    pid = f"{i + 1:06d}"
    folder = f"{pid}_{person['gender_name']}_{person['race']}_{person['age']}"
    ext = _train_extension(i)
    person_dir = train_dir / "images" / folder
    person_dir.mkdir(exist_ok=True)
    for stem in TRAIN_STEMS:
        _save(_draw_picture(person, MASK_OF_STEM[stem], size, person["rng"]), person_dir / f"{stem}{ext}")
    return [pid, person["gender_name"], person["race"], person["age"], folder]


def _write_eval_person(eval_dir: Path, pid: str, person: dict, size: tuple[int, int], seed: int) -> list[list]:
    rows = []
    for stem in TRAIN_STEMS:
        mask = MASK_OF_STEM[stem]
        image_id = hashlib.sha1(f"{seed}/{pid}/{stem}".encode()).hexdigest() + ".jpg"
        _save(_draw_picture(person, mask, size, person["rng"]), eval_dir / "images" / image_id)
        rows.append([image_id, mask * 6 + person["gender"] * 3 + person["age_group"]])
    return rows


def _people(n: int, seed: int, split: int) -> list[dict]:
    """Per-person attributes; (gender, age group) is a shuffled balanced cycle so that any n >= 6
    covers all six combinations (hence all 18 classes) while each stays uniform in distribution."""
    rng = np.random.default_rng([seed, split])
    combos = rng.permutation(np.tile(np.arange(6), -(-n // 6))[:n]) if n else np.zeros(0, int)
    people = []
    for i, combo in enumerate(combos):
        # one generator per person: a person's pictures don't shift when n changes elsewhere
        prng = np.random.default_rng([seed, split, i, 7])
        gender, age_group = int(combo) // 3, int(combo) % 3
        lo, hi = AGE_RANGES[age_group]
        hair_palette = (YOUNG_HAIR, MID_HAIR, OLD_HAIR)[age_group]
        skin = np.array(SKIN_TONES[prng.integers(len(SKIN_TONES))], float) + prng.uniform(-10, 10, 3)
        people.append({
            "rng": prng,
            "gender": gender,
            "gender_name": GENDERS[gender],
            "age_group": age_group,
            "age": int(prng.integers(lo, hi + 1)),
            "race": RACES[prng.integers(len(RACES))],
            "skin": tuple(int(v) for v in np.clip(skin, 0, 255)),
            "hair": hair_palette[prng.integers(len(hair_palette))],
            "shirt": SHIRT_COLOURS[prng.integers(len(SHIRT_COLOURS))],
            "face_w": (0.28 if gender == 0 else 0.24) * prng.uniform(0.95, 1.05),
            "hair_len": prng.uniform(0.10, 0.16),  # how far long hair falls below the chin, in heights
            "cap_h": prng.uniform(0.95, 1.05),
        })
    return people


def _train_extension(i: int) -> str:
    # by index rather than at random: the first 8 persons, and any 10 in a row, show all three extensions
    return {3: ".jpeg", 7: ".png"}.get(i % 10, ".jpg")


def _draw_picture(p: dict, mask: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    h, w = size
    img = _background(size, rng)
    d = ImageDraw.Draw(img)
    scale = rng.uniform(0.92, 1.08)
    cx = w * (0.5 + rng.uniform(-0.04, 0.04))
    cy = h * (0.44 + rng.uniform(-0.03, 0.03))
    fw, fh = p["face_w"] * w * scale, 0.25 * h * scale
    lw = max(1, round(h / 64))  # survives the halving to 64 px as at least one pixel
    hair = _hair_texture(p, size, rng)

    # shoulders and shirt
    d.ellipse((cx - 0.62 * w, cy + fh + 0.05 * h, cx + 0.62 * w, cy + fh + 0.75 * h), fill=p["shirt"])
    if p["gender"] == 1:
        back = Image.new("L", (w, h), 0)
        ImageDraw.Draw(back).rounded_rectangle(
            (cx - fw * 1.4, cy - fh * 1.12, cx + fw * 1.4, cy + fh + p["hair_len"] * h), radius=fw * 0.7, fill=255)
        img.paste(hair, (0, 0), back)
    d.rectangle((cx - fw * 0.35, cy + fh * 0.6, cx + fw * 0.35, cy + fh + 0.07 * h), fill=_shade(p["skin"], 0.9))
    d.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=p["skin"])

    # hair cap over the top of the head; bottom edge at ~0.8 fh above centre leaves a forehead
    cap = Image.new("L", (w, h), 0)
    ch = p["cap_h"]
    cap_draw = ImageDraw.Draw(cap)
    cap_draw.chord((cx - fw * 1.06, cy - fh * 1.16 * ch, cx + fw * 1.06, cy - fh * 0.44), 180, 360, fill=255)
    if p["gender"] == 0:  # sideburns, so short hair reads as hair rather than a hat
        for x0, x1 in ((cx - fw * 1.03, cx - fw * 0.8), (cx + fw * 0.8, cx + fw * 1.03)):
            cap_draw.rectangle((x0, cy - fh * 0.85, x1, cy - fh * 0.2), fill=255)
    img.paste(hair, (0, 0), cap)

    dark = _shade(p["skin"], 0.55)
    ex, ey, er = 0.4 * fw, cy - 0.15 * fh, 0.11 * fw
    for sx in (-1, 1):
        d.ellipse((cx + sx * ex - er * 1.4, ey - er, cx + sx * ex + er * 1.4, ey + er), fill=(250, 250, 250))
        d.ellipse((cx + sx * ex - er * 0.7, ey - er * 0.7, cx + sx * ex + er * 0.7, ey + er * 0.7), fill=(40, 30, 30))
    d.polygon([(cx, cy - 0.02 * fh), (cx - 0.14 * fw, cy + 0.24 * fh), (cx + 0.12 * fw, cy + 0.24 * fh)],
              fill=_shade(p["skin"], 0.7))
    d.ellipse((cx - 0.3 * fw, cy + 0.44 * fh, cx + 0.3 * fw, cy + 0.58 * fh), fill=(160, 45, 60))

    if p["age_group"] >= 1:
        ys = (-0.62, -0.46) if p["age_group"] == 1 else (-0.7, -0.56, -0.42, -0.3)
        for y in ys:
            y = cy + y * fh
            d.line([(cx - 0.5 * fw, y + lw), (cx - 0.15 * fw, y), (cx + 0.15 * fw, y), (cx + 0.5 * fw, y + lw)],
                   fill=dark, width=lw)
        if p["age_group"] == 2:  # crow's feet
            for sx in (-1, 1):
                x0 = cx + sx * (ex + er * 1.6)
                for dy in (-0.5, 0.5):
                    d.line([(x0, ey), (x0 + sx * 0.14 * fw, ey + dy * er * 1.5)], fill=dark, width=lw)

    if mask != 2:
        # incorrect = the same mask slid down: below the nose (mouth covered) or onto the chin
        shift = 0.0 if mask == 0 else fh * (0.3 if rng.random() < 0.5 else 0.62)
        _draw_mask(d, cx, cy + shift, fw, fh, MASK_COLOURS[rng.integers(len(MASK_COLOURS))], lw)

    return _finish(img, rng)


def _draw_mask(d: ImageDraw.ImageDraw, cx: float, top_cy: float, fw: float, fh: float, colour, lw: int) -> None:
    t = top_cy + 0.02 * fh
    pts = [(cx - 0.88 * fw, t + 0.05 * fh), (cx - 0.3 * fw, t - 0.04 * fh), (cx + 0.3 * fw, t - 0.04 * fh),
           (cx + 0.88 * fw, t + 0.05 * fh), (cx + 0.75 * fw, t + 0.62 * fh), (cx, t + 0.9 * fh),
           (cx - 0.75 * fw, t + 0.62 * fh)]
    d.polygon(pts, fill=colour, outline=_shade(colour, 0.7))
    for sx in (-1, 1):  # straps towards the ears
        d.line([(cx + sx * 0.88 * fw, t + 0.08 * fh), (cx + sx * 1.02 * fw, t - 0.1 * fh)], fill=colour, width=lw)
    for k in (0.25, 0.45):  # pleats
        d.line([(cx - 0.6 * fw, t + k * fh), (cx + 0.6 * fw, t + k * fh)], fill=_shade(colour, 0.8), width=1)


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    h, w = size
    base = rng.uniform(60, 230, 3)
    tilt = rng.uniform(-40, 40, 3)
    grad = np.linspace(-0.5, 0.5, h)[:, None, None] * tilt
    arr = base + grad + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _hair_texture(p: dict, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Full-frame hair colour, pasted through shape masks; salt-and-pepper for the middle age group."""
    h, w = size
    arr = np.empty((h, w, 3), float)
    arr[:] = p["hair"]
    if p["age_group"] == 1:
        speck = rng.random((h // 2 + 1, w // 2 + 1)) < 0.4
        speck = np.repeat(np.repeat(speck, 2, 0), 2, 1)[:h, :w]
        arr[speck] = (205, 205, 200)
    arr += rng.normal(0, 6, (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, float) * rng.uniform(0.85, 1.15) + rng.normal(0, 3, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shade(colour, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * f))) for c in colour)


def _save(img: Image.Image, path: Path) -> None:
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    # a crash mid-write leaves only the .tmp behind, never a truncated CSV under the real name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
