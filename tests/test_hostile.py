"""The bad-input and fault corpus of issue 8, run through the real CLI.

Every case is built in a temp folder: real photos and videos beside broken ones, odd file
names, outputs that cannot be written or resumed, broken model folders, manifests and
options out of range. For each, the CLI must end with no traceback and no signal death;
a failure is one line that names the file and the reason (``skipped PATH: reason`` per
file, ``captioner: error: ...`` otherwise), the exit code says what happened (2: bad
invocation, 1: something failed), and good files beside bad ones are still captioned.

Most cases run in-process through ``main(argv)``; those about signals, pipes and the
process's own output encoding run the installed command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, SHARED_SAMPLES
from PIL import Image

from captioner.images import ignore_pillow_noise
from captioner.pipelines.cli import main

pytestmark = pytest.mark.slow

NON_UTF8 = os.fsdecode(b"b_\xe9")  # a file-name stem that is not valid UTF-8


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; no traceback, internal error or warning may reach the user.

    A warning printed by a library is a second line (torch's pickle-protocol warning once was).
    """
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_pillow_noise()  # as in a process that imported captioner (pytest puts its own filters first)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    assert not seen, [f"{w.category.__name__}: {w.message}" for w in seen]
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "unexpected" not in err, err
    return code, out, err


def run_process(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m captioner.pipelines.cli`` in a subprocess: it must exit, not die of a signal."""
    proc = subprocess.run([sys.executable, "-m", "captioner.pipelines.cli", *map(str, argv)], cwd=ROOT,
                          capture_output=True, timeout=300, **kwargs)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "unexpected" not in err, err
    return proc


def error_line(err: str) -> str:
    """The one ``captioner: error:`` line of a failed invocation."""
    lines = [line for line in err.splitlines() if line.startswith("captioner: error:")]
    assert len(lines) == 1, err
    return lines[0]


def photo(path: Path, name: str = "chelsea.png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED_SAMPLES / name, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_video(path: Path, names: list[str], *, frames_each: int = 20, fps: float = 10.0) -> Path:
    """An mp4 holding each photo for ``frames_each`` frames; written under an ASCII name, then renamed
    (OpenCV itself crashes on a name that is not valid UTF-8)."""
    ascii_path = path.with_name("writing.mp4")
    writer = cv2.VideoWriter(str(ascii_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (160, 120))
    assert writer.isOpened()
    for name in names:
        rgb = np.array(Image.open(SHARED_SAMPLES / name).convert("RGB").resize((160, 120)))
        for _ in range(frames_each):
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    os.replace(ascii_path, path)
    return path


# Records: nothing lost, nothing duplicated ------------------------------------------------------------


def test_a_non_utf8_name_is_captioned_with_the_rest_and_resumes(tmp_path, capsys):
    folder = tmp_path / "dir"
    for stem in ("a", NON_UTF8, "c"):
        photo(folder / f"{stem}.png")
    out = tmp_path / "out.jsonl"
    assert run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)[0] == 0
    records = read_jsonl(out)  # valid UTF-8 JSON throughout
    assert len(records) == 3 and all(r.get("caption") for r in records)
    assert any("\\xe9" in r["path"] for r in records)
    code, _, err = run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)
    assert code == 0 and "0 captioned" in err and len(read_jsonl(out)) == 3


def test_caption_json_of_a_non_utf8_name_on_a_strict_utf8_stdout(tmp_path):
    odd = photo(tmp_path / f"{NON_UTF8}.png")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    proc = run_process(["caption", "--json", odd], env=env)
    assert proc.returncode == 0
    record = json.loads(proc.stdout.decode("utf-8"))
    assert record["path"].endswith("b_\\xe9.png") and record["caption"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path, capsys):
    from captioner.pipelines.record_formats import format_for
    from captioner.pipelines.records import RecordFile

    photo(tmp_path / "dir" / "a.png")
    out = tmp_path / "out.jsonl"
    with RecordFile(out, format_for(out)):  # a first run, still writing
        code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--quiet"], capsys)
    assert code == 1 and str(out) in error_line(err) and "another" in err
    assert out.read_text() == ""


def test_a_respelled_folder_resumes_without_duplicates(tmp_path, capsys, monkeypatch):
    for name in ("a.png", "b.png"):
        photo(tmp_path / "dir" / name)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    assert run(["batch", "dir", "-o", out, "--quiet", "--workers", "0"], capsys)[0] == 0
    for spelling in (tmp_path / "dir", "./dir/../dir"):
        code, _, err = run(["batch", spelling, "-o", out, "--quiet", "--workers", "0"], capsys)
        assert code == 0 and "0 captioned" in err
    assert len(read_jsonl(out)) == 2


def test_a_fixed_file_is_retried_on_request_and_keeps_one_record(tmp_path, capsys):
    folder = tmp_path / "dir"
    photo(folder / "a.png")
    (folder / "b.png").write_bytes(b"not yet a photo")
    out = tmp_path / "out.jsonl"
    code, _, err = run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)
    assert code == 1 and f"skipped {folder / 'b.png'}: not an image" in err
    photo(folder / "b.png", "coffee.png")  # the user fixes the file
    code, _, err = run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)
    assert code == 1 and "--retry-errors" in err  # still failed in the output: said, and exit 1
    code, _, err = run(["batch", folder, "-o", out, "--quiet", "--workers", "0", "--retry-errors"], capsys)
    assert code == 0
    records = read_jsonl(out)
    assert sorted(Path(r["path"]).name for r in records) == ["a.png", "b.png"]
    assert all("caption" in r and "error" not in r for r in records)


@pytest.mark.parametrize("stem", ["cr\rname", "line\nbreak", "=HYPERLINK(1)", "+1", "-2", "@SUM(1)", "'quoted"])
def test_csv_round_trips_any_name_and_writes_no_formula(tmp_path, capsys, stem):
    import csv

    folder = tmp_path / "dir"
    photo(folder / f"{stem}.png")
    photo(folder / "plain.png")
    out, page = tmp_path / "out.csv", tmp_path / "report.html"
    assert run(["batch", folder, "-o", out, "--quiet", "--workers", "0", "--html", page], capsys)[0] == 0
    with out.open(encoding="utf-8", newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not _is_number(c))]
    code, _, err = run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)
    assert code == 0 and "0 captioned, 0 failed, 2 already done" in err
    from captioner.pipelines.record_formats import CsvRecords

    paths = [r["path"] for r in CsvRecords().read(out)]
    assert sorted(paths) == sorted([str(folder / f"{stem}.png"), str(folder / "plain.png")])
    assert page.read_text(encoding="utf-8").count("<figure") == 2


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_a_csv_cut_inside_a_quoted_name_is_recovered(tmp_path, capsys):
    folder = tmp_path / "dir"
    photo(folder / "a.png")
    photo(folder / "z\nnewline.png")
    out = tmp_path / "out.csv"
    assert run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)[0] == 0
    text = out.read_bytes()
    out.write_bytes(text[: text.index(b"z\n") + 2])  # killed right after the newline inside the quoted name
    assert run(["batch", folder, "-o", out, "--quiet", "--workers", "0"], capsys)[0] == 0
    from captioner.pipelines.record_formats import CsvRecords

    assert sorted(Path(r["path"]).name for r in CsvRecords().read(out)) == ["a.png", "z\nnewline.png"]


@pytest.mark.parametrize("line", ['{"foo": 1}', "{not json", '{"path": "x.png", "caption": "a\x00b"', "\x00\x00\x00"])
def test_a_corrupt_complete_line_in_the_output_names_file_and_line(tmp_path, capsys, line):
    photo(tmp_path / "dir" / "a.png")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "/elsewhere/x.png", "caption": "x"}) + "\n" + line + "\n")
    code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--quiet"], capsys)
    assert code == 1 and f"{out}:2:" in error_line(err)


# Outputs that cannot be written -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "under_a_file", "dev_full"])
def test_an_unwritable_batch_output_is_one_line(tmp_path, capsys, where):
    photo(tmp_path / "dir" / "a.png")
    (tmp_path / "file").write_text("x")
    out = {"folder": tmp_path / "dir", "under_a_file": tmp_path / "file" / "out.jsonl",
           "dev_full": Path("/dev/full")}[where]
    if where == "dev_full" and not out.exists():
        pytest.skip("/dev/full is not on this system")
    code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--quiet", "--workers", "0"], capsys)
    assert code in (1, 2) and str(out) in error_line(err)


def test_an_unwritable_html_report_fails_before_any_captioning(tmp_path, capsys):
    photo(tmp_path / "dir" / "a.png")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out.jsonl"
    code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--html", tmp_path / "file" / "r.html"], capsys)
    assert code == 1 and "r.html" in error_line(err)
    assert not out.exists() or out.read_text() == ""


def test_caption_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "captioner.pipelines.cli", "caption",
                             *[str(SHARED_SAMPLES / n) for n in ("chelsea.png", "coffee.png", "rocket.jpg")]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) >= 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_video_folder_goes_on_when_one_subtitle_path_is_a_folder(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", ["chelsea.png"])
    write_video(videos / "b.mp4", ["rocket.jpg"])
    out_dir = tmp_path / "subs"
    (out_dir / "a.srt").mkdir(parents=True)  # in the way of a.mp4's subtitles
    code, _, err = run(["video", videos, "--out-dir", out_dir, "--quiet", "--every", "1"], capsys)
    assert code == 1 and f"skipped {videos / 'a.mp4'}" in err and "a.srt" in err
    assert (out_dir / "b.srt").read_text().count("-->") >= 1


def test_an_unwritable_subtitle_output_fails_before_the_model_loads(tmp_path, capsys):
    video = write_video(tmp_path / "a.mp4", ["chelsea.png"])
    (tmp_path / "file").write_text("x")
    code, _, err = run(["video", video, "-o", tmp_path / "file" / "a.srt"], capsys)
    assert code == 1 and "a.srt" in error_line(err)


# Videos ---------------------------------------------------------------------------------------------------


def test_a_non_utf8_video_name_does_not_crash(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    odd = write_video(Path(os.fsdecode(bytes(videos) + b"/clip_\xe9.mp4")), ["chelsea.png"])
    write_video(videos / "plain.mp4", ["rocket.jpg"])
    proc = run_process(["video", videos, "--quiet", "--every", "1"])
    assert proc.returncode in (0, 1)
    assert (videos / "plain.srt").exists()
    assert proc.returncode == 1 or Path(os.fsdecode(bytes(odd)[:-4] + b".srt")).exists()


def test_scenes_on_a_one_frame_video_give_one_cue(tmp_path, capsys):
    video = write_video(tmp_path / "one.mp4", ["chelsea.png"], frames_each=1)
    out = tmp_path / "one.vtt"
    assert run(["video", video, "-o", out, "--mode", "scenes"], capsys)[0] == 0
    assert out.read_text().count("-->") == 1


@pytest.mark.parametrize("argv", [["--every", "1e-9"], ["--every", "inf"], ["--every", "nan"], ["--beam-size", "10000"],
                                  ["--length-penalty", "nan"], ["--max-length", "100000"], ["--batch-size", "0"]])
def test_options_out_of_range_are_usage_errors(tmp_path, capsys, argv):
    video = write_video(tmp_path / "a.mp4", ["chelsea.png"])
    code, _, err = run(["video", video, *argv], capsys)
    assert code == 2 and f"captioner video: error: argument {argv[0]}: {argv[1]} is not in [" in err  # the flag named
    assert not (tmp_path / "a.srt").exists()


# Model folders, checkpoints, caches, manifests --------------------------------------------------------


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    import torch

    from captioner.model import CaptionModel, ModelConfig
    from captioner.options import DecoderConfig
    from captioner.vocab import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary(["a", "cat", "on", "the", "grass"])
    config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, True, 16, 0.0))
    folder = tmp_path_factory.mktemp("models") / "small"
    CaptionModel(config, vocab, pretrained_encoder=False).save(folder)
    return folder


@pytest.mark.parametrize("field, value, reason", [
    ("embed_dim", "512", "embed_dim"), ("vocab_size", "2540", "vocab_size"), ("attention", "false", "attention"),
    ("hidden_dim", 200000, "hidden_dim"), ("dropout", 7, "dropout"),
])
def test_a_model_config_with_wrong_types_or_sizes_is_refused_before_allocating(
        tmp_path, capsys, small_model_dir, field, value, reason):
    folder = tmp_path / "m"
    shutil.copytree(small_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(["caption", "--model", folder, SHARED_SAMPLES / "chelsea.png"], capsys)
    assert code == 1 and reason in error_line(err) and str(folder) in error_line(err)


def test_a_huge_ensemble_size_is_refused(tmp_path, capsys, small_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(small_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["ensemble_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(["caption", "--model", folder, SHARED_SAMPLES / "chelsea.png"], capsys)
    assert code == 1 and "ensemble_size" in error_line(err)


def test_nan_weights_are_refused_at_load(tmp_path, capsys, small_model_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(small_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["decoder.out.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    code, _, err = run(["caption", "--model", folder, SHARED_SAMPLES / "chelsea.png"], capsys)
    assert code == 1 and "decoder.out.weight" in error_line(err)


def test_ensemble_into_an_existing_file_is_refused(tmp_path, capsys, small_model_dir):
    (tmp_path / "taken").write_text("mine")
    code, _, err = run(["ensemble", small_model_dir, small_model_dir, "--out", tmp_path / "taken"], capsys)
    assert code == 1 and "taken" in error_line(err)
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("bad", ['{"image": "x.png", "captions": []}', '{"image": "x.png"}',
                                 '{"image": 3, "captions": ["a cat"]}'])
def test_a_manifest_without_captions_is_named_before_the_model_loads(tmp_path, capsys, bad):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": str(SHARED_SAMPLES / "chelsea.png"), "captions": ["a cat"]}) + "\n"
                        + bad + "\n")
    code, _, err = run(["evaluate", "--manifest", manifest, "--no-meteor"], capsys)
    assert code == 1 and f"{manifest}:2" in error_line(err)


def _tiny_train_argv(tmp_path: Path) -> list:
    manifest = tmp_path / "tiny.jsonl"
    lines = [{"image": str(SHARED_SAMPLES / n), "captions": [f"a photo of a {n[:-4]}", "a picture"]}
             for n in ("chelsea.png", "coffee.png")]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"min_word_count": 1, "embed_dim": 8, "hidden_dim": 8, "attention_dim": 8,
                                  "num_workers": 0, "cache_dir": str(tmp_path / "cache"), "warmup_steps": 1}))
    return ["train", "--config", config, "--train", manifest, "--dev", manifest, "--out", tmp_path / "run",
            "--epochs", "1"]


def test_resume_from_a_truncated_or_malicious_checkpoint_is_one_line(tmp_path, capsys):
    import pickle

    argv = _tiny_train_argv(tmp_path)
    code, out, _ = run(argv, capsys)
    *epochs, result = out.splitlines()
    assert code == 0 and [json.loads(line)["epoch"] for line in epochs] == [1]
    assert result.startswith("best: ") and json.loads(result.removeprefix("best: ")) == json.loads(epochs[0])
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 1 and "last.pt" in error_line(err) and "weights_only=False" not in err

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    last.write_bytes(pickle.dumps(Exploit()))
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 1 and "last.pt" in error_line(err) and not (tmp_path / "pwned").exists()


def test_a_poisoned_feature_cache_is_recomputed(tmp_path, capsys):
    argv = _tiny_train_argv(tmp_path)
    assert run(argv, capsys)[0] == 0
    for cache in (tmp_path / "cache").iterdir():
        cache.write_bytes(b"\x00" * 64)
    shutil.rmtree(tmp_path / "run")
    code, _, err = run(argv, capsys)
    assert code == 0 and "recomputing" in err


def test_a_killed_batch_loses_nothing_and_a_corpus_of_bad_photos_is_skipped(tmp_path):
    """SIGKILL mid-run, then resume, with bad photos mixed in: one record per path, good ones captioned."""
    folder = tmp_path / "dir"
    for i in range(12):
        photo(folder / f"{i:02d}.png", ("chelsea.png", "coffee.png", "rocket.jpg")[i % 3])
    data = (SHARED_SAMPLES / "rocket.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "captioner.pipelines.cli", "batch", str(folder), "-o", str(out), "--quiet",
            "--batch-size", "1", "--workers", "0"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 3):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    records = read_jsonl(out)
    assert len(records) == len({r["path"] for r in records}) == 15
    assert sum("caption" in r for r in records) == 12


# Found by a second hostile pass ------------------------------------------------------------------------


def test_argparse_usage_errors_are_one_line(capsys):
    code, _, err = run(["caption", "--batch-size", "0", "x.png"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--batch-size" in err and "usage:" not in err


@pytest.mark.parametrize("device", ["meta", "nonsense", "mps"])
def test_a_device_this_machine_cannot_use_is_a_usage_error(capsys, device):
    code, _, err = run(["caption", "--device", device, SHARED_SAMPLES / "chelsea.png"], capsys)
    assert code == 2 and "--device" in error_line(err)


@pytest.mark.parametrize("argv", [["caption", ""], ["video", ""], ["batch", "DIR", "-o", ""]])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(tmp_path, capsys, argv):
    code, _, err = run([tmp_path if a == "DIR" else a for a in argv], capsys)
    assert code == 2 and "empty path" in error_line(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("html", ["out.jsonl", "dir/a.png", "report.txt"])
def test_the_report_never_overwrites_the_records_or_a_photo(tmp_path, capsys, html):
    photo(tmp_path / "dir" / "a.png")
    out = tmp_path / "out.jsonl"
    code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--html", tmp_path / html, "--quiet"], capsys)
    assert code == 2 and "--html" in error_line(err)
    assert (tmp_path / "dir" / "a.png").read_bytes() == (SHARED_SAMPLES / "chelsea.png").read_bytes()


def test_an_output_inside_the_folder_is_not_captioned_as_a_photo(tmp_path, capsys):
    photo(tmp_path / "dir" / "a.png")
    out = tmp_path / "dir" / "zz_out.png"
    code, _, err = run(["batch", tmp_path / "dir", "-o", out, "--format", "jsonl", "--quiet", "--workers", "0"],
                       capsys)
    assert code == 0 and [Path(r["path"]).name for r in read_jsonl(out)] == ["a.png"]


def test_names_with_newlines_and_escapes_stay_on_one_line(tmp_path, capsys):
    bad = tmp_path / "two\nlines\x1b[31m.png"
    bad.write_bytes(b"not a photo")
    code, out, err = run(["caption", bad, photo(tmp_path / "ok\rname.png")], capsys)
    assert code == 1 and err.count("\n") == 1 and "two\\nlines\\x1b[31m.png: not an image" in err
    assert out.count("\n") == 1 and out.startswith(f"{tmp_path}/ok\\rname.png\t")


def test_an_ascii_only_stdout_gets_escapes_not_an_error(tmp_path):
    odd = photo(tmp_path / "🐱 cat.png")
    proc = run_process(["caption", odd], env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    assert proc.returncode == 0 and b"\\U0001f431 cat.png\t" in proc.stdout


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"image": "x.png", "captions": ["..."]}'])
def test_manifests_that_break_parsers_or_scorers_are_one_line(tmp_path, capsys, content):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content.replace("x.png", str(SHARED_SAMPLES / "chelsea.png")) + "\n")
    code, _, err = run(["evaluate", "--manifest", manifest, "--no-meteor"], capsys)
    assert code == 1 and error_line(err)


def test_manifest_conversion_of_a_broken_caption_file_is_one_line(tmp_path, capsys):
    (tmp_path / "coco.json").write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": null}]}')
    code, _, err = run(["manifest", "coco", "--captions", tmp_path / "coco.json", "--images", tmp_path,
                        "--out", tmp_path / "m.jsonl"], capsys)
    assert code == 1 and "coco.json" in error_line(err)
    code, _, err = run(["manifest", "flickr", "--captions", tmp_path / "coco.json", "--images", tmp_path,
                        "--out", tmp_path / "m.jsonl"], capsys)
    assert code == 2 and "--split" in error_line(err)


@pytest.mark.parametrize("out", ["tok.txt", "split.txt"])
def test_manifest_conversion_never_writes_over_its_own_inputs(tmp_path, capsys, out):
    (tmp_path / "tok.txt").write_text("a.jpg#0\tA dog runs .\nb.jpg#0\tA cat .\n")
    (tmp_path / "split.txt").write_text("a.jpg\nb.jpg\n")
    before = {name: (tmp_path / name).read_text() for name in ("tok.txt", "split.txt")}
    code, _, err = run(["manifest", "flickr", "--captions", tmp_path / "tok.txt", "--images", tmp_path,
                        "--split", tmp_path / "split.txt", "--out", tmp_path / out], capsys)
    assert code == 2 and "is an input of this run; write the manifest elsewhere" in error_line(err)
    assert {name: (tmp_path / name).read_text() for name in before} == before
    code, _, err = run(["manifest", "flickr", "--captions", tmp_path / "tok.txt", "--images", tmp_path / "nowhere",
                        "--split", tmp_path / "split.txt", "--out", tmp_path / "m.jsonl"], capsys)
    assert code == 2 and "nowhere: not a folder" in error_line(err) and not (tmp_path / "m.jsonl").exists()


def test_an_unreadable_video_is_one_line_without_opencv_chatter(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    proc = run_process(["video", tmp_path / "notes.mp4", "-o", tmp_path / "notes.srt"])
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and err.startswith(f"skipped {tmp_path / 'notes.mp4'}")


def test_caption_with_stdout_closed_says_so_instead_of_losing_the_results():
    argv = [sys.executable, "-m", "captioner.pipelines.cli", "caption", str(SHARED_SAMPLES / "chelsea.png")]
    proc = subprocess.run(argv, cwd=ROOT, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=300)
    assert proc.returncode == 1 and b"standard output is closed" in proc.stderr


def test_evaluate_counts_missing_images_and_refuses_unscorable_manifests_before_the_model_loads(tmp_path, capsys):
    def manifest_of(*images):
        lines = "".join(json.dumps({"image": str(image), "captions": ["a cat"]}) + "\n" for image in images)
        (tmp_path / "m.jsonl").write_text(lines)
        return tmp_path / "m.jsonl"

    cat = SHARED_SAMPLES / "chelsea.png"
    code, _, err = run(["evaluate", "--manifest", manifest_of(cat, tmp_path / "gone.jpg", tmp_path / "lost.jpg"),
                        "--no-meteor"], capsys)
    assert code == 1 and error_line(err) == (f"captioner: error: 2 images listed in {tmp_path / 'm.jsonl'} are not a "
                                             f"file, e.g. {tmp_path / 'gone.jpg'}; scores without them would not "
                                             "compare")
    code, _, err = run(["evaluate", "--manifest", manifest_of(cat, SHARED_SAMPLES / "coffee.png", cat)], capsys)
    assert code == 1 and f"{cat} is listed more than once; CIDEr-D weighs words" in error_line(err)
    code, _, err = run(["evaluate", "--manifest", manifest_of(cat)], capsys)
    assert code == 1 and "1 image; CIDEr-D weighs words by how many of the images use them, so it needs at least 2" \
        in error_line(err)


@pytest.mark.parametrize("uri, out, message", [
    (False, "a.parquet", "Parquet output is a folder of Ray shards: use it with --ray"),
    (False, "shards/", "shards/: names a folder; give a file name (a folder of shards needs --ray)"),
    (False, "shards/.", "shards/.: names a folder; give a file name (a folder of shards needs --ray)"),
    (True, "x.jsonl", "photos: not a folder (a URI source needs --ray)"),
])
def test_ray_spellings_without_ray_are_refused_instead_of_writing_jsonl(tmp_path, capsys, uri, out, message):
    photo(tmp_path / "photos" / "cat.png")
    source = f"file://{tmp_path / 'photos'}" if uri else str(tmp_path / "photos")
    code, _, err = run(["batch", source, "-o", f"{tmp_path}/{out}"], capsys)
    assert code == 2 and error_line(err).endswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing written


def test_a_dash_for_the_batch_output_means_standard_output_as_for_video(tmp_path):
    photo(tmp_path / "photos" / "cat.png")
    command = [sys.executable, "-m", "captioner.pipelines.cli", "batch", str(tmp_path / "photos"), "-o", "-",
               "--format", "csv", "--quiet"]
    piped = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.decode().splitlines()[0].startswith('"path","caption"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no file named "-"


def test_standard_output_is_written_never_read_back_as_an_earlier_run(tmp_path, capsys):
    """``-o - >> log``: /dev/stdout is then the log file; it was read as records to resume (and refused)."""
    photo(tmp_path / "photos" / "cat.png")
    log = tmp_path / "log.txt"
    log.write_text("log start\n", encoding="utf-8")
    command = f"{sys.executable} -m captioner.pipelines.cli batch {tmp_path / 'photos'} -o - --quiet >> {log}"
    for _ in range(2):  # the second run captions again: standard output holds no earlier run to resume
        appended = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, timeout=300)
        assert appended.returncode == 0 and appended.stderr.decode() == "1 captioned, 0 failed, 0 already done\n"
    first, *records = log.read_text(encoding="utf-8").splitlines()
    assert first == "log start" and [json.loads(r)["caption"] for r in records] == ["a cat is playing with a toy"] * 2
    table = tmp_path / "all.csv"
    command = f"{sys.executable} -m captioner.pipelines.cli batch {tmp_path / 'photos'} -o - --format csv --quiet"
    refused = subprocess.run(f"{command} --method greedy --beam-size 4 >> {table}", shell=True, cwd=ROOT,
                             capture_output=True, timeout=300)
    assert refused.returncode == 2 and table.read_bytes() == b""  # no header for a run refused after opening it
    for _ in range(2):  # the header once, so the file reads back as records
        assert subprocess.run(f"{command} >> {table}", shell=True, cwd=ROOT, timeout=300).returncode == 0
    assert table.read_text(encoding="utf-8").count('"path","caption"') == 1
    code, _, err = run(["batch", str(tmp_path / "photos"), "-o", str(table), "--quiet"], capsys)
    assert code == 0 and err == "0 captioned, 0 failed, 1 already done\n"
    closed = subprocess.run(f"{command} >&-", shell=True, cwd=ROOT, capture_output=True, timeout=300)
    assert closed.returncode == 1 and closed.stderr.decode() == (
        "captioner: error: -: standard output is closed or is not a file descriptor here; the records have "
        "nowhere to go (give a file name)\n")
    code, _, err = run(["batch", str(tmp_path / "photos"), "-o", "-", "--html", str(tmp_path / "r.html")], capsys)
    assert code == 2 and error_line(err).endswith("-: --html reads the records back from the output; "
                                                  "write them to a regular file")


@pytest.mark.parametrize("out, fmt, message", [
    ("m.jsonl", "csv", "format csv would write csv records into {out}, which reads as jsonl: name the file .csv, "
                       "or leave the format out"),
    ("m.CSV", "jsonl", "format jsonl would write jsonl records into {out}, which reads as csv: name the file "
                       ".jsonl, or leave the format out"),
])
def test_a_format_that_contradicts_the_outputs_extension_is_refused(tmp_path, capsys, out, fmt, message):
    """As ``video`` refuses SRT text in x.vtt; an extension of no record format (``m.txt``) still takes any."""
    photo(tmp_path / "photos" / "cat.png")
    code, _, err = run(["batch", str(tmp_path / "photos"), "-o", str(tmp_path / out), "--format", fmt], capsys)
    assert code == 2 and error_line(err) == "captioner: error: " + message.format(out=tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    code, _, _ = run(["batch", str(tmp_path / "photos"), "-o", str(tmp_path / "m.txt"), "--format", "csv", "--quiet"],
                     capsys)
    assert code == 0 and (tmp_path / "m.txt").read_text(encoding="utf-8").startswith('"path","caption"')


def test_an_output_under_a_file_names_the_file_not_file_exists(tmp_path, capsys):
    photo(tmp_path / "photos" / "cat.png")
    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    for argv, where in ((["batch", str(tmp_path / "photos"), "-o"], "notes.txt/sub/x.jsonl: cannot create its folder"),
                        (["video", str(tmp_path / "clip.mp4"), "-o"], "notes.txt/x.srt: cannot write here")):
        if argv[0] == "video":
            writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
            writer.write(np.zeros((48, 64, 3), np.uint8))
            writer.release()
        out = tmp_path / where.split(":")[0]
        code, _, err = run([*argv, str(out)], capsys)
        assert code == 1 and error_line(err) == (f"captioner: error: {tmp_path}/{where}: "
                                                 f"{tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine\n"


def test_a_reader_that_goes_away_stops_the_run_quietly_and_blames_no_input(tmp_path):
    """``| head``: the next write fails; the run stops (exit 1) without calling the photo or the video bad."""
    for name in ("a", "b", "c"):
        photo(tmp_path / "photos" / f"{name}.png")
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    for argv in (["batch", str(tmp_path / "photos"), "-o", "-", "--batch-size", "1"], ["video", str(clip), "-o", "-"]):
        process = subprocess.Popen([sys.executable, "-m", "captioner.pipelines.cli", *argv, "--quiet"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()  # the reader is gone before the first record
        err = process.stderr.read().decode()
        assert process.wait(timeout=300) == 1 and err == "", err


def test_records_can_be_piped_to_standard_output_and_subtitles_are_refused_naming_it(tmp_path):
    photo(tmp_path / "photos" / "cat.png")
    piped = subprocess.run(f"{sys.executable} -m captioner.pipelines.cli batch {tmp_path / 'photos'} "
                           "-o /dev/stdout --quiet | cat", shell=True, cwd=ROOT, capture_output=True, timeout=300)
    records = [json.loads(line) for line in piped.stdout.decode().splitlines()]
    assert piped.returncode == 0 and [r["path"] for r in records] == [str(tmp_path / "photos" / "cat.png")]
    report = subprocess.run(f"{sys.executable} -m captioner.pipelines.cli batch {tmp_path / 'photos'} -o /dev/stdout "
                            f"--html {tmp_path / 'r.html'} | cat", shell=True, cwd=ROOT, capture_output=True,
                            timeout=60)
    assert error_line(report.stderr.decode()).endswith("/dev/stdout: --html reads the records back from the output; "
                                                       "write them to a regular file")  # it hung reading its own pipe
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for _ in range(10):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    proc = subprocess.run(f"{sys.executable} -m captioner.pipelines.cli video {clip} -o /dev/stdout | cat",
                          shell=True, cwd=ROOT, capture_output=True, timeout=300)
    assert error_line(proc.stderr.decode()) == ("captioner: error: /dev/stdout: not a regular file (a device, pipe "
                                                "or socket); give a file name")


def test_a_folder_without_images_says_so(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "README.md").write_text("holiday photos\n")
    code, _, err = run(["batch", tmp_path / "photos", "-o", tmp_path / "out.jsonl"], capsys)
    assert code == 0 and err.splitlines()[-1].startswith(f"warning: no images under {tmp_path / 'photos'} (files "
                                                         "named .bmp, .gif, .jfif, .jpeg, .jpg")
