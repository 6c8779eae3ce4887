"""Folder batch captioning: bad-input corpus, resume, and a SIGKILL mid-run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from captioner.pipelines.cli import main
from captioner.pipelines.folder import caption_folder
from conftest import ROOT, SHARED_SAMPLES
from PIL import Image

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]


def make_good_images(folder, copies):
    """Real photos, re-encoded at a few sizes so the copies are different files."""
    paths = []
    for i in range(copies):
        name = PHOTOS[i % len(PHOTOS)]
        image = Image.open(SHARED_SAMPLES / name).convert("RGB")
        image = image.resize((image.width * (90 - i % 7) // 100, image.height * (90 - i % 7) // 100))
        path = folder / f"set{i % 3}" / f"{i:03d}_{name.rsplit('.', 1)[0]}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def make_bad_images(folder):
    """One file of each bad kind, each named with an image extension, with the expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (SHARED_SAMPLES / "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 5])
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture\n")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 MP in a 48 kB file
    os.symlink(folder / "missing.jpg", folder / "dangling.jpg")
    return {"truncated.jpg": "truncated", "zero.png": "empty file", "notes.jpg": "not an image",
            "bomb.png": "exceeds", "dangling.jpg": "No such file"}


def summary_errors(csv_path):
    import csv

    return [row["error"] for row in csv.DictReader(csv_path.open()) if row["error"]]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_bad_files_get_error_records_and_the_batch_goes_on(tmp_path, capsys):
    make_good_images(tmp_path / "photos", 6)
    expected = make_bad_images(tmp_path / "photos" / "bad")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(tmp_path / "photos"), "-o", str(out), "--quiet", "--workers", "0"]) == 1
    records = read_jsonl(out)
    errors = {os.path.basename(r["path"]): r["error"] for r in records if "error" in r}
    assert set(errors) == set(expected)
    err = capsys.readouterr().err
    for name, reason in expected.items():
        assert reason.lower() in errors[name].lower(), (name, errors[name])
        assert f"skipped {tmp_path / 'photos' / 'bad' / name}: " in err
    good = [r for r in records if "caption" in r]
    assert len(good) == 6 and all(r["caption"] and r["score"] < 0 for r in good)


@pytest.mark.slow
def test_stderr_names_each_skipped_file(tmp_path, capsys, default_model):
    expected = make_bad_images(tmp_path / "bad")
    summary = caption_folder(tmp_path / "bad", tmp_path / "out.csv", model=default_model, num_workers=0,
                             progress=False)
    assert summary.failed == len(expected) and summary.captioned == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert sorted(lines) == sorted(f"skipped {r}" for r in summary_errors(tmp_path / "out.csv"))
    assert len(lines) == len(expected)


@pytest.mark.slow
def test_rerun_resumes_without_duplicates(tmp_path, default_model):
    make_good_images(tmp_path / "photos", 5)
    out = tmp_path / "out.jsonl"
    first = caption_folder(tmp_path / "photos", out, model=default_model, num_workers=0, progress=False)
    before = out.read_text()
    make_good_images(tmp_path / "photos", 7)  # two new images appear (and five are rewritten in place)
    second = caption_folder(tmp_path / "photos", out, model=default_model, num_workers=0, progress=False)
    assert (first.captioned, second.captioned, second.already_done) == (5, 2, 5)
    assert out.read_text().startswith(before)
    paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == 7


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    make_good_images(tmp_path / "photos", 40)
    command = [sys.executable, "-m", "captioner.pipelines.cli", "batch", str(tmp_path / "photos"), "--quiet",
               "--batch-size", "1", "--workers", "0"]
    killed_out, clean_out = tmp_path / "killed.jsonl", tmp_path / "clean.jsonl"
    proc = subprocess.Popen(command + ["-o", str(killed_out)], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed_out.exists() and killed_out.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_jsonl(killed_out))
    assert 5 <= partial < 40
    subprocess.run(command + ["-o", str(killed_out)], cwd=ROOT, check=True)
    subprocess.run(command + ["-o", str(clean_out)], cwd=ROOT, check=True)
    killed = read_jsonl(killed_out)
    clean = read_jsonl(clean_out)
    assert len(killed) == len({r["path"] for r in killed}) == 40
    assert sorted(killed, key=lambda r: r["path"]) == sorted(clean, key=lambda r: r["path"])


@pytest.mark.slow
def test_html_contact_sheet_is_self_contained(tmp_path):
    make_good_images(tmp_path / "photos", 3)
    shutil.copy(SHARED_SAMPLES / "coffee.png", tmp_path / "photos" / "cup.png")
    out, page = tmp_path / "out.jsonl", tmp_path / "report.html"
    assert main(["batch", str(tmp_path / "photos"), "-o", str(out), "--html", str(page), "--quiet"]) == 0
    html = page.read_text()
    assert html.count("<figure>") == 4 and html.count('src="data:image/jpeg;base64,') == 4
    for record in read_jsonl(out):
        assert record["caption"] in html
    assert "http://" not in html and "https://" not in html
