"""Model folders: save/load round trip, and loading refuses anything but tensors and JSON."""

import copy
import dataclasses
import json
import os
import pickle
import re
import resource

import pytest
import torch
from conftest import SAMPLES
from safetensors.torch import load_file, save_file

from captioner.api import caption_images
from captioner.decoding import DecodingOptions
from captioner.errors import ModelLoadError, OptionError, OutputError
from captioner.model import CaptionModel, ModelConfig, check_new_model_folder, ensemble
from captioner.options import DecoderConfig
from captioner.vocab import Vocabulary


def test_save_load_round_trip_gives_the_same_captions(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    loaded = CaptionModel.load(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert loaded.config == small_model.config
    small_model.decoder.half().float()  # the file stores decoder weights as float16
    before = caption_images(small_model, [SAMPLES / "chelsea.png"])
    after = caption_images(loaded, [SAMPLES / "chelsea.png"])
    assert [c.text for c in after] == [c.text for c in before]
    assert after[0].score == pytest.approx(before[0].score, abs=1e-4)


def test_a_saved_model_is_as_readable_as_any_file_written_here(default_model, tmp_path):
    from captioner.outputs import new_file_mode

    default_model.save(tmp_path / "m")  # weights, config, vocabulary, consensus and calibrator
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()}
    assert len(modes) == 6 and set(modes.values()) == {oct(new_file_mode())}  # safetensors alone makes 0600


def test_a_model_in_a_folder_whose_name_is_not_utf8_saves_loads_and_captions(default_model, tmp_path):
    from captioner.outputs import new_file_mode

    folder = tmp_path / os.fsdecode(b"mod\xe8le")  # Latin-1 bytes, as an older system names it
    default_model.save(folder)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(modes) == 6 and set(modes.values()) == {new_file_mode()}
    loaded = CaptionModel.load(folder)
    assert [c.text for c in caption_images(loaded, [SAMPLES / "chelsea.png"])] == \
        [c.text for c in caption_images(default_model, [SAMPLES / "chelsea.png"])]
    assert loaded.consensus.references == default_model.consensus.references
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_a_pickle_in_place_of_safetensors_is_refused(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "wb") as f:
        pickle.dump({"decoder.out.weight": torch.zeros(1)}, f)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        CaptionModel.load(tmp_path / "m")


def test_missing_files_and_mismatched_shapes_are_clear_errors(small_model, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        CaptionModel.load(tmp_path / "nowhere")
    small_model.save(tmp_path / "m")
    Vocabulary(["a", "b"]).save(tmp_path / "m" / "vocab.json")
    with pytest.raises(ModelLoadError, match="vocabulary has 6 words"):
        CaptionModel.load(tmp_path / "m")


def test_unknown_config_fields_are_refused(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"encoder": "efficientnet_lite0", "decoder": {"bogus": 1}}')
    with pytest.raises(ModelLoadError, match="bad model config"):
        CaptionModel.load(tmp_path / "m")


def test_default_model_is_small_and_loads_without_network(default_model):
    from captioner.model import DEFAULT_MODEL_DIR

    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 64 * 2**20  # three float16 decoders of 17 MB
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").exists()
    assert default_model.config.encoder == "efficientnet_lite0"
    assert default_model.decoder.config.attention


def _sibling(model: CaptionModel, seed: int) -> CaptionModel:
    """A model shaped like ``model`` with other decoder weights (a different training seed)."""
    torch.manual_seed(seed)
    other = CaptionModel(model.config, model.vocab, pretrained_encoder=False)
    other.encoder = model.encoder
    return other.eval()


def test_an_ensemble_of_one_model_twice_captions_like_the_model(small_model):
    both = ensemble([small_model, small_model])
    options = DecodingOptions(beam_size=3, max_length=6, n_best=3)
    grid = torch.randn(4, 1280, 7, 7, generator=torch.Generator().manual_seed(0))
    alone = [c for n_best in small_model.caption_grid(grid, options) for c in n_best]
    together = [c for n_best in both.caption_grid(grid, options) for c in n_best]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.score for c in together] == pytest.approx([c.score for c in alone], abs=1e-5)
    photo = caption_images(both, [SAMPLES / "chelsea.png"])  # the full path, from pixels
    assert photo[0].text == caption_images(small_model, [SAMPLES / "chelsea.png"])[0].text


def test_ensemble_step_averages_member_probabilities(small_model):
    other = _sibling(small_model, seed=1)
    both = ensemble([small_model, other])
    grid = torch.randn(2, 1280, 7, 7)
    decoders = [both.decoder, small_model.decoder, other.decoder]
    states = [d.start(grid) for d in decoders]
    words = [small_model.vocab.start, small_model.vocab.stoi["cat"], small_model.vocab.stoi["on"]]
    with torch.no_grad():
        for word in words:  # several steps: each member must keep getting its own state back
            tokens = torch.tensor([word] * 2)
            steps = [d.step(tokens, s) for d, s in zip(decoders, states, strict=True)]
            (mixed, first, second), states = [log_probs for log_probs, _ in steps], [s for _, s in steps]
            assert mixed.exp() == pytest.approx((first.exp() + second.exp()) / 2, abs=1e-6)
            assert not torch.allclose(first, second)


def test_ensemble_teacher_forcing_gives_the_mean_distribution_of_its_steps(small_model):
    """What word-level distillation learns from: the same distribution the search would see."""
    both = ensemble([small_model, _sibling(small_model, seed=1)])
    grid = torch.randn(2, 1280, 7, 7)
    vocab = small_model.vocab
    inputs = torch.tensor([[vocab.start, vocab.stoi["cat"], vocab.stoi["on"]]] * 2)
    with torch.no_grad():
        forced = both.decoder(grid, inputs).log_softmax(dim=-1)  # (B, T, V)
        state = both.decoder.start(grid)
        for t in range(inputs.shape[1]):
            stepped, state = both.decoder.step(inputs[:, t], state)
            assert forced[:, t] == pytest.approx(stepped, abs=1e-5)


def test_scheduled_sampling_feeds_the_decoder_its_own_drawn_words_after_start(small_model):
    decoder = copy.deepcopy(small_model.decoder)
    vocab = small_model.vocab
    dog = vocab.stoi["dog"]
    with torch.no_grad():
        decoder.out.bias[vocab.end] = 200.0  # the likeliest word, but never drawn
        decoder.out.bias[dog] = 100.0  # so every draw is "dog"
    never = torch.tensor([vocab.pad, vocab.start, vocab.end])
    grid = torch.randn(3, 1280, 7, 7)
    inputs = torch.tensor([[vocab.start, vocab.stoi["cat"], vocab.stoi["on"], vocab.stoi["the"]]] * 3)
    own = inputs.clone()
    own[:, 1:] = dog
    with torch.no_grad():
        assert torch.equal(decoder(grid, inputs, 0.0, never), decoder(grid, inputs))
        assert torch.allclose(decoder(grid, inputs, 1.0, never), decoder(grid, own), atol=1e-5)
        assert not torch.allclose(decoder(grid, inputs, 1.0, never), decoder(grid, inputs), atol=1e-3)


@pytest.mark.parametrize("attention", [True, False])
def test_ensemble_save_load_round_trip(attention, tmp_path):
    vocab = Vocabulary(["a", "cat", "dog", "on", "the", "grass"])
    config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, attention, 16, 0.0),
                         DecodingOptions(beam_size=2, max_length=6))
    members = [CaptionModel(config, vocab, pretrained_encoder=False) for _ in range(2)]
    for m in members:
        m.decoder.half().float()  # the file stores decoder weights as float16
    combined = ensemble(members)
    combined.save(tmp_path / "m")
    loaded = CaptionModel.load(tmp_path / "m")
    assert loaded.config.ensemble_size == 2
    grid = torch.randn(3, 1280, 7, 7)
    assert [c[0].text for c in loaded.caption_grid(grid)] == [c[0].text for c in combined.caption_grid(grid)]
    three = ensemble([loaded, members[0]])  # an ensemble can grow by another member
    assert three.config.ensemble_size == 3


