"""`mt report`: one self-contained HTML page of a run, rendered by a real headless browser: every
picture loads and every section is there."""
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.kfold import train_run
from multitask.pseudo import pseudo_label

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page, *extra) -> str:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           *extra, page.as_uri()], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's chromium package)")
def test_report_is_one_page_whose_pictures_load_in_a_browser(demo_root, tmp_path):
    out = tmp_path / "run"
    train_run(tiny_config(demo_root, "train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}"), out)
    pseudo_label(out, precision=0.5)
    result = runner.invoke(app, ["report", "--run", str(out)])
    assert result.exit_code == 0, result.output
    page = out / "report.html"
    text = page.read_text()
    for section in ("scores", "curves", "confusion", "per-class", "mistakes", "pseudo", "config"):
        assert f'id="{section}"' in text, section
    assert "http://" not in text and "https://" not in text  # nothing fetched
    assert "precision on OOF at that threshold" in text and "round 1" in text
    dom = render(page, "--dump-dom")
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    ok, total = map(int, loaded.groups())
    assert total >= 4 + 1 and ok == total  # two rounds' curves, the confusion, the gallery: none broken
    shot = tmp_path / "report.png"
    render(page, f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.stat().st_size > 20_000
