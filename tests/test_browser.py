"""The web page in a real headless Chromium (Debian's package, driven by Playwright) against a live server."""

import os
import shutil

import pytest
from conftest import SAMPLES
from test_video_source import write_video

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (as root)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")

CUE_COUNT = "() => { const t = document.querySelector('figure.video track'); return t ? t.track.cues.length : 0 }"


def test_photos_video_and_a_bad_file_through_the_page(live_server, tmp_path):
    clip = write_video(tmp_path / "clip.webm", [("chelsea.png", 3), ("rocket.jpg", 3)], fourcc="VP80")
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture\n")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(live_server)
            page.set_input_files("#files", str(SAMPLES / "chelsea.png"))
            page.wait_for_selector("figure.photo .confidence", timeout=60_000)
            assert "cat" in page.inner_text("figure.photo .caption")
            assert "confidence 0." in page.inner_text("figure.photo .confidence")
            # the thumbnail shows, and the file's object URL was let go once it had loaded
            assert page.evaluate("document.querySelector('figure.photo img').naturalWidth") == 451
            assert page.evaluate("fetch(document.querySelector('figure.photo img').src)"
                                 ".then(() => 'held', () => 'let go')") == "let go"

            page.set_input_files("#files", str(clip))
            page.wait_for_function(f"({CUE_COUNT})() > 0", timeout=120_000)
            first_cue = page.evaluate("document.querySelector('figure.video track').track.cues[0].text")
            assert "cat" in first_cue

            page.set_input_files("#files", str(fake))
            error = page.wait_for_selector("figure.photo .caption.error", timeout=30_000)
            assert "notes.jpg" in error.inner_text() and "not an image" in error.inner_text()

            page.evaluate("() => { const v = document.querySelector('figure.video video'); v.currentTime = 1; }")
            page.wait_for_function("() => document.querySelector('figure.video video').readyState >= 2",
                                   timeout=30_000)  # the frame at 1 s, with its cue shown, for the screenshot
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:4] == b"\x89PNG"
            if os.environ.get("CAPTIONER_SCREENSHOT"):  # keep a copy where the caller asks (docs, CI artifacts)
                shutil.copy(shot, os.environ["CAPTIONER_SCREENSHOT"])
        finally:
            browser.close()