def test_ensemble_members_must_match(small_model):
    with pytest.raises(ModelLoadError, match="at least 2"):
        ensemble([small_model])
    other_vocab = Vocabulary(["a", "cat", "dog", "on", "the", "sand"])
    stranger = CaptionModel(small_model.config, other_vocab, pretrained_encoder=False)
    with pytest.raises(ModelLoadError, match="^member 2: its vocabulary differs from member 1's"):
        ensemble([small_model, stranger])
    wider = dataclasses.replace(small_model.config, decoder=dataclasses.replace(small_model.config.decoder,
                                                                                hidden_dim=32))
    with pytest.raises(ModelLoadError, match="^b: its decoder has hidden_dim=32, a's 16"):
        ensemble([small_model, CaptionModel(wider, small_model.vocab, pretrained_encoder=False)], names=["a", "b"])
    other_dropout = dataclasses.replace(small_model.config, decoder=dataclasses.replace(small_model.config.decoder,
                                                                                        dropout=0.3))
    assert ensemble([small_model, CaptionModel(other_dropout, small_model.vocab, pretrained_encoder=False)])


# --- model folders checked before anything is allocated ------------------------------------------


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture()
def saved(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["decoder"].update(embed_dim="16"), r"decoder option embed_dim='16' must be a whole number"),
        (lambda c: c["decoder"].update(vocab_size="10"), r"vocab_size='10' must be a whole number in \[5, "),
        (lambda c: c["decoder"].update(attention="false"), r"attention='false' must be true or false"),
        (lambda c: c["decoder"].update(hidden_dim=200000), r"hidden_dim=200000 must be a whole number in \[1, 8192\]"),
        (lambda c: c["decoder"].update(hidden_dim=16.0), r"hidden_dim=16.0 must be a whole number"),
        (lambda c: c["decoder"].update(dropout=1.5), r"dropout=1.5 must be a number in \[0, 1\)"),
        (lambda c: c["decoder"].update(vocab_size=4), r"vocab_size=4 must be a whole number in \[5, "),
        (lambda c: c.update(ensemble_size=1000), r"ensemble_size=1000 must be a whole number in \[1, 16\]"),
        (lambda c: c.update(ensemble_size=True), r"ensemble_size=True must be a whole number"),
        (lambda c: c.update(encoder="vgg16"), r"encoder='vgg16' must be one of efficientnet_b0, efficientnet_lite0"),
        (lambda c: c.update(encoder_weights_stored="no"), r"encoder_weights_stored='no' must be true or false"),
        (lambda c: c.update(decoder=[1, 2]), r"decoder must be a JSON object, not list"),
        (lambda c: c.update(decoding=None), r"decoding: decoding options must be an object"),
        (lambda c: c.update(extra=1), r"model config has unknown field 'extra'"),
        (lambda c: c["decoder"].pop("feature_dim"), r"decoder lacks field 'feature_dim'"),
        (lambda c: c.pop("encoder"), r"model config lacks field 'encoder'"),
    ],
)
def test_bad_config_values_name_the_file_field_and_value(saved, change, message):
    _edit_config(saved, change)
    prefix = rf"^{saved}/config.json: cannot load model: bad model config: "
    with pytest.raises(ModelLoadError, match=prefix + rf".*{message}"):
        CaptionModel.load(saved)


