"""A real (tiny) training run: cached features, epochs, checkpoint, resume, metrics log, plot."""

import json

import pytest
import torch
from conftest import SHARED_SAMPLES

from captioner.data import write_manifest
from captioner.model import CaptionModel
from captioner.train import TrainConfig, Trainer, train

CAPTIONS = {
    "chelsea.png": ["a cat sits on the floor", "a tabby cat looks at the camera", "a cat with stripes"],
    "coffee.png": ["a cup of coffee on a saucer", "a coffee cup on a table", "a white cup of coffee"],
    "astronaut.png": ["a woman in an orange space suit", "an astronaut smiles for a photo", "a woman poses"],
    "rocket.jpg": ["a rocket on a launch pad", "a white rocket stands on the pad", "a rocket ready to launch"],
}


@pytest.fixture()
def tiny_config(tmp_path):
    manifest = tmp_path / "tiny.jsonl"
    write_manifest(manifest, [(str(SHARED_SAMPLES / name), caps) for name, caps in CAPTIONS.items()])
    return TrainConfig(
        train_manifest=str(manifest), dev_manifest=str(manifest), out_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), min_word_count=1, embed_dim=32, hidden_dim=32, attention_dim=32,
        dropout=0.0, epochs=2, batch_size=4, lr=3e-3, warmup_steps=1, label_smoothing=0.0, patience=5,
        num_workers=0,
    )


@pytest.mark.slow
def test_training_writes_checkpoints_logs_plot_and_a_loadable_best_model(tiny_config):
    best = train(tiny_config)
    out = tiny_config.out_dir
    lines = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    assert {"BLEU-4", "CIDEr-D", "train_loss"} <= set(best)
    assert open(f"{out}/curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    state = torch.load(f"{out}/last.pt", weights_only=True)  # no pickled objects inside
    assert state["epoch"] == 2
    model = CaptionModel.load(f"{out}/best")
    assert model.config.decoder.hidden_dim == 32


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(tiny_config):
    import dataclasses

    train(tiny_config)
    longer = dataclasses.replace(tiny_config, epochs=3)
    train(longer, resume=True)
    epochs = [json.loads(line)["epoch"] for line in open(f"{tiny_config.out_dir}/metrics.jsonl")]
    assert epochs == [1, 2, 3]  # resumed at epoch 3, nothing repeated


@pytest.mark.slow
def test_plain_lstm_option_trains_and_overfits_a_tiny_set(tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, attention=False, epochs=30)  # epochs sets the LR schedule
    trainer = Trainer(cfg)
    assert not hasattr(trainer.model.decoder, "att_value")
    losses = [trainer.train_epoch() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_self_critical_phase_follows_cross_entropy_and_raises_reward(tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, epochs=12, patience=99, scst_epochs=15, scst_lr=1e-3, scst_batch_images=4)
    trainer = Trainer(cfg)
    trainer.fit()
    phases = [r["phase"] for r in trainer.history]
    assert phases == ["xe"] * 12 + ["scst"] * 15
    rewards = [r["train_reward"] for r in trainer.history if r["phase"] == "scst"]  # mean CIDEr-D of samples
    assert max(rewards[-3:]) > rewards[0]
    assert open(f"{cfg.out_dir}/curves.png", "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_encoder_fine_tuning_updates_and_saves_the_cnn(tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, finetune_encoder=True, epochs=1, lr=1e-3)
    trainer = Trainer(cfg)
    before = trainer.model.encoder.features.net._conv_head.weight.detach().clone()
    trainer.fit()
    after = trainer.model.encoder.features.net._conv_head.weight.detach()
    assert not torch.equal(before, after)
    saved = CaptionModel.load(f"{cfg.out_dir}/best")
    assert saved.config.encoder_weights_stored
    assert torch.allclose(saved.encoder.features.net._conv_head.weight, after)
