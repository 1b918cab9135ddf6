"""The explain report opens in headless Chromium (Debian's `chromium`, closed-network flags) without
console messages, its DOM holds the feature cards, and a screenshot shows them (highlighted tokens
painted). The screenshot is kept: in pytest's tmp dir and copied to tests/artifacts/.

Chromium is required, not optional: scripts/test.sh and .ci/run install it where it is missing
(as root); this test FAILS where it still is not there."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_explain_report import DOCS, planted_vector, write_pairs

from yapo_fast.explain import explain

ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]
MARK_RGB = (0xFF, 0xCF, 0x4A)  # report_html's <mark> background: the highlighted activating token


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (scripts/test.sh does it as root)")
    return path


def run_chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True, timeout=120
    )


def console_messages(stderr: str) -> list[str]:
    """Every console message the page produced (the report has no script: any message is a fault,
    a failed resource load included)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_console_check_catches_a_broken_page(tmp_path):
    """The detector itself: a page with a failing script is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFn();</script></body></html>")
    res = run_chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert res.returncode == 0 and "<p>x</p>" in res.stdout
    assert any("undefinedFn" in m for m in console_messages(res.stderr))


def test_report_renders_in_headless_chromium(tmp_path):
    from test_explain_activation_index import char_tokenizer, planted_model_and_sae

    model, sae = planted_model_and_sae()
    vec = planted_vector(model, sae, write_pairs(tmp_path / "pairs.jsonl"))
    r = explain(
        vec,
        model=model,
        tokenizer=char_tokenizer(),
        sae=sae,
        top=3,
        index_docs=DOCS,
        index_tokens=32 * 16,
        seq_len=32,
        cache=tmp_path / "cache",
        progress=False,
        out=tmp_path / "rep",
    )
    url = Path(r["files"]["html"]).resolve().as_uri()

    res = run_chromium(tmp_path, url, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    dom = res.stdout
    assert "Feature cards (3)" in dom and dom.count('class="card"') == 3
    for latent in (5, 20, 33):
        assert f'id="latent-{latent}"' in dom and f"latent {latent} —" in dom
    assert "<mark>Q</mark>" in dom and "Entries that cap a feature" in dom and "share of the delta-norm bound" in dom

    shot = tmp_path / "explain_report.png"
    res = run_chromium(tmp_path, url, "--window-size=1280,1600", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "explain_report.png")
    import matplotlib.image

    img = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(np.int16)
    assert img.shape[:2] == (1600, 1280) and img.std() > 10  # not a blank page
    marks = (np.abs(img - np.array(MARK_RGB)).max(axis=-1) <= 3).sum()
    assert marks > 50, "no highlighted activating token is painted in the screenshot"