@pytest.mark.parametrize(
    "text, message",
    [("[1, 2]", "model config must be a JSON object, not list"), ("{oops", "not valid JSON"), ("", "not valid JSON")],
)
def test_config_that_is_not_a_json_object_is_refused(saved, text, message):
    (saved / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=rf"^{saved}/config.json: cannot load model: bad model config: {message}"):
        CaptionModel.load(saved)


def test_a_config_too_big_for_memory_is_refused_from_the_header_without_allocating(saved):
    """16 decoders of 8192 units are valid sizes but would take about 50 GB: the header check stops it first."""
    _edit_config(saved, lambda c: (c.update(ensemble_size=16), c["decoder"].update(hidden_dim=8192)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelLoadError, match=rf"^{saved}/model.safetensors: cannot load model: tensor decoder\.\S+ "):
        CaptionModel.load(saved)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # kB: no weights were allocated


@pytest.mark.parametrize("missing", ["config.json", "vocab.json", "model.safetensors"])
def test_each_missing_file_is_named(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ModelLoadError, match=rf"^{saved}/{missing}: cannot load model: file is missing$"):
        CaptionModel.load(saved)


def test_a_folder_that_is_not_there_or_a_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/nowhere: cannot load model: no such folder$"):
        CaptionModel.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/file: cannot load model: a file, not a model folder$"):
        CaptionModel.load(tmp_path / "file")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}', "vocabulary must be a JSON list of words"),
        ('["a", 3]', "vocabulary must be a JSON list of words"),
        ("not json", "vocabulary is not valid JSON"),
        ('["a", "cat", "dog", "on", "the", "a"]', "word 'a' is listed twice"),
        ('["a", "cat", "dog", "on", "the", "grass", "sand"]', r"vocabulary has 11 words .*says vocab_size=10"),
        ('["a", "b"]', r"vocabulary has 6 words \(with the 4 special tokens\), config.json says vocab_size=10"),
    ],
)
def test_a_wrong_vocabulary_is_named(saved, content, message):
    (saved / "vocab.json").write_text(content)
    with pytest.raises(ModelLoadError, match=rf"^{saved}/vocab.json: cannot load model: {message}"):
        CaptionModel.load(saved)


