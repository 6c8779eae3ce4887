"""ONNX export of the shipped model and the ONNX Runtime backend: same captions as PyTorch on real photos."""

import json
import shutil
import tempfile

import pytest
from conftest import SAMPLES, SHARED_SAMPLES

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'captioner[onnx]')")

from captioner.api import caption_paths  # noqa: E402
from captioner.errors import ModelLoadError, OutputError  # noqa: E402
from captioner.onnx_export import (  # noqa: E402
    GRAPHS,
    OPSET,
    RUNTIME_FILE,
    SEAL_KEYS,
    export_onnx,
    quantize_int8,
    write_runtime,
)
from captioner.onnx_runtime import load_onnx_model  # noqa: E402
from captioner.pipelines.cli import main  # noqa: E402

PHOTOS = [SAMPLES / "chelsea.png", SAMPLES / "coffee.png", SHARED_SAMPLES / "astronaut.png",
          SHARED_SAMPLES / "rocket.jpg"]


@pytest.fixture(scope="module")
def exported(default_model, tmp_path_factory):
    from captioner.model import DEFAULT_MODEL_DIR

    return export_onnx(default_model, tmp_path_factory.mktemp("onnx") / "export", calibration_from=DEFAULT_MODEL_DIR)


def test_the_export_holds_checked_graphs_and_what_a_runtime_needs(exported, default_model):
    assert all((exported / f"{name}.onnx").is_file() for name in GRAPHS)  # onnx.checker passed on each
    runtime = json.loads((exported / RUNTIME_FILE).read_text())
    assert runtime["opset"] == OPSET and runtime["vocabulary"] == default_model.vocab.itos
    assert runtime["decoding"]["beam_size"] == default_model.config.decoding.beam_size
    assert runtime["preprocess"]["size"] == 224 and len(runtime["class_names"]) == 1000


def test_the_encoder_graph_pads_with_pad_operators_not_scatter_writes(exported):
    """The eager encoder pads by writing slices; exported that way it became 25 ScatterND
    operators, and ONNX Runtime ran it at 10 images/s in 7.9 GB (against about 130)."""
    import onnx

    operators = {node.op_type for node in onnx.load(exported / "encoder.onnx").graph.node}
    assert "Pad" in operators and "Conv" in operators
    assert not operators & {"ScatterND", "ScatterElements"}


def test_onnx_runtime_captions_equal_pytorch_captions(exported, default_model):
    onnx_model = load_onnx_model(exported)
    torch_results = list(caption_paths(default_model, PHOTOS))
    onnx_results = list(caption_paths(onnx_model, PHOTOS))
    for ours, theirs in zip(onnx_results, torch_results, strict=True):
        assert ours.captions[0].text == theirs.captions[0].text
        assert ours.captions[0].score == pytest.approx(theirs.captions[0].score, abs=1e-4)
        assert ours.captions[0].confidence == pytest.approx(theirs.captions[0].confidence, abs=1e-3)
        assert [t.label for t in ours.tags] == [t.label for t in theirs.tags]


def test_int8_weights_still_name_the_cat(exported, tmp_path, caplog):
    import logging

    shutil.copytree(exported, tmp_path / "int8")
    with caplog.at_level(logging.INFO):
        quantize_int8(tmp_path / "int8")
    assert "pre-processing" not in caplog.text  # ONNX Runtime's advice to its own users is not ours to print
    step = "decoder_step.onnx"
    assert (tmp_path / "int8" / step).stat().st_size < (exported / step).stat().st_size / 3
    (result,) = caption_paths(load_onnx_model(tmp_path / "int8"), [SAMPLES / "chelsea.png"])
    assert result.captions[0].text == "a cat is playing with a toy"


def _unsealed(folder):
    """As an export written before runtime.json was sealed: the loader's own checks of each part are what is left."""
    runtime = json.loads((folder / RUNTIME_FILE).read_text())
    for key in SEAL_KEYS:
        del runtime[key]
    (folder / RUNTIME_FILE).write_text(json.dumps(runtime))
    return runtime


