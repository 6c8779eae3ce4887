"""Folder batch captioning: bad-input corpus, resume, and a SIGKILL mid-run."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SHARED_SAMPLES, bury_too_deep
from PIL import Image

from captioner.pipelines.cli import main
from captioner.pipelines.folder import caption_folder
from captioner.pipelines.records import RecordFile

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
    return [row["error"] for row in csv.DictReader(csv_path.open()) if row["error"]]


def read_jsonl(path):
    """Records of a JSONL file; lines end at "\n" alone (a name may hold U+2028, which splitlines() breaks at)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


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


def test_a_folder_too_deep_to_list_is_a_failure_named_in_one_line(tmp_path, capsys):
    root = tmp_path / "photos"
    shutil.copy(SHARED_SAMPLES / "coffee.png", bury_too_deep(root, "x.png", b"").parents[17] / "near.png")
    assert main(["batch", str(root), "-o", str(tmp_path / "out.jsonl"), "--quiet", "--workers", "0"]) == 1
    assert [r["path"].endswith("near.png") for r in read_jsonl(tmp_path / "out.jsonl")] == [True]
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].endswith(": cannot list this folder: File name too long")


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
def test_a_non_utf8_name_and_a_fifo_stop_nothing_and_the_output_stays_utf8(tmp_path, capsys, default_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    odd = os.fsdecode(bytes(photos) + b"/b_\xe9.png")
    shutil.copy(SHARED_SAMPLES / "chelsea.png", odd)
    shutil.copy(SHARED_SAMPLES / "coffee.png", photos / "c.png")  # sorted after the odd name
    os.mkfifo(photos / "d.jpg")  # opening it would block forever
    out = tmp_path / "out.jsonl"
    summary = caption_folder(photos, out, model=default_model, num_workers=0, progress=False)
    assert (summary.captioned, summary.failed, summary.earlier_failed) == (2, 1, 0)
    lines = out.read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["path"])
    assert [r["path"] for r in records] == [str(photos / "b_\\xe9.png"), str(photos / "c.png"), str(photos / "d.jpg")]
    assert "cat" in records[0]["caption"] and records[0]["path_hex"] == os.fsencode(odd).hex()
    assert records[2]["error"] == f"{photos / 'd.jpg'}: not a regular file"
    assert capsys.readouterr().err == f"skipped {photos / 'd.jpg'}: not a regular file\n"
    again = caption_folder(photos, out, model=default_model, num_workers=0, progress=False)
    assert (again.captioned, again.failed, again.already_done, again.earlier_failed) == (0, 0, 3, 1)


@pytest.mark.slow
def test_a_respelled_folder_resumes_without_duplicates(tmp_path, monkeypatch, default_model):
    (tmp_path / "photos").mkdir()
    shutil.copy(SHARED_SAMPLES / "rocket.jpg", tmp_path / "photos" / "a.jpg")
    os.symlink(tmp_path / "photos", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.csv"
    first = caption_folder("photos", out, model=default_model, num_workers=0, progress=False)
    assert first.captioned == 1
    for spelling in [tmp_path / "photos", "./photos/../photos", "link", tmp_path / "link" / "."]:
        again = caption_folder(spelling, out, model=default_model, num_workers=0, progress=False)
        assert (again.captioned, again.already_done) == (0, 1), spelling
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["path"] for r in rows] == [str(tmp_path / "photos" / "a.jpg")]  # absolute, under the resolved root


@pytest.mark.slow
def test_a_fixed_file_is_captioned_with_retry_errors_and_the_output_keeps_one_record_per_path(tmp_path, default_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    data = (SHARED_SAMPLES / "chelsea.png").read_bytes()
    (photos / "cat.png").write_bytes(data[: len(data) // 3])  # truncated
    out = tmp_path / "out.jsonl"
    with RecordFile(out) as records:
        first = caption_folder(photos, records, model=default_model, num_workers=0, progress=False)
    assert (first.captioned, first.failed, first.earlier_failed) == (0, 1, 0)
    (photos / "cat.png").write_bytes(data)  # the user fixes it
    with RecordFile(out) as records:  # and the output also holds an error from another folder
        records.write({"path": "/elsewhere/dog.png", "error": "/elsewhere/dog.png: empty file"})
    with RecordFile(out) as records:
        plain = caption_folder(photos, records, model=default_model, num_workers=0, progress=False)
    assert (plain.captioned, plain.failed, plain.already_done, plain.earlier_failed) == (0, 0, 1, 1)
    assert plain.describe() == ("0 captioned, 0 failed, 1 already done; 1 file failed in an earlier run "
                                "(use --retry-errors to try again)")
    with RecordFile(out) as records:
        retried = caption_folder(photos, records, model=default_model, num_workers=0, progress=False,
                                 retry_errors=True)
    assert (retried.captioned, retried.failed, retried.already_done, retried.earlier_failed) == (1, 0, 0, 0)
    records = read_jsonl(out)  # the other folder's record is kept, and is no reason to say "retry" again
    assert [r["path"] for r in records] == ["/elsewhere/dog.png", str(photos / "cat.png")]
    assert "cat" in records[1]["caption"] and "error" not in records[1]


@pytest.mark.slow
def test_an_unforeseen_failure_on_one_file_is_that_files_error_and_the_rest_are_captioned(tmp_path, monkeypatch,
                                                                                          capsys, default_model):
    import captioner.features

    real = captioner.features.model_pixels

    def crashing_on_boom(image, size):  # a fault no reader foresaw (not an ImageReadError)
        if "boom" in str(image):
            raise RuntimeError("decoder crashed")
        return real(image, size)

    monkeypatch.setattr(captioner.features, "model_pixels", crashing_on_boom)
    for name, sample in [("a.png", "chelsea.png"), ("boom.png", "coffee.png"), ("c.png", "rocket.jpg")]:
        shutil.copy(SHARED_SAMPLES / sample, tmp_path / name)
    out = tmp_path / "out.jsonl"
    summary = caption_folder(tmp_path, out, model=default_model, num_workers=0, progress=False)
    assert (summary.captioned, summary.failed) == (2, 1)
    errors = [r["error"] for r in read_jsonl(out) if "error" in r]
    assert errors == [f"{tmp_path / 'boom.png'}: RuntimeError: decoder crashed"]
    assert capsys.readouterr().err == f"skipped {errors[0]}\n"


@pytest.mark.parametrize("fallback, min_confidence, message", [
    ("tag", 0.3, "fallback='tag' must be one of tags"),  # a typo would mark captions unsure and replace none
    ("tags", None, "give min_confidence too"),
    (None, "0.3", "min_confidence='0.3' must be a number in \\[0, 1\\]"),
    (None, True, "min_confidence=True must be a number"),
])
def test_caption_folder_refuses_fallback_and_threshold_values_it_would_misuse(tmp_path, default_model, fallback,
                                                                              min_confidence, message):
    from captioner.errors import OptionError
    from captioner.pipelines.folder import caption_folder

    make_good_images(tmp_path / "photos", 1)
    with pytest.raises(OptionError, match=message):
        caption_folder(tmp_path / "photos", tmp_path / "out.jsonl", model=default_model, fallback=fallback,
                       min_confidence=min_confidence, progress=False)
    assert not (tmp_path / "out.jsonl").exists()