def _edit_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_name_the_tensor(saved, bad):
    _edit_weights(saved, lambda t: t["decoder.out.bias"].__setitem__(3, bad))
    with pytest.raises(ModelLoadError, match=r"safetensors: cannot load model: tensor decoder.out.bias holds NaN"):
        CaptionModel.load(saved)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"decoder.out.bias": torch.zeros(11, dtype=torch.float16)}),
         r"tensor decoder.out.bias has shape \[11\], the config implies \[10\]"),
        (lambda t: t.pop("decoder.lstm.weight_hh"),
         r"tensor decoder.lstm.weight_hh is missing \(the config expects it\)"),
        (lambda t: t.update({"encoder.stem.weight": torch.zeros(2)}),
         "tensor encoder.stem.weight is not part of the model the config describes"),
        (lambda t: t.update({"decoder.out.bias": torch.zeros(10, dtype=torch.int32)}),
         "tensor decoder.out.bias holds I32 values, not floating point"),
    ],
)
def test_weights_that_do_not_fit_the_config_name_the_tensor(saved, change, message):
    _edit_weights(saved, change)
    with pytest.raises(ModelLoadError, match=rf"^{saved}/model.safetensors: cannot load model: {message}$"):
        CaptionModel.load(saved)


def test_a_config_for_another_shape_is_caught_by_the_header_check(saved):
    _edit_config(saved, lambda c: c["decoder"].update(hidden_dim=32))
    with pytest.raises(ModelLoadError, match=r"tensor decoder\.\S+ has shape \[.*\], the config implies \[.*32.*\]"):
        CaptionModel.load(saved)


def test_a_truncated_weights_file_is_refused(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"^{saved}/model.safetensors: cannot load model: not a safetensors file"):
        CaptionModel.load(saved)


