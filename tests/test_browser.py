"""The web page in a real headless Chromium (Debian's package, driven by Playwright) against a live server."""

import os
import shutil
import signal

import numpy as np
import pytest
from conftest import SAMPLES, serving
from PIL import Image
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


NEWEST = "() => document.querySelector('#items figure')"


def _sent(page, send, files: int = 1) -> None:
    """Call ``send()``, then wait until the page shows a figure for each file: the page reads a file's
    first bytes (and the server's settings) before its figure appears, so the newest figure is the old
    one for a moment."""
    shown = page.evaluate("document.querySelectorAll('#items figure').length")
    send()
    page.wait_for_function(f"() => document.querySelectorAll('#items figure').length >= {shown + files}",
                           timeout=30_000)


def _newest_text(page, selector: str) -> str:
    script = f"() => {{ const e = ({NEWEST})().querySelector({selector!r}); return e ? e.textContent : '' }}"
    return page.evaluate(script)


def test_the_page_is_keyboard_usable_marks_unsure_captions_and_routes_files_by_content(live_server, tmp_path):
    unplayable = write_video(tmp_path / "shots.mp4", [("chelsea.png", 2), ("rocket.jpg", 2)])  # mp4v: Chromium won't
    nameless = write_video(tmp_path / "clip.webm", [("chelsea.png", 2)], fourcc="VP80").rename(tmp_path / "clip")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            # a listener from the start: Playwright turns on catching file choosers when the first is added,
            # and one added just before the key press could miss the chooser the key opens
            page.on("filechooser", lambda chooser: None)
            page.goto(live_server)
            page.wait_for_selector("#min-confidence", state="visible")  # the default model is calibrated
            for _ in range(3):
                if page.evaluate("document.activeElement.id") == "pick":
                    break
                page.keyboard.press("Tab")
            with page.expect_file_chooser(timeout=10_000) as chooser:
                page.keyboard.press("Enter")
            _sent(page, lambda: chooser.value.set_files(str(SAMPLES / "chelsea.png")))
            page.wait_for_selector("figure.photo .confidence", timeout=60_000)
            assert "unsure" not in page.inner_text("figure.photo .confidence")  # the cat's 0.35 is above 0.2

            page.fill("#min-confidence", "1")
            _sent(page, lambda: page.set_input_files("#files", str(SAMPLES / "chelsea.png")))
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.confidence') !== null", timeout=60_000)
            assert page.evaluate(f"({NEWEST})().classList.contains('unsure')")
            assert "unsure" in _newest_text(page, ".confidence")

            _sent(page, lambda: page.set_input_files("#files", str(nameless)))  # no extension or type: no picture
            page.wait_for_function(f"() => ({NEWEST})().querySelector('track') !== null", timeout=120_000)
            assert _newest_text(page, ".caption").endswith("subtitle cue")

            folder = tmp_path / "a folder"  # a file the browser cannot read, picked before one it can
            folder.mkdir()
            cdp = page.context.new_cdp_session(page)
            root = cdp.send("DOM.getDocument")["root"]["nodeId"]
            node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "#files"})["nodeId"]
            files = [str(folder), str(SAMPLES / "coffee.png")]
            _sent(page, lambda: cdp.send("DOM.setFileInputFiles", {"nodeId": node, "files": files}), files=2)
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.confidence') !== null", timeout=60_000)
            assert "coffee.png" in _newest_text(page, ".meta")
            before = page.evaluate("document.querySelectorAll('#items figure')[1]"
                                   ".querySelector('.caption').textContent")
            assert before == "a folder: cannot be read here: a folder, or a file that is gone"

            _sent(page, lambda: page.set_input_files("#files", str(unplayable)))
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.playback') !== null", timeout=120_000)
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.save a') !== null", timeout=120_000)
            assert _newest_text(page, ".caption") == "2 subtitle cues"
            assert "cannot play this video" in _newest_text(page, ".playback")
            assert page.evaluate(f"({NEWEST})().querySelector('.save a').download") == "shots.vtt"

            disguised = tmp_path / "holiday.jpg"  # a video named as a photo: its first bytes say what it is
            shutil.copy(unplayable, disguised)
            _sent(page, lambda: page.set_input_files("#files", str(disguised)))
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.save a, .caption.error') !== null",
                                   timeout=120_000)
            assert _newest_text(page, ".caption") == "2 subtitle cues"

            heic = tmp_path / "phone.heic"  # an ISO media file, yet a still picture: the captions say what they take
            heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
            _sent(page, lambda: page.set_input_files("#files", str(heic)))
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.caption.error') !== null", timeout=30_000)
            assert page.evaluate(f"({NEWEST})().classList.contains('photo')")
            assert "phone.heic: not an image in a format accepted here" in _newest_text(page, ".caption")
        finally:
            browser.close()


def test_every_failure_on_the_page_names_its_file_and_a_silent_server_is_given_up_on(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    with serving("--max-upload-mb", "1", "--timeout", "2") as (url, server), \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#min-confidence", state="visible")  # the server's limits are read
            _sent(page, lambda: page.set_input_files("#files", str(big)))
            page.wait_for_selector("figure.photo .caption.error", timeout=30_000)
            assert _newest_text(page, ".caption") == \
                "big.png: the upload is larger than the limit of 1 MiB (1048576 bytes)"

            broken = tmp_path / "broken.mp4"  # neither the server nor the browser can read it
            broken.write_bytes(b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(1).bytes(200_000))
            _sent(page, lambda: page.set_input_files("#files", str(broken)))
            page.wait_for_selector("figure.video .caption.error", timeout=30_000)
            assert _newest_text(page, ".caption").startswith("broken.mp4: ")
            page.wait_for_timeout(500)  # the browser's own verdict on the file, had it come after the server's
            # no note that the video cannot play where there is no video and nothing to save
            assert page.evaluate(f"({NEWEST})().querySelector('video, .playback')") is None

            os.kill(server.pid, signal.SIGSTOP)  # a server that takes the upload and never answers
            try:
                _sent(page, lambda: page.set_input_files("#files", str(SAMPLES / "chelsea.png")))
                page.wait_for_function(f"() => ({NEWEST})().querySelector('.caption.error') !== null", timeout=60_000)
                assert _newest_text(page, ".caption") == \
                    "chelsea.png: no answer from the server in 17 s: it may have stopped"
            finally:
                os.kill(server.pid, signal.SIGCONT)
            server.kill()
            server.wait()
            _sent(page, lambda: page.set_input_files("#files", str(SAMPLES / "coffee.png")))
            page.wait_for_function(f"() => ({NEWEST})().querySelector('.caption.error') !== null", timeout=30_000)
            assert _newest_text(page, ".caption") == \
                "coffee.png: could not reach the server: it stopped, or the connection broke"
        finally:
            browser.close()
