"""The captioner command, run in-process through main(argv) with the shipped model."""

import contextlib
import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios

import pytest
from conftest import SAMPLES, SHARED_SAMPLES

from captioner.options import DEFAULT_MODEL_DIR
from captioner.pipelines.cli import main


def test_caption_names_a_cat_with_no_flags(capsys):
    assert main(["caption", str(SAMPLES / "chelsea.png")]) == 0
    path, caption = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(SAMPLES / "chelsea.png")
    assert any(word in caption.split() for word in ("cat", "cats", "kitten"))


def test_caption_json_has_path_caption_and_score(capsys):
    assert main(["caption", "--json", str(SAMPLES / "coffee.png"), str(SAMPLES / "chelsea.png")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == [str(SAMPLES / "coffee.png"), str(SAMPLES / "chelsea.png")]
    for r in records:
        assert r["caption"] and r["score"] < 0 and 0 < r["min_prob"] <= 1


def test_tags_name_what_the_encoder_sees_in_json_and_with_the_tags_flag(capsys):
    photos = [str(SAMPLES / "coffee.png"), str(SAMPLES / "chelsea.png")]
    assert main(["caption", "--json", *photos]) == 0
    coffee, cat = ([t["label"] for t in json.loads(line)["tags"]] for line in capsys.readouterr().out.splitlines())
    assert {"espresso", "cup"} & set(coffee)  # whatever the caption says (a Flickr8k decoder knows no cups)
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(cat)
    assert main(["caption", "--tags", *photos]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [len(cells) for cells in lines] == [3, 3] and lines[0][2].startswith("espresso 0.")


def test_a_bad_file_is_skipped_the_rest_printed_and_exit_is_1(tmp_path, capsys):
    data = (SAMPLES / "chelsea.png").read_bytes()
    bad = tmp_path / "broken.png"
    bad.write_bytes(data[: len(data) // 2])  # a real photo cut in half
    good = tmp_path / "cat.png"
    shutil.copy(SAMPLES / "chelsea.png", good)
    assert main(["caption", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}\t") and captured.out.count("\n") == 1
    assert captured.err.strip() == f"skipped {bad}: image file is truncated"


def test_bad_option_values_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_a_batch_refused_after_its_output_was_opened_leaves_no_new_file_and_keeps_an_old_one(tmp_path, capsys, name):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(SAMPLES / "chelsea.png", photos)
    out = tmp_path / name
    assert main(["batch", str(photos), "-o", str(out), "--min-length", "40", "--quiet"]) == 2  # the model's max 20
    assert "min_length=40 must be < max_length=20" in capsys.readouterr().err and not out.exists()
    assert main(["batch", str(photos), "-o", str(out), "--quiet"]) == 0
    kept = out.read_text()
    assert main(["batch", str(photos), "-o", str(out), "--min-length", "40", "--quiet"]) == 2
    assert out.read_text() == kept


def test_an_onnx_export_without_its_backend_is_refused_not_ignored(tmp_path, capsys):
    assert main(["caption", "--onnx", str(tmp_path), str(SAMPLES / "chelsea.png")]) == 2
    assert "--onnx names an export for ONNX Runtime: add --backend onnxruntime" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_the_model(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"captioner: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1


def test_decoding_flags_change_the_search(capsys, default_model):
    import dataclasses

    from captioner.api import caption_images

    photo = str(SHARED_SAMPLES / "astronaut.png")
    assert main(["caption", "--json", photo]) == 0
    beam = json.loads(capsys.readouterr().out)
    assert main(["caption", "--json", "--method", "greedy", photo]) == 0
    greedy = json.loads(capsys.readouterr().out)
    expected = caption_images(default_model, [photo],
                              options=dataclasses.replace(default_model.config.decoding, method="greedy"))[0]
    assert greedy["caption"] == expected.text != beam["caption"]  # the shipped beam adds "young" here
    assert main(["caption", "--json", "--max-length", "3", photo]) == 0
    short = json.loads(capsys.readouterr().out)
    assert len(short["caption"].split()) <= 3


def test_n_best_prints_the_beams_captions_best_first_and_the_first_is_the_plain_line(capsys, default_model):
    import dataclasses

    from captioner.api import caption_paths

    photos = [str(SAMPLES / "chelsea.png"), str(SHARED_SAMPLES / "coffee.png")]
    assert main(["caption", "--min-confidence", "0.3", *photos]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main(["caption", "--min-confidence", "0.3", "--n-best", "3", *photos]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = list(caption_paths(default_model, photos,
                                  options=dataclasses.replace(default_model.config.decoding, n_best=3)))
    assert lines[0::3] == plain and len(lines) == 6
    for result, group in zip(expected, (lines[:3], lines[3:]), strict=True):
        assert [line.split("\t")[:2] for line in group] == [[str(result.path), c.text] for c in result.captions]
        assert [line.split("\t")[2] != "" for line in group] == [c.confidence < 0.3 for c in result.captions]
    assert main(["caption", "--json", "--n-best", "2", "--min-confidence", "0.3", "--fallback", "tags", photos[1]]) == 0
    record = json.loads(capsys.readouterr().out)
    alternatives = expected[1].captions[:2]
    assert record["caption"] == "a photo of an espresso" and record["model_caption"] == alternatives[0].text
    assert [(a["caption"], a["confidence"], a.get("unsure", False)) for a in record["n_best"]] == \
        [(c.text, c.confidence, c.confidence < 0.3) for c in alternatives]
    with pytest.raises(SystemExit) as usage:  # batch writes one caption per input
        main(["batch", "--n-best", "2", photos[0], "-o", "x.jsonl"])
    assert usage.value.code == 2
    assert "--n-best is for captioner caption; this command writes one caption per input" in capsys.readouterr().err


def test_flags_are_checked_against_the_models_own_decoding_defaults_before_torch_loads(tmp_path, capsys):
    """The shipped model searches a beam of 5 (the plain default is 3), and a model may sample by default."""
    photo = str(SAMPLES / "chelsea.png")
    assert main(["caption", "--n-best", "5", photo]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    sampler = tmp_path / "sampler"
    shutil.copytree(DEFAULT_MODEL_DIR, sampler)
    config = json.loads((sampler / "config.json").read_text(encoding="utf-8"))
    config["decoding"].update(method="sample", seed=1, temperature=0.7)
    (sampler / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert main(["caption", "--model", str(sampler), "--temperature", "0.5", "--seed", "2", photo]) == 0
    capsys.readouterr()
    assert main(["caption", "--model", str(sampler), "--method", "beam", photo]) == 0  # its temperature not read
    assert main(["caption", photo]) == 0
    beam, plain = capsys.readouterr().out.splitlines()
    assert beam == plain  # the same weights, searched as the shipped model searches
    code = ("import sys; from captioner.pipelines.cli import main; "
            f"code = main(['caption', '--n-best', '6', {photo!r}]); print(code, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout == "2 False\n"
    assert run.stderr == "captioner: error: decoding option n_best=6 must be <= beam_size=5\n"


def test_every_decoding_option_has_a_flag_that_reaches_the_options():
    """Flags are generated from DecodingOptions, so none can be listed and silently ignored."""
    import dataclasses

    from captioner.options import DecodingOptions
    from captioner.pipelines.cli import build_parser
    from captioner.pipelines.flags import dataclass_from_args

    common = {"max_length": 9, "min_length": 2, "length_penalty": 0.5, "no_repeat_ngram": 3, "suppress_unk": False,
              "concept_boost": 1.5, "concept_threshold": 0.3, "consensus_weight": 2.5, "n_best": 2}
    per_method = [{"method": "beam", "beam_size": 7},  # each method with the options it alone reads
                  {"method": "sample", "temperature": 0.7, "top_k": 5, "top_p": 0.8, "seed": 4}]
    assert set(common).union(*per_method) == {f.name for f in dataclasses.fields(DecodingOptions)}
    for method in per_method:
        changed = {**common, **method}
        argv = ["caption", "x.jpg"]
        for name, value in changed.items():
            flag = "--" + name.replace("_", "-")
            argv += [flag.replace("--", "--no-")] if value is False else [flag, str(value)]
        options = dataclass_from_args(build_parser().parse_args(argv), DecodingOptions())
        assert {name: getattr(options, name) for name in changed} == changed


@pytest.mark.parametrize("argv, message", [
    (["--method", "greedy", "--beam-size", "4"], "option beam_size applies to method 'beam' only, not 'greedy'"),
    (["--method", "sample", "--beam-size", "4"], "option beam_size applies to method 'beam' only, not 'sample'"),
    (["--top-k", "5"], "decoding option top_k=5 applies to method 'sample' only, not 'beam'"),
    (["--seed", "5"], "decoding option seed=5 applies to method 'sample' only, not 'beam'"),
    (["--method", "greedy", "--consensus-weight", "2"],
     "decoding option consensus_weight ranks an image's candidate captions; method 'greedy' finds one"),
    (["--method", "sample", "--length-penalty", "0.5"],
     "decoding option length_penalty ranks an image's candidate captions; method 'sample' with n_best=1 draws one"),
    (["--beam-size", "1", "--consensus-weight", "2"],
     "decoding option consensus_weight ranks an image's candidate captions; method 'beam' with beam_size=1 keeps one"),
    (["--concept-boost", "0", "--concept-threshold", "0.2"],
     "decoding option concept_threshold picks the labels whose words concept_boost raises; concept_boost is 0"),
])
def test_an_option_the_chosen_method_does_not_read_is_refused_not_ignored(argv, message, capsys):
    """The model's defaults hold a beam size for every method: only a beam size the user gave is refused."""
    assert main(["caption", *argv, str(SAMPLES / "chelsea.png")]) == 2
    assert message in capsys.readouterr().err
    assert main(["caption", "--method", "greedy", str(SAMPLES / "chelsea.png")]) == 0
    assert main(["caption", "--method", "sample", "--n-best", "2", "--consensus-weight", "2", "--seed", "1",
                 str(SAMPLES / "chelsea.png")]) == 0  # two samples to rank


def test_ensemble_combines_model_folders_and_refuses_strangers(tmp_path, capsys):
    import torch

    from captioner.model import CaptionModel, ModelConfig
    from captioner.options import DecoderConfig
    from captioner.vocab import Vocabulary

    def save(name: str, words: list[str], attention: bool = True) -> str:
        vocab = Vocabulary(words)
        config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, attention, 16, 0.0))
        CaptionModel(config, vocab, pretrained_encoder=False).save(tmp_path / name)
        return str(tmp_path / name)

    torch.manual_seed(0)
    a, b = save("a", ["a", "cat"]), save("b", ["a", "cat"])
    assert main(["ensemble", a, b, "--out", str(tmp_path / "ab")]) == 0
    assert "2 decoders" in capsys.readouterr().out
    assert CaptionModel.load(tmp_path / "ab").config.ensemble_size == 2
    assert main(["caption", "--model", str(tmp_path / "ab"), str(SAMPLES / "chelsea.png")]) == 0

    c = save("c", ["a", "dog"])
    assert main(["ensemble", a, c, "--out", str(tmp_path / "ac")]) == 1
    assert f"{c}: its vocabulary differs from {a}'s" in capsys.readouterr().err
    assert not (tmp_path / "ac").exists()
    assert main(["ensemble", a, a, "--out", str(tmp_path / "aa")]) == 2
    assert f"{a} is given twice" in capsys.readouterr().err
    assert main(["ensemble", a, "--out", str(tmp_path / "a")]) == 2  # a usage error, before any model loads
    assert "an ensemble combines at least 2 model folders, got 1" in capsys.readouterr().err
    shutil.copytree(a, tmp_path / "a_copy")
    assert main(["ensemble", a, str(tmp_path / "a_copy"), "--out", str(tmp_path / "aa")]) == 1
    assert f"{tmp_path / 'a_copy'}: holds a decoder with the same weights as one of {a}'s" in capsys.readouterr().err
    assert main(["ensemble", str(tmp_path / "ab"), b, "--out", str(tmp_path / "abb")]) == 1  # b is in ab already
    assert f"{b}: holds a decoder with the same weights as one of {tmp_path / 'ab'}'s" in capsys.readouterr().err
    assert not (tmp_path / "aa").exists() and not (tmp_path / "abb").exists()
    torch.manual_seed(0)  # as a was made: the weights the two share are equal, the rest are not there
    plain = save("plain", ["a", "cat"], attention=False)
    assert main(["ensemble", plain, a, "--out", str(tmp_path / "pa")]) == 1
    assert f"{a}: its decoder has attention=True, {plain}'s False" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["caption", "x.png", "--beam-size", "0"], "argument --beam-size: 0 is not in [1, 64]"),
    (["caption", "x.png", "--consensus-weight", "nan"], "argument --consensus-weight: nan is not in [0, 50]"),
    (["video", "x.mp4", "--every", "0"], "argument --every: 0 is not in [0.01, 3600]"),
    (["video", "x.mp4", "--batch-size", "two"], "argument --batch-size: 'two' is not a whole number"),
    (["caption", "x.png", "--beam-size", "1" + "0" * 400],  # too large for a float: no OverflowError
     "argument --beam-size: 1" + "0" * 400 + " is not in [1, 64]"),
])
def test_a_number_out_of_range_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and f"error: {message} (see captioner {argv[0]} --help)" in capsys.readouterr().err


def _batch_stderr(folder, out, stderr) -> None:
    subprocess.run([sys.executable, "-m", "captioner.pipelines.cli", "batch", str(folder), "-o", str(out)],
                   stdout=subprocess.DEVNULL, stderr=stderr, timeout=300, check=True)


def test_batch_draws_its_progress_bar_on_a_terminal_and_not_into_a_log_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLES / "chelsea.png", folder)
    with open(tmp_path / "log.txt", "w") as log:
        _batch_stderr(folder, tmp_path / "a.jsonl", log)
    logged = (tmp_path / "log.txt").read_text()
    assert "\r" not in logged and logged.splitlines() == ["1 captioned, 0 failed, 0 already done"]
    terminal, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 columns wide
    try:
        _batch_stderr(folder, tmp_path / "b.jsonl", side)
        os.close(side)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the writer is gone and all is read
            while chunk := os.read(terminal, 4096):
                drawn += chunk
    finally:
        os.close(terminal)
    assert b"\rcaptioning: " in drawn and b"1 captioned, 0 failed" in drawn


def test_caption_given_a_folder_points_to_batch(tmp_path, capsys):
    folder = tmp_path / "my photos"
    folder.mkdir()
    assert main(["caption", str(folder), str(SAMPLES / "chelsea.png")]) == 1
    captured = capsys.readouterr()
    assert "chelsea.png\ta cat" in captured.out
    assert captured.err == f"skipped {folder}: not a regular file (a folder: captioner batch '{folder}' -o " \
                           "captions.jsonl captions the photos in it)\n"
    assert main(["batch", str(SAMPLES / "chelsea.png"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert f"chelsea.png: not a folder (one photo: captioner caption {SAMPLES / 'chelsea.png'})" in \
        capsys.readouterr().err


def test_a_model_whose_config_is_json_but_not_an_object_is_one_clear_line(tmp_path, capsys):
    import shutil

    from captioner.model import DEFAULT_MODEL_DIR

    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1]")
    assert main(["caption", "--model", str(tmp_path / "m"), "--beam-size", "2", str(SAMPLES / "chelsea.png")]) == 1
    assert capsys.readouterr().err == (f"captioner: error: {tmp_path / 'm' / 'config.json'}: cannot load model: bad "
                                       "model config: model config must be a JSON object, not list\n")


@pytest.mark.parametrize("module, argv, message", [
    ("onnxruntime", ["caption", "--backend", "onnxruntime", str(SAMPLES / "chelsea.png")],
     "--backend onnxruntime needs the onnx extra: pip install 'captioner[onnx]' (onnxruntime is missing)"),
    ("onnx", ["export", "-o", "{tmp}/export"], "export needs the onnx extra: pip install 'captioner[onnx]' (onnx is "
                                                "missing)"),
    ("ray", ["batch", str(SAMPLES), "--ray", "-o", "{tmp}/out"], "--ray needs the ray extra: pip install "
                                                                 "'captioner[ray]' (ray is missing)"),
    ("python_multipart", ["serve", "--port", "1"], "serve needs the serve extra: pip install 'captioner[serve]' "
                                                    "(python_multipart is missing)"),
])
def test_a_command_whose_extra_is_missing_names_the_extra_in_one_line(monkeypatch, capsys, tmp_path, module, argv,
                                                                       message):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err == f"captioner: error: {message}\n"
    assert not list(tmp_path.iterdir())  # nothing made