def test_model_config_round_trips_through_json(small_model):
    from captioner.model import DEFAULT_MODEL_DIR

    assert ModelConfig.from_json(small_model.config.to_json()) == small_model.config
    shipped = ModelConfig.from_json((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert ModelConfig.from_json(shipped.to_json()) == shipped


def test_a_config_built_in_code_is_checked_too():
    with pytest.raises(OptionError, match=r"embed_dim=0 must be a whole number in \[1, 8192\]"):
        DecoderConfig(10, 1280, embed_dim=0)
    with pytest.raises(OptionError, match=r"ensemble_size=17 must be a whole number in \[1, 16\]"):
        ModelConfig("efficientnet_lite0", DecoderConfig(10, 1280), ensemble_size=17)


# --- saving: whole or not at all, never over something else --------------------------------------


def test_save_refuses_an_existing_file_or_non_empty_folder(small_model, tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(OutputError, match=rf"^{tmp_path}/file: exists and is not a folder"):
        small_model.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    for replace in (False, True):  # replace=True replaces model folders only
        with pytest.raises(OutputError, match=rf"^{tmp_path}/full: folder is not empty"):
            small_model.save(tmp_path / "full", replace=replace)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]


def test_save_into_an_empty_folder_and_replace_a_model_folder(small_model, tmp_path):
    (tmp_path / "empty").mkdir()
    small_model.save(tmp_path / "empty")
    assert CaptionModel.load(tmp_path / "empty").config == small_model.config
    with pytest.raises(OutputError, match="folder is not empty"):
        small_model.save(tmp_path / "empty")
    other = CaptionModel(dataclasses.replace(small_model.config, decoding=DecodingOptions(beam_size=1)),
                         small_model.vocab, pretrained_encoder=False)
    other.save(tmp_path / "empty", replace=True)
    assert CaptionModel.load(tmp_path / "empty").config.decoding.beam_size == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging or old folder left behind


def test_a_failed_save_leaves_nothing_half_written(small_model, tmp_path, monkeypatch):
    import captioner.model

    def full_disk(tensors, path):
        open(path, "wb").write(b"\0" * 10)  # part of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(captioner.model, "save_tensors", full_disk)
    with pytest.raises(OutputError, match=rf"^{tmp_path}/m: cannot write model: No space left on device$"):
        small_model.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_save_target_is_checked_before_any_work(tmp_path):
    assert check_new_model_folder(tmp_path / "new" / "model") == tmp_path / "new" / "model"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=rf"^{tmp_path}/file/model: cannot write a model here: {tmp_path}/file is a "
                                          "file, not a folder$"):
        check_new_model_folder(tmp_path / "file" / "model")
    with pytest.raises(OutputError, match=rf"^{tmp_path}/file/a/model: cannot write a model here: {tmp_path}/file is a "
                                          "file, not a folder$"):  # a file further up is named too
        check_new_model_folder(tmp_path / "file" / "a" / "model")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(OutputError, match=rf"^{tmp_path}/ro/model: cannot write a model here: Permission denied"):
            check_new_model_folder(tmp_path / "ro" / "model")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_an_ensemble_of_more_than_16_decoders_is_refused(small_model):
    with pytest.raises(ModelLoadError, match="at most 16 decoders; these models hold 17"):
        ensemble([small_model] * 17)


def test_member_is_one_decoder_of_an_ensemble_as_a_model_of_its_own(small_model):
    from captioner.model import member

    sibling = _sibling(small_model, 1)
    pair = ensemble([small_model, sibling])
    second = member(pair, 1)
    assert second.config.ensemble_size == 1
    for name, tensor in sibling.decoder.state_dict().items():
        assert torch.equal(second.decoder.state_dict()[name], tensor)
    with pytest.raises(ModelLoadError, match="choose 0 to 1"):
        member(pair, 2)
    with pytest.raises(ModelLoadError, match="of an ensemble"):
        member(small_model, 0)


def test_gpu_batches_are_padded_to_a_few_shapes():
    from captioner.model import gpu_batch_shape

    counts = [1, 2, 3, 5, 17, 32, 33, 64, 65, 130, 1024]
    assert [gpu_batch_shape(n) for n in counts] == [1, 2, 4, 8, 32, 32, 64, 64, 128, 192, 1024]


@pytest.fixture(scope="module")
def headless_model_dir(tmp_path_factory):
    """A tiny model on a torchvision trunk, which keeps no classifier head (its own weights: nothing downloads)."""
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "cat", "on", "the", "grass"])
    config = ModelConfig("efficientnet_b0", DecoderConfig(len(vocab), 1280, 16, 16, True, 16, 0.0),
                         DecodingOptions(beam_size=2, max_length=6), encoder_weights_stored=True)
    folder = tmp_path_factory.mktemp("models") / "headless"
    CaptionModel(config, vocab, pretrained_encoder=False).save(folder)
    return folder


def test_options_asking_a_model_for_what_it_lacks_are_refused(small_model, default_model, headless_model_dir):
    own = small_model.config.decoding
    small_model.check_decoding(own)
    with pytest.raises(OptionError, match="consensus_weight reranks .* this model has no consensus.json"):
        small_model.check_decoding(dataclasses.replace(own, consensus_weight=1.0))
    headless = CaptionModel.load(headless_model_dir)
    with pytest.raises(OptionError, match=r"concept_boost .* this model's encoder \(efficientnet_b0\) keeps no "):
        headless.check_decoding(dataclasses.replace(headless.config.decoding, concept_boost=2.0))
    default_model.check_decoding(dataclasses.replace(default_model.config.decoding, consensus_weight=3.0,
                                                     concept_boost=1.0))  # it has both
    with pytest.raises(OptionError, match="consensus_weight"):
        caption_images(small_model, [SAMPLES / "chelsea.png"], options=dataclasses.replace(own, consensus_weight=1.0))


@pytest.mark.parametrize("flags, message", [
    (["--consensus-weight", "1"], "decoding option consensus_weight reranks"),
    (["--concept-boost", "2"], "decoding option concept_boost raises"),
    (["--tags"], r"--tags lists what the encoder's classifier sees; this model's encoder \(efficientnet_b0\)"),
])
def test_the_cli_refuses_flags_the_model_cannot_act_on(headless_model_dir, capsys, flags, message):
    from captioner.pipelines.cli import main

    assert main(["caption", "--model", str(headless_model_dir), *flags, str(SAMPLES / "chelsea.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)
