"""The decoded cache: built once, reused, invalidated by a changed file, atomic, clear on bad images."""
import os

import numpy as np
import pytest
from PIL import Image

from multitask.data import cache as cache_mod
from multitask.data.cache import ImageDecodeError, cached_images


def make_images(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.full((40, 30, 3), i * 40, np.uint8)
        arr[:20] = 255 - i * 40  # top and bottom halves differ, so orientation is checked
        p = folder / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p, quality=95)
        paths.append(str(p))
    return paths


def test_cache_decodes_resizes_and_is_reused(tmp_path, monkeypatch):
    paths = make_images(tmp_path / "img")
    arr = cached_images(paths, (20, 16), tmp_path / "c", workers=2)
    assert arr.shape == (5, 20, 16, 3) and arr.dtype == np.uint8
    assert abs(int(arr[2, 2, 8, 0]) - (255 - 80)) <= 3 and abs(int(arr[2, 17, 8, 0]) - 80) <= 3
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(cache_mod, "_decode", no_decode)
    again = cached_images(paths, (20, 16), tmp_path / "c")
    assert np.array_equal(arr, again)


def test_cache_key_covers_size_and_file_changes(tmp_path):
    paths = make_images(tmp_path / "img")
    cached_images(paths, (20, 16), tmp_path / "c")
    cached_images(paths, (24, 16), tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(paths[0], quality=95)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    arr = cached_images(paths, (20, 16), tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 3
    assert arr[0].max() <= 3


def test_a_build_removes_what_a_killed_build_left_and_leaves_a_live_ones(tmp_path):
    """SIGTERM or SIGKILL stop a build where no handler runs: its temp file (the cache's full size)
    stays, and the next build must not let them pile up, nor touch one still being written."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    (tmp_path / "c").mkdir()
    killed = tmp_path / "c" / f".0123abcd~{host}~{proc.pid}~x1.npy.tmp"
    unnamed = tmp_path / "c" / ".0123abcd.x2.npy.tmp"  # named before writers were
    live = tmp_path / "c" / f".4567cdef~{host}~{os.getpid()}~x3.npy.tmp"
    elsewhere = tmp_path / "c" / f".89abcdef~other-host.example~{proc.pid}~x4.npy.tmp"
    for p in (killed, unnamed, live, elsewhere):
        p.write_bytes(b"partial")
    # the build holds its own temp file's flock while it decodes: how a sweep in another container
    # sharing the hostname (which cannot see this pid) tells it from a killed build's
    from multitask.lock import unlocked

    held = []
    cached_images(make_images(tmp_path / "img"), (20, 16), tmp_path / "c", on_progress=lambda _: held.extend(
        unlocked(p) for p in (tmp_path / "c").glob(f".*~{host}~{os.getpid()}~*.npy.tmp") if p != live))
    assert held and not any(held)
    assert live.exists() and elsewhere.exists() and not killed.exists() and not unnamed.exists()
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1


def test_bad_image_names_the_file_and_leaves_no_partial_cache(tmp_path):
    paths = make_images(tmp_path / "img")
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        cached_images(paths + [str(bad)], (20, 16), tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; results and caches must read like any file the user writes."""
    from multitask.run import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "b.csv", "y\n")
    assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o666 & ~mask
    paths = make_images(tmp_path / "img")
    cached_images(paths, (20, 16), tmp_path / "c")
    assert next((tmp_path / "c").glob("*.npy")).stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_files_and_the_cache_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """A crash (power, kernel) after a rename of unsynced data can leave an empty or zeroed file under
    the final name: a zeroed cache trains on black pictures, an empty summary reads as damaged."""
    import stat

    from multitask.run import atomic_write_text

    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", os.fstat(fd).st_size))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace",)), replace(a, b))[1])
    atomic_write_text(tmp_path / "b.csv", "y\n")
    assert events == [("fsync", "file", 2), ("replace",), ("fsync", "folder", events[-1][2])]
    events.clear()
    cached_images(make_images(tmp_path / "img"), (20, 16), tmp_path / "c")
    assert [e[:2] for e in events] == [("fsync", "file"), ("replace",), ("fsync", "folder")]
    assert events[0][2] > 5 * 20 * 16 * 3  # the whole array, synced


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """`mt predict` streams its CSV through a text handle: image ids such as café.jpg must be written
    as UTF-8 under a C locale too, not refused (ASCII) or written in the locale's encoding."""
    import subprocess
    import sys

    out = tmp_path / "p.csv"
    code = f"from multitask.run import atomic_writer\nwith atomic_writer({str(out)!r}, 'w') as fh: fh.write('caf\\u00e9.jpg,1\\n')"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)  # the command line kept ASCII
    assert out.read_bytes() == "café.jpg,1\n".encode()