def test_an_export_is_one_model_its_seal_refuses_a_mixed_cut_short_or_edited_one(exported, tmp_path):
    int8 = tmp_path / "int8"
    shutil.copytree(exported, int8)
    quantize_int8(int8)
    assert load_onnx_model(int8).vocab.itos == load_onnx_model(exported).vocab.itos  # resealed over its new graphs
    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    shutil.copy(int8 / "decoder_step.onnx", mixed / "decoder_step.onnx")  # another export's graph
    with pytest.raises(ModelLoadError, match=rf"^{mixed}/decoder_step.onnx: not the file this export wrote"):
        load_onnx_model(mixed)
    short = tmp_path / "short"
    shutil.copytree(exported, short)
    (short / "consensus.json").unlink()  # as an export stopped while copying its reranking data once left it
    with pytest.raises(ModelLoadError, match=rf"^{short}/consensus.json: missing from the export"):
        load_onnx_model(short)
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    runtime = json.loads((edited / RUNTIME_FILE).read_text())
    words = runtime["vocabulary"]
    cat, dog = words.index("cat"), words.index("dog")
    words[cat], words[dog] = "dog", "cat"  # every "cat" would be written "dog"
    (edited / RUNTIME_FILE).write_text(json.dumps(runtime))
    with pytest.raises(ModelLoadError, match=rf"^{edited}/runtime.json: edited after the export"):
        load_onnx_model(edited)
    del runtime["content_sha256"]  # and the checksum taken out, as if the export were older than the seal
    (edited / RUNTIME_FILE).write_text(json.dumps(runtime))
    with pytest.raises(ModelLoadError, match=rf"^{edited}/runtime.json: edited .* checksum is gone"):
        load_onnx_model(edited)
    bare = tmp_path / "bare"  # sealed without calibration or consensus data: another model's copied in does not act
    shutil.copytree(exported, bare)
    for name in ("calibration.json", "consensus.json", "consensus.safetensors"):
        (bare / name).rename(tmp_path / name)
    write_runtime(bare, json.loads((bare / RUNTIME_FILE).read_text()))  # sealed over the files left
    assert load_onnx_model(bare).calibrator is None
    shutil.copy(tmp_path / "calibration.json", bare / "calibration.json")
    with pytest.raises(ModelLoadError, match=rf"^{bare}/calibration.json: not part of this export"):
        load_onnx_model(bare)


def test_a_missing_or_malformed_graph_is_a_clear_error(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    _unsealed(broken)
    (broken / "decoder_step.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="decoder_step.onnx: cannot load ONNX graph"):
        load_onnx_model(broken)
    (broken / "decoder_step.onnx").unlink()
    with pytest.raises(ModelLoadError, match="decoder_step.onnx: cannot load ONNX graph: no such file"):
        load_onnx_model(broken)
    (broken / RUNTIME_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="runtime.json: cannot read"):
        load_onnx_model(broken)
    with pytest.raises(OutputError, match="not empty"):
        export_onnx(load_onnx_model(exported), exported)


def _edited(r, **changes):
    r.update(changes)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["preprocess"].update(size=300), r"encoder.onnx: does not fit the export's runtime.json: it takes"),
    (lambda r: r["preprocess"].update(size=0), "runtime.json: bad runtime description: .*positive whole size"),
    (lambda r: r["preprocess"].update(size="224"), "runtime.json: bad runtime description: .*positive whole size"),
    (lambda r: r["preprocess"].update(mean=[int("9" * 400), 0, 0]), "bad runtime description: .*three means"),
    (lambda r: _edited(r, vocabulary=r["vocabulary"][:2000]), "runtime.json: bad runtime description: vocabulary "
                                                              "has 2000 words, config expects 2540"),
    (lambda r: _edited(r, vocabulary=r["vocabulary"][:2000], decoder={**r["decoder"], "vocab_size": 2000}),
     "decoder_step.onnx: does not fit .* scores 2540 words, runtime.json's vocabulary has 2000"),
    (lambda r: _edited(r, vocabulary=r["vocabulary"][:10] + r["vocabulary"][9:]), "lists a word twice"),
    (lambda r: _edited(r, vocabulary=list(range(10))), "must be a list of words"),
    (lambda r: _edited(r, class_names=r["class_names"][:10]), "classifier.onnx: does not fit .* gives 1000 classes"),
    (lambda r: _edited(r, class_names=[1, 2]), "class_names must be a list of names"),
    (lambda r: r["class_names"].__setitem__(5, "cat; tabby:0.5"), r"class_names\[5\] 'cat; tabby:0.5' holds ';'"),
    (lambda r: r["class_names"].__setitem__(7, " "), r"class_names\[7\] ' ' is empty"),
    (lambda r: _edited(r, grid_channels=1000), "encoder.onnx: does not fit .* grid of 1280 channels"),
])
def test_a_description_that_does_not_fit_its_graphs_is_refused_at_load_naming_the_file(exported, tmp_path, edit,
                                                                                        message):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    runtime = _unsealed(broken)
    edit(runtime)
    (broken / RUNTIME_FILE).write_text(json.dumps(runtime))
    with pytest.raises(ModelLoadError, match=message):
        load_onnx_model(broken)


