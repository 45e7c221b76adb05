"""The decoded image cache: every image decoded and resized once into a uint8 (N, H, W, 3) array on disk.

Decoding JPEGs is the usual bottleneck of a training pipeline; doing it once per file instead of once
per epoch × fold × run removes it. The array is memory-mapped, so every fold (and every process) shares
one copy through the page cache. The key covers each file's path, size and mtime and the target size,
so an edited image or another size gives a new cache instead of stale pixels.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from multitask.lock import hold_flock
from multitask.run import FILE_MODE, check_space, check_writable, sweep_killed, sync_dir, sync_file, writer_prefix

# bump when decoding or resizing changes (2: 16-bit greyscale read whole; 3: EXIF orientation; 4: a turned
# JPEG's draft scale reckoned on its turned sides)
CACHE_VERSION = 4
ORIENTATION = 0x0112  # the EXIF tag a camera sets instead of turning the pixels
TURNED = {5, 6, 7, 8}  # orientations that turn the picture a quarter: width and height trade places
DECODE_CHUNK = 64  # images per task: large enough to amortise scheduling, small enough to balance threads


class ImageDecodeError(ValueError):
    """Images that cannot be decoded; `bad` holds (index into the paths, reason) for every one."""

    def __init__(self, message: str, bad: list[tuple[int, str]] = ()):
        super().__init__(message)
        self.bad = list(bad)


def undecodable_error(paths: Sequence[str], bad: list[tuple[int, str]], where: Sequence[str] | None = None,
                      most: int = 50) -> ImageDecodeError:
    """One error listing every image that failed, by file (and by table line where known)."""
    lines = [f"{where[i]}: {paths[i]}: {why}" if where is not None else f"{paths[i]}: {why}" for i, why in bad]
    more = f"\n  ... and {len(lines) - most} more" if len(lines) > most else ""
    return ImageDecodeError(f"{len(bad)} image(s) cannot be decoded:\n  " + "\n  ".join(lines[:most]) + more, bad)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MT_CACHE_DIR") or Path.home() / ".cache" / "mt")


def cache_key(paths: Sequence[str], size: tuple[int, int]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION} {size[0]}x{size[1]}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (PNG, TIFF), as Pillow opens it
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what Pillow raises for bad files
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}  # what a folder's pictures are named


def upright_rgb(im: Image.Image) -> Image.Image:
    """An opened picture as training sees it (and the pictures of `mt eda` and `mt report` show it):
    upright, 8-bit RGB. Raises ValueError for one that cannot be read so."""
    if im.getexif().get(ORIENTATION, 1) != 1:  # a phone's portrait photo: upright, as viewers show it
        im = ImageOps.exif_transpose(im)
    if im.mode == "F":  # no range to read it by: [0, 1], [0, 255] and raw sensor values all occur
        raise ValueError("a floating-point image (mode F) has no range to read it by; save it as 8 or 16 bits")
    if im.mode in WIDE_GREY:  # convert("RGB") clips these at 255: most of the picture turns white
        grey = np.asarray(im)
        if grey.max(initial=0) > 65535 or grey.min(initial=0) < 0:  # mode I holds 32 bits: clipping would whiten it
            raise ValueError("a 32-bit image with values beyond 16 bits; save it as 8 or 16 bits")
        im = Image.fromarray((grey.astype(np.uint32) >> 8).astype(np.uint8), "L")
    im = im.convert("RGB")
    if im.width == 0 or im.height == 0:
        raise ValueError("the image is empty")
    return im


def _decode(path: str, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) at `size` = (height, width)."""
    h, w = size
    with Image.open(path) as im:
        # JPEG can decode straight at 1/2, 1/4, 1/8 scale: far fewer pixels to decode and resize. The
        # draft is of the stored pixels, before a quarter turn makes their width the picture's height
        turned = im.getexif().get(ORIENTATION, 1) in TURNED
        im.draft("RGB", (h, w) if turned else (w, h))
        im = upright_rgb(im)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(im, dtype=np.uint8)


def decode_chunk(arr: np.ndarray, paths: Sequence[str], start: int, size: tuple[int, int]) -> list[tuple[int, str]]:
    """Decode one chunk into `arr`; return the images that failed, with why, instead of stopping."""
    bad = []
    for i in range(start, min(start + DECODE_CHUNK, len(paths))):
        try:
            arr[i] = _decode(paths[i], size)
        except FileNotFoundError:  # gone since it was listed, or listed wrong: not a picture that fails to decode
            bad.append((i, "file not found"))
        except DECODE_ERRORS as e:
            bad.append((i, f"cannot decode image ({e})"))
    return bad


def decode_into(arr: np.ndarray, paths: Sequence[str], size: tuple[int, int], workers: int = 0,
                on_progress: Callable[[int], None] | None = None) -> list[tuple[int, str]]:
    """Decode every path into `arr` (N, H, W, 3); return (index, reason) for each that failed."""
    bad = []
    # Pillow releases the GIL while decoding and resizing, so threads scale over cores and
    # write straight into the shared array, with no pickling of pixels between processes.
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as ex:
        for start, chunk_bad in zip(range(0, len(paths), DECODE_CHUNK),
                                    ex.map(partial(decode_chunk, arr, paths, size=size),
                                           range(0, len(paths), DECODE_CHUNK))):
            bad += chunk_bad
            if on_progress:
                on_progress(min(DECODE_CHUNK, len(paths) - start))
    return bad


def build_cache_file(paths: Sequence[str], size: tuple[int, int], out: Path, workers: int = 0,
                     on_progress: Callable[[int], None] | None = None) -> None:
    """Decode `paths` in parallel into the .npy file `out`, written atomically; every image that
    cannot be decoded is listed in one ImageDecodeError, and no cache file is left."""
    h, w = size
    check_writable(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_space(out.parent, len(paths) * h * w * 3 + 4096, f"the decoded cache of {len(paths)} images at {h}x{w}")
    # a build stopped by a signal the handler below never sees (SIGTERM, SIGKILL) leaves its temp file:
    # the next build removes those whose writer is gone, as `mt resume` does in a run
    sweep_killed(list(out.parent.glob(".*.npy.tmp")))
    fd, tmp = tempfile.mkstemp(prefix=writer_prefix(out.stem), suffix=".npy.tmp", dir=out.parent)
    hold_flock(fd)  # minutes of decoding: another container's sweep must see a live writer
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), h, w, 3))
        bad = decode_into(arr, paths, size, workers, on_progress)
        if bad:
            raise undecodable_error(paths, bad)
        arr.flush()
        del arr  # close the map before the rename
        sync_file(fd)  # after a crash, a cache of zeros under its final name would train on black pictures
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
        sync_dir(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def cached_images(paths: Sequence[str], size: tuple[int, int], cache_dir: str | Path | None = None,
                  workers: int = 0, on_progress: Callable[[int], None] | None = None,
                  on_build: Callable[[], None] | None = None) -> np.ndarray:
    """The (N, H, W, 3) uint8 images of `paths`, read-only and memory-mapped; built on first use
    (`on_build()` first: finding the file stats every image, so callers should not look for it again)."""
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{cache_key(paths, size)}.npy"
    if not path.exists():
        if on_build:
            on_build()
        build_cache_file(paths, size, path, workers, on_progress)
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # cut short or overwritten outside mt: its writes are atomic
        raise ImageDecodeError(f"{path}: damaged cache file ({e}); delete it, and the next command builds it again") from None
    if arr.shape != (len(paths), size[0], size[1], 3):
        raise ImageDecodeError(f"{path}: cache has shape {arr.shape}, expected {(len(paths), *size, 3)}; delete it")
    return arr
