"""The maintainers' scripts in tools/: each refuses what it would misuse in one line, before any work."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from captioner.data import read_manifest, write_manifest

DEV = ROOT / "data_manifests" / "flickr8k_dev.jsonl"
needs_dev = pytest.mark.skipif(not read_manifest(DEV)[0].image.is_file(), reason="Flickr8k dev photos not here")


def run_tool(name: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess, program: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr
    return lines[0]


@needs_dev
def test_distill_refuses_to_write_over_its_input_or_a_file_that_is_not_a_manifest(tmp_path):
    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, [(str(e.image), list(e.captions)) for e in read_manifest(DEV)[:3]])
    before = manifest.read_bytes()
    result = run_tool("distill_captions", "--teacher", "captioner/default_model", "--manifest", str(manifest),
                      "--out", str(manifest), "--teacher-only")
    assert result.returncode == 2 and "is an input of this run" in one_error_line(result, "distill_captions")
    assert manifest.read_bytes() == before  # the references are still there
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    result = run_tool("distill_captions", "--teacher", "captioner/default_model", "--manifest", str(manifest),
                      "--out", str(notes))
    assert result.returncode == 2 and "exists and is not a manifest" in one_error_line(result, "distill_captions")
    assert notes.read_text() == "mine\n"
    result = run_tool("distill_captions", "--teacher", "x", "--manifest", str(manifest), "--out", "o.jsonl",
                      "--copies", "0")
    assert result.returncode == 2 and "--copies: 0 is not in [1, 100]" in result.stderr


def test_tune_decoding_checks_every_setting_before_any_work(tmp_path):
    result = run_tool("tune_decoding", "--model", "captioner/default_model", "--manifest", str(DEV),
                      "--beams", "1", "65", "--cache-dir", str(tmp_path / "cache"))
    line = one_error_line(result, "tune_decoding")
    assert result.returncode == 2 and "beam_size=65 must be a whole number in [1, 64]" in line
    assert not (tmp_path / "cache").exists()  # no feature was computed


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe", "vocabulary is not UTF-8 text"),
    (b'{"a": 1}', "vocabulary must be a JSON list of words"),
    (None, "No such file or directory"),
])
def test_ground_classes_names_a_bad_vocabulary_in_one_line_and_writes_nothing(tmp_path, content, message):
    from captioner.concepts import GROUNDING_FILE

    vocab = tmp_path / "vocab.json"
    if content is not None:
        vocab.write_bytes(content)
    before = GROUNDING_FILE.read_bytes()
    result = run_tool("ground_classes", "--vocab", str(vocab))
    assert result.returncode == 1 and message in one_error_line(result, "ground_classes")
    assert GROUNDING_FILE.read_bytes() == before


@needs_dev
@pytest.mark.slow
def test_fit_calibrator_refuses_a_fit_it_cannot_learn_from_and_saves_nothing(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ROOT / "captioner" / "default_model", model)
    (model / "calibration.json").unlink()
    entries = read_manifest(DEV)[:4]
    few = tmp_path / "few.jsonl"
    write_manifest(few, [(str(e.image), list(e.captions)) for e in entries])
    (tmp_path / "report").write_text("a file")
    result = run_tool("fit_calibrator", "--model", str(model), "--manifest", str(few), "--train", str(few),
                      "--report", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2 and "--report" in one_error_line(result, "fit_calibrator")
    assert not (tmp_path / "cache").exists()  # refused before any work
    result = run_tool("fit_calibrator", "--model", str(model), "--manifest", str(few), "--train", str(few),
                      "--cache-dir", str(tmp_path / "cache"), "--save")
    line = one_error_line(result, "fit_calibrator").split("\n")[0]
    assert result.returncode == 1 and "a calibrator needs at least 10 of each: give more images" in line
    assert not (model / "calibration.json").exists()
    json.loads((model / "config.json").read_text())  # the folder is as it was


def test_held_out_reference_check_ranks_by_the_human_caption_each_caption_was_not_judged_by():
    """Each photo's two references agree with each other: both repeat its caption (acceptable)
    or both say something else. The held-out one then ranks perfectly at each position, and
    random signals do not. Fitting and checking halves out of step would not give 1.0."""
    sys.path.insert(0, str(ROOT / "tools"))
    import torch
    from fit_calibrator import Scored, held_out_reference_check

    from captioner.confidence import SIGNALS, FeatureStats

    captions = [f"a man w{i}a rides a w{i}b bike near the w{i}c" for i in range(40)]
    other = [f"two dogs z{i}a swim in the z{i}b lake" for i in range(40)]
    references = [[c, c] if i % 3 else [o, o] for i, (c, o) in enumerate(zip(captions, other, strict=True))]
    signals = torch.randn(40, len(SIGNALS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scored = Scored("photos", signals, torch.zeros(40), captions, references, [None] * 40)
    rows = held_out_reference_check([scored], FeatureStats((0.0,), (1.0,)))
    assert [row["reference"] for row in rows] == [1, 2]
    for row in rows:
        assert row["human caption"] == {"photos": 1.0, "mixed": 1.0}
        assert row["both"]["photos"] > 0.9
        assert row["signals"]["photos"] < 0.9


@needs_dev
def test_held_out_reference_needs_two_references_of_every_image_and_says_so_before_any_work(tmp_path):
    entries = read_manifest(DEV)[:3]
    one = tmp_path / "one.jsonl"
    write_manifest(one, [(str(e.image), list(e.captions)[: 1 if i == 1 else 5]) for i, e in enumerate(entries)])
    result = run_tool("fit_calibrator", "--manifest", str(one), "--train", str(one), "--held-out-reference",
                      "--cache-dir", str(tmp_path / "cache"))
    line = one_error_line(result, "fit_calibrator")
    assert result.returncode == 2 and f"{entries[1].image} has fewer" in line
    assert not (tmp_path / "cache").exists()  # refused before any captioning
