"""Consensus: a caption's agreement with the human captions of the most similar training photos."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_SAMPLES

from captioner.consensus import CONSENSUS_FILE, CONSENSUS_WEIGHTS, Consensus
from captioner.errors import ModelLoadError
from captioner.images import model_pixels
from captioner.model import DEFAULT_MODEL_DIR, CaptionModel

CAPTIONS = {
    "chelsea.png": ["a cat sits on the floor", "a tabby cat looks at the camera", "a cat with stripes"],
    "coffee.png": ["a cup of coffee on a saucer", "a coffee cup on a table", "a white cup of coffee"],
    "astronaut.png": ["a woman in an orange space suit", "an astronaut smiles for a photo", "a woman poses"],
    "rocket.jpg": ["a rocket on a launch pad", "a white rocket stands on the pad", "a rocket ready to launch"],
}


@pytest.fixture(scope="module")
def pooled(default_model):
    pixels = torch.from_numpy(np.stack([model_pixels(SHARED_SAMPLES / name, 224) for name in CAPTIONS]))
    return default_model.encode(pixels).float().mean(dim=(2, 3))


def test_a_caption_that_agrees_with_similar_photos_scores_higher(pooled, tmp_path):
    consensus = Consensus.build(pooled, list(CAPTIONS.values()), dims=3, neighbours=1)  # each photo's nearest: itself
    cat = consensus.scores(pooled[:1], [["a cat sits on the floor", "a rocket on a launch pad"]])[0]
    assert cat[0] > cat[1] >= 0
    consensus.save(tmp_path)
    again = Consensus.load(tmp_path, pooled.shape[1])
    assert again.scores(pooled[:1], [["a cat sits on the floor"]])[0][0] == pytest.approx(cat[0], rel=1e-3)


def test_the_shipped_model_reads_its_training_photos_consensus(default_model):
    consensus = default_model.consensus
    assert len(consensus.references) == 6000 and consensus.components.shape == (1280, 128)


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: (folder / CONSENSUS_FILE).write_text("{"), "bad consensus data"),
    (lambda folder: (folder / CONSENSUS_FILE).write_text(json.dumps({"references": []})), "0 reference lists"),
    (lambda folder: (folder / CONSENSUS_WEIGHTS).unlink(), "bad consensus data"),
    (lambda folder: (folder / CONSENSUS_WEIGHTS).write_bytes(b"\x00" * 40), "bad consensus data"),
])
def test_damaged_consensus_files_are_refused_naming_them(tmp_path, damage, reason):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    damage(folder)
    with pytest.raises(ModelLoadError, match=f"consensus\\.(json|safetensors): .*{reason}"):
        CaptionModel.load(folder)


def test_an_ensemble_and_its_members_keep_the_consensus_but_not_the_calibrator(tmp_path):
    from captioner.confidence import CALIBRATION_FILE
    from captioner.model import ensemble, member

    single = CaptionModel.load(DEFAULT_MODEL_DIR)
    pair = ensemble([single, single])
    assert pair.consensus is single.consensus  # reranking still has the training photos' captions
    assert pair.calibrator is None  # fitted to one decoder's captions: not carried over
    assert member(pair, 1).consensus is single.consensus
    pair.save(tmp_path / "pair")
    assert (tmp_path / "pair" / CONSENSUS_FILE).exists() and not (tmp_path / "pair" / CALIBRATION_FILE).exists()
    again = CaptionModel.load(tmp_path / "pair")
    assert again.calibrator is None and len(again.consensus.references) == 6000
    assert again.config.decoding.consensus_weight > 0


def test_scores_asked_from_threads_while_the_index_builds_in_the_background_equal_serial_scores():
    from concurrent.futures import ThreadPoolExecutor

    from captioner.api import load_model

    texts = [["a dog runs on the grass", "a man rides a bike"], ["two children play in the snow"]]
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0)).abs()
    model = load_model()  # starts building the index in a background thread
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: model.consensus.scores(pooled, texts), range(4)))
    serial = CaptionModel.load(DEFAULT_MODEL_DIR).consensus.scores(pooled, texts)  # built in this thread
    assert together == [serial] * 4
    assert len({s for row in serial for s in row}) == 3


def test_a_process_forked_while_the_index_builds_scores_without_waiting_for_ever():
    import multiprocessing
    import pickle

    from captioner.api import load_model

    model = load_model()  # the build holds the lock for a few tenths of a second
    pooled = torch.ones(1, 1280)

    def score_in_child():
        torch.set_num_threads(1)  # OpenMP's pool does not survive a fork; one thread needs none
        model.consensus.scores(pooled, [["a dog runs"]])

    child = multiprocessing.get_context("fork").Process(target=score_in_child)
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    copied = pickle.loads(pickle.dumps(model.consensus))  # the lock and the index are left behind
    assert copied.scores(pooled, [["a dog runs"]]) == model.consensus.scores(pooled, [["a dog runs"]])


@pytest.mark.parametrize("edit, reason", [
    (lambda raw: raw.update(neighbours=1e400), "neighbours=inf must be a whole number"),
    (lambda raw: raw["references"].__setitem__(5, []), "each image needs a non-empty list of reference captions"),
    (lambda raw: raw["references"][5].__setitem__(0, 7), "a reference caption is not text"),
])
def test_bad_consensus_fields_are_refused_with_the_reason(tmp_path, edit, reason):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    raw = json.loads((folder / CONSENSUS_FILE).read_text(encoding="utf-8"))
    edit(raw)
    (folder / CONSENSUS_FILE).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=f"consensus\\.json: bad consensus data: {reason}"):
        CaptionModel.load(folder)