def test_16_bit_greyscale_is_read_whole_not_clipped(tmp_path):
    # a 16-bit PNG opens as mode I;16, whose values convert("RGB") clips at 255
    ramp = np.repeat(np.linspace(0, 65535, 32).astype(np.uint16)[None], 16, axis=0)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in cache_mod.WIDE_GREY
    got = cache_mod._decode(str(path), (16, 32))
    assert got.shape == (16, 32, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[0, :, 0].astype(int) - (ramp[0] >> 8)).max() <= 2  # the ramp, not white
    # 32-bit integers beyond 16 bits, and floats, have no range to read them by: refused, not whitened or blackened
    for array, why in ((ramp.astype(np.int32) * 4, "a 32-bit image with values beyond 16 bits"),
                       (ramp.astype(np.float32) / 65535, r"a floating-point image \(mode F\)")):
        Image.fromarray(array).save(tmp_path / "wide.tif")
        with pytest.raises(ValueError, match=why):
            cache_mod._decode(str(tmp_path / "wide.tif"), (16, 32))
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I within 16 bits reads as before
    assert np.array_equal(cache_mod._decode(str(tmp_path / "i32.tif"), (16, 32)), got)


def test_a_photo_turned_by_its_exif_orientation_is_decoded_upright(tmp_path):
    # a phone stores a portrait photo's pixels sideways with EXIF orientation 6 (turn 90° clockwise
    # to view); training and prediction must see it as a viewer shows it
    upright = np.zeros((48, 32, 3), np.uint8)
    upright[:12] = 255  # a white band at the top
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    sideways = Image.fromarray(np.rot90(upright, 1))  # stored turned a quarter anticlockwise
    exif = Image.Exif()
    exif[cache_mod.ORIENTATION] = 6
    sideways.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    want = cache_mod._decode(str(tmp_path / "upright.jpg"), (24, 16))
    got = cache_mod._decode(str(tmp_path / "phone.jpg"), (24, 16))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 3  # JPEG's ringing at the edge aside
    assert got[:4].mean() > 200 and got[-4:].mean() < 50  # the band on top
    # and the pictures `mt report` shows (and `mt eda`, through the same upright_rgb) are the ones training sees
    import base64
    import io

    from multitask.report import thumbnail
    shown = Image.open(io.BytesIO(base64.b64decode(thumbnail(str(tmp_path / "phone.jpg")).split(",", 1)[1])))
    assert shown.size == (32, 48) and np.asarray(shown)[:8].mean() > 200  # portrait, band on top


def test_a_turned_jpeg_is_drafted_at_the_scale_of_its_turned_sides(tmp_path):
    # JPEG's draft decodes at 1/2..1/8 scale. Asked for the picture's size in the stored orientation,
    # a wide photo turned upright came out drafted to half the width it needed, then stretched
    stored = np.random.default_rng(0).integers(0, 256, (256, 1024, 3), dtype=np.uint8)  # wide, turned 90°
    exif = Image.Exif()
    exif[cache_mod.ORIENTATION] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "turned.jpg") as im:  # every stored pixel, turned, then resized
        whole = np.asarray(cache_mod.upright_rgb(im).resize((256, 32), Image.Resampling.BILINEAR, reducing_gap=None))
    # upright it is 256 wide: a width of 256 needs every stored row; the draft in the stored
    # orientation took 1/4 of them, 64, and stretched them to 256 (a mean difference of 5.4)
    got = cache_mod._decode(str(tmp_path / "turned.jpg"), (32, 256))
    assert got.shape == (32, 256, 3)
    assert np.abs(got.astype(int) - whole.astype(int)).mean() < 1


def test_a_cache_file_cut_short_outside_mt_is_named_with_the_way_out(tmp_path):
    paths = make_images(tmp_path / "img")
    cached_images(paths, (20, 16), tmp_path / "c")
    (npy,) = (tmp_path / "c").glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:500])  # numpy said only "mmap length is greater than file size"
    with pytest.raises(ImageDecodeError, match=rf"{npy}: damaged cache file \(.+\); delete it, and the next command"):
        cached_images(paths, (20, 16), tmp_path / "c")
    npy.unlink()
    assert cached_images(paths, (20, 16), tmp_path / "c").shape == (5, 20, 16, 3)


def test_a_listed_file_that_is_gone_is_not_found_rather_than_undecodable(tmp_path):
    from multitask.data.cache import decode_into

    paths = make_images(tmp_path / "img", 2) + [str(tmp_path / "img" / "gone.jpg")]
    arr = np.zeros((3, 20, 16, 3), np.uint8)
    assert decode_into(arr, paths, (20, 16)) == [(2, "file not found")]  # was "cannot decode image ([Errno 2] ...)"