def test_the_cli_exports_and_captions_with_onnx_runtime(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert main(["caption", "--backend", "onnxruntime", str(SAMPLES / "chelsea.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("\ta cat is playing with a toy")
    assert not list(tmp_path.glob("captioner-onnx-*"))  # the export made for the run is gone once loaded
    assert main(["export", "-o", str(tmp_path / "x")]) == 0
    assert main(["caption", "--backend", "onnxruntime", "--onnx", str(tmp_path / "x"), "--json",
                 str(SAMPLES / "chelsea.png")]) == 0
    assert '"caption": "a cat is playing with a toy"' in capsys.readouterr().out
    assert main(["caption", "--backend", "onnxruntime", "--onnx", str(tmp_path / "nowhere"),
                 str(SAMPLES / "chelsea.png")]) == 1
    assert "runtime.json: cannot read" in capsys.readouterr().err


def test_export_checks_its_folder_before_the_model_loads_and_leaves_none_when_it_fails(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["export", "-o", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err == f"captioner: error: {tmp_path / 'file'}: exists and is not a folder\n"
    assert main(["export", "-o", str(tmp_path / "new"), "--model", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == f"captioner: error: {tmp_path / 'nowhere'}: cannot load model: no such folder\n"
    assert not (tmp_path / "new").exists() and (tmp_path / "file").read_text() == "mine"


def test_an_int8_export_whose_quantizer_fails_leaves_no_float_export_behind(tmp_path, capsys, monkeypatch):
    import onnxruntime.quantization
    from google.protobuf.message import DecodeError

    real, calls = onnxruntime.quantization.quantize_dynamic, []

    def fails_on_the_second_graph(*args, **kwargs):  # as with a full disk: protobuf cannot read what was cut short
        calls.append(args[0])
        if len(calls) == 2:
            raise DecodeError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", fails_on_the_second_graph)
    assert main(["export", "--int8", "-o", str(tmp_path / "int8")]) == 1
    assert capsys.readouterr().err.startswith(f"captioner: error: {tmp_path / 'int8' / 'decoder_step.onnx'}: "
                                              "cannot quantize to int8: DecodeError")
    assert not (tmp_path / "int8").exists()  # no float export that would load as if it were int8


def test_sigterm_during_a_run_removes_its_temporary_export_and_says_so(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "captioner.pipelines.cli", "caption", "--backend", "onnxruntime",
               str(SAMPLES / "chelsea.png")]
    run = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("captioner-onnx-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # while it exports (about 2 s), as `timeout` or a service manager would
    out, err = run.communicate(timeout=120)
    assert (run.returncode, out, err) == (143, "", "captioner: error: terminated\n")
    assert list(tmp_path.iterdir()) == []  # 13 to 56 MB of graphs were left behind by a run ended this way


def test_flags_that_onnx_runtime_would_ignore_are_refused(exported, capsys):
    photo = str(SAMPLES / "chelsea.png")
    assert main(["caption", "--backend", "onnxruntime", "--onnx", str(exported), "--model", str(exported), photo]) == 2
    assert "--onnx names an export, which holds its own model: leave out --model" in capsys.readouterr().err
    assert main(["caption", "--backend", "onnxruntime", "--device", "cpu", photo]) == 2
    assert "--device chooses where PyTorch runs" in capsys.readouterr().err


def test_a_batch_stops_at_a_broken_export_instead_of_failing_every_photo(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "decoder_step.onnx").write_bytes((exported / "decoder_start.onnx").read_bytes())  # loads, fails on use
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS[:2]:
        shutil.copy(photo, folder)
    code = main(["batch", str(folder), "-o", str(tmp_path / "out.jsonl"), "--quiet", "--backend", "onnxruntime",
                 "--onnx", str(broken)])
    assert code == 1 and "decoder_step.onnx" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() or "error" not in (tmp_path / "out.jsonl").read_text()


def test_exporting_a_model_that_cannot_be_exported_names_its_folder(default_model, tmp_path, capsys):
    from captioner.model import ensemble

    ensemble([default_model, default_model]).save(tmp_path / "pair")
    assert main(["export", "--model", str(tmp_path / "pair"), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"captioner: error: {tmp_path / 'pair'}: ONNX export covers one "
                                              "attention decoder")
