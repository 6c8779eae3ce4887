"""A real (tiny) training run: cached features, epochs, checkpoint, resume, metrics log, plot."""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_SAMPLES

from captioner.api import load_model
from captioner.data import read_manifest, write_manifest
from captioner.errors import CheckpointError, DataError, OptionError, OutputError
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
    train(tiny_config)
    longer = dataclasses.replace(tiny_config, epochs=3)
    train(longer, resume=True)
    epochs = [json.loads(line)["epoch"] for line in open(f"{tiny_config.out_dir}/metrics.jsonl")]
    assert epochs == [1, 2, 3]  # resumed at epoch 3, nothing repeated


@pytest.mark.slow
def test_resume_repairs_a_metrics_log_cut_short_or_ahead_of_the_checkpoint(tiny_config):
    train(tiny_config)
    log = Path(tiny_config.out_dir) / "metrics.jsonl"
    with log.open("a", encoding="utf-8") as f:
        f.write('{"epoch": 3, "phase": "xe", "train_loss": 1.0}\n{"epoch": 4, "pha')  # logged, never checkpointed
    train(dataclasses.replace(tiny_config, epochs=3), resume=True)
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]  # every line whole
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[2]["train_loss"] != 1.0


@pytest.mark.slow
def test_plain_lstm_option_trains_and_overfits_a_tiny_set(tiny_config):
    cfg = dataclasses.replace(tiny_config, attention=False, epochs=30)  # epochs sets the LR schedule
    trainer = Trainer(cfg)
    assert not hasattr(trainer.model.decoder, "att_value")
    losses = [trainer.train_epoch() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_word_dropout_and_grid_crops_are_applied_and_a_tiny_set_is_still_learned(tiny_config):
    def losses(**settings) -> list[float]:
        trainer = Trainer(dataclasses.replace(tiny_config, epochs=30, **settings))
        return [trainer.train_epoch() for _ in range(30)]

    plain = losses()
    regularized = losses(word_dropout=0.25, grid_crop=0.7)
    assert regularized[-1] < 0.6 * regularized[0]
    assert losses(word_dropout=0.25)[-1] > plain[-1]  # harder to recite: the captions' own words are partly hidden
    assert losses(grid_crop=0.5)[-1] > plain[-1]  # harder to tell the photos apart: each epoch sees another crop
    assert losses(word_dropout=0.9)[-1] > regularized[-1]


@pytest.mark.slow
def test_scheduled_sampling_ramps_from_none_to_its_most_over_the_epochs_and_a_tiny_set_is_still_learned(tiny_config):
    def run(rate: float) -> tuple[list[float], list[float]]:
        trainer = Trainer(dataclasses.replace(tiny_config, epochs=30, scheduled_sampling=rate))
        rates, losses = [], []
        for epoch in range(30):
            trainer.epoch = epoch
            rates.append(trainer._sample_rate())
            losses.append(trainer.train_epoch())
        return rates, losses

    rates, losses = run(0.25)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.25) and rates == sorted(rates)
    assert losses[-1] < 0.6 * losses[0]
    _, plain = run(0.0)
    assert losses[0] == plain[0]  # the first epoch is pure teacher forcing
    assert losses[1:] != plain[1:]  # later ones train on drawn words


def test_scheduled_sampling_and_a_teacher_are_refused_together(tiny_config):
    with pytest.raises(OptionError, match="scheduled_sampling and teacher do not go together"):
        dataclasses.replace(tiny_config, scheduled_sampling=0.1, teacher="captioner/default_model")


@pytest.mark.slow
def test_a_run_resumed_after_a_self_critical_epoch_runs_no_more_cross_entropy(tiny_config):
    """Cross-entropy stopped on patience, then a better self-critical epoch reset the stale count:
    resuming there must go on with self-critical epochs only."""
    trainer = Trainer(dataclasses.replace(tiny_config, epochs=12, patience=2, scst_epochs=2, scst_batch_images=4))
    trainer.epoch, trainer.scst_done, trainer.stale_epochs = 4, 1, 0
    trainer.fit()
    assert [r["phase"] for r in trainer.history] == ["scst"]
    assert trainer.epoch == 5 and trainer.scst_done == 2


@pytest.mark.slow
def test_self_critical_phase_follows_cross_entropy_and_raises_reward(tiny_config):
    cfg = dataclasses.replace(tiny_config, epochs=12, patience=99, scst_epochs=15, scst_lr=1e-3, scst_batch_images=4)
    trainer = Trainer(cfg)
    trainer.fit()
    phases = [r["phase"] for r in trainer.history]
    assert phases == ["xe"] * 12 + ["scst"] * 15
    rewards = [r["train_reward"] for r in trainer.history if r["phase"] == "scst"]  # mean CIDEr-D of samples
    assert max(rewards[-3:]) > rewards[0]
    assert open(f"{cfg.out_dir}/curves.png", "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_encoder_fine_tuning_updates_and_saves_the_cnn_but_keeps_its_batch_norm_statistics(tiny_config):
    cfg = dataclasses.replace(tiny_config, finetune_encoder=True, epochs=1, lr=1e-3, encoder_lr=1e-4,
                              scst_epochs=1, scst_batch_images=4, scst_lr=1e-4)
    trainer = Trainer(cfg)
    decoder_group, encoder_group = trainer.optimizer.param_groups
    assert encoder_group["initial_lr"] == pytest.approx(decoder_group["initial_lr"] / 10)
    net = trainer.model.encoder.features.net
    before = net._conv_head.weight.detach().clone()
    running_mean = net._bn1.running_mean.clone()
    trainer.fit()
    assert [r["phase"] for r in trainer.history] == ["xe", "scst"]
    assert encoder_group["lr"] == pytest.approx(1e-5)  # the self-critical phase keeps the CNN at a tenth
    after = net._conv_head.weight.detach()
    assert not torch.equal(before, after)
    assert torch.equal(net._bn1.running_mean, running_mean)  # ImageNet statistics, not a 4-image batch's
    saved = CaptionModel.load(f"{cfg.out_dir}/best")
    assert saved.config.encoder_weights_stored
    assert not torch.equal(saved.encoder.features.net._conv_head.weight, before)  # the tuned CNN, not ImageNet's
    with pytest.raises(OutputError, match="folded for inference"):  # load_model's copy has no batch norms to save
        load_model(f"{cfg.out_dir}/best").save(f"{cfg.out_dir}/copy")


# --- settings checked before any work ------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("embed_dim", "32", r"embed_dim='32' must be a whole number in \[1, 8192\]"),
        ("hidden_dim", 200000, r"hidden_dim=200000 must be a whole number in \[1, 8192\]"),
        ("attention", "false", "attention='false' must be true or false"),
        ("epochs", -1, r"epochs=-1 must be a whole number in \[0, "),
        ("epochs", 0, "epochs=0 skips cross-entropy training: it needs init_from"),
        ("average_last", 1, "average_last=1 would average one epoch with itself"),
        ("encoder_lr", 1e-4, "encoder_lr needs finetune_encoder=true: the CNN stays frozen"),
        ("batch_size", 4.0, "batch_size=4.0 must be a whole number"),
        ("dropout", float("nan"), r"dropout=nan must be a number in \[0, 1\)"),
        pytest.param("dropout", int("9" * 400), r"dropout=9{400} must be a number in \[0, 1\)",
                     id="dropout-int-no-float-holds"),
        ("lr", 0, r"lr=0 must be a number in \(0, 10\]"),
        ("scst_samples", 1, r"scst_samples=1 must be a whole number in \[2, 64\]"),
        ("encoder", "vgg16", "encoder='vgg16' must be one of"),
        ("device", "gpu9", "device='gpu9' is not a torch device"),
        ("train_manifest", "", "train_manifest='' must be a non-empty string"),
    ],
)
def test_train_config_refuses_wrong_types_and_ranges(tiny_config, field, value, message):
    with pytest.raises(OptionError, match=f"^{message}"):
        dataclasses.replace(tiny_config, **{field: value})


def test_every_train_setting_has_help_for_the_command_line():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert all("help" in f.metadata for f in fields.values())
    from captioner.encoders import ENCODERS

    assert all(name in fields["encoder"].metadata["help"] for name in ENCODERS)  # checked when built, see above


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "training config is not valid JSON"),
        ('["a"]', "training config must be a JSON object, not list"),
        ('{"train_manifest": "t", "dev_manifest": "d", "epoch": 3}', "unknown field 'epoch'"),
        ('{"train_manifest": "t", "dev_manifest": "d", "embed_dim": "512"}', "embed_dim='512' must be a whole number"),
        ('{"train_manifest": "t", "dev_manifest": "d", "attention": "false"}', "attention='false' must be true or"),
        ('{"dev_manifest": "d"}', "field 'train_manifest' is missing"),
    ],
)
def test_train_config_file_errors_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(OptionError, match=rf"^{path}: {message}"):
        TrainConfig.from_file(path)


def test_a_device_as_train_config_is_refused_not_read_forever():
    with pytest.raises(OptionError, match="^/dev/zero: not a training config: a device, not a file"):
        TrainConfig.from_file("/dev/zero")


def test_train_config_file_with_overrides(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"train_manifest": "t.jsonl", "dev_manifest": "d.jsonl", "epochs": 3}', encoding="utf-8")
    cfg = TrainConfig.from_file(path, epochs=5, lr=None)
    assert (cfg.train_manifest, cfg.epochs, cfg.lr) == ("t.jsonl", 5, 1e-3)
    with pytest.raises(OptionError, match=rf"^{tmp_path}/absent.json: cannot read training config: No such file"):
        TrainConfig.from_file(tmp_path / "absent.json")


@pytest.mark.parametrize("bad_line", ['{"image": "x.png", "captions": []}', '{"image": "x.png"}'])
def test_a_manifest_line_without_captions_stops_training_before_any_work(tiny_config, bad_line):
    manifest = Path(tiny_config.dev_manifest)
    with manifest.open("a", encoding="utf-8") as f:
        f.write(bad_line + "\n")
    with pytest.raises(DataError, match=rf"^{manifest}:5: not a manifest record \(no captions"):
        Trainer(tiny_config)
    assert not Path(tiny_config.cache_dir).exists()  # no feature was computed


def test_no_frequent_enough_word_is_a_clear_error(tiny_config):
    with pytest.raises(DataError, match="no word occurs min_word_count=1000 times"):
        Trainer(dataclasses.replace(tiny_config, min_word_count=1000))


def test_an_unwritable_output_folder_fails_at_the_start(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(OutputError, match=rf"^{out}: cannot write here: "):
            Trainer(dataclasses.replace(tiny_config, out_dir=str(out)))
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(OutputError, match="metrics.jsonl: cannot write training output here: not a writable file"):
        Trainer(tiny_config)
    assert not Path(tiny_config.cache_dir).exists()


def test_a_cuda_device_without_cuda_is_an_option_error(tiny_config):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(OptionError, match="device='cuda': CUDA is not available"):
        Trainer(dataclasses.replace(tiny_config, device="cuda"))


# --- resuming: only a checkpoint of this very run, and nothing is unpickled --------------------


@pytest.fixture()
def saved_run(tiny_config):
    """A run folder with a real last.pt (saved before any epoch: the format is what matters)."""
    Trainer(tiny_config).save_checkpoint()
    return Path(tiny_config.out_dir)


def _resume(cfg):
    trainer = Trainer(cfg, resume=True)
    trainer.load_checkpoint()
    return trainer


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused(tiny_config, saved_run):
    with pytest.raises(OutputError, match=rf"^{saved_run}: holds an earlier run; resume it"):
        Trainer(tiny_config)
    assert _resume(tiny_config).epoch == 0


def test_resume_of_a_run_whose_last_pt_is_gone_is_refused_not_started_afresh(tiny_config, saved_run):
    (saved_run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (saved_run / "last.pt").unlink()
    with pytest.raises(OutputError, match=rf"^{saved_run}: holds an earlier run but no last.pt"):
        Trainer(tiny_config, resume=True)
    assert (saved_run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_resume_into_an_empty_folder_starts_afresh(tiny_config):
    assert Trainer(tiny_config, resume=True).epoch == 0  # the first run of a script that always passes --resume


def _message(error) -> str:
    text = str(error.value)
    assert "weights_only" not in text and "\n" not in text
    assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's advice is not chained
    return text


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tiny_config, saved_run):
    last = saved_run / "last.pt"
    data = last.read_bytes()
    for size in (len(data) // 2, 5000, 100, 0):  # 5000: torch's zip reader says EINVAL
        last.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as info:
            _resume(tiny_config)
        assert _message(info) == (f"{last}: cannot resume: the file is cut short or is not a checkpoint; "
                                  "start over in another folder")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_code_from_a_tampered_checkpoint(tiny_config, saved_run, tmp_path):
    marker = tmp_path / "code-ran"
    state = torch.load(saved_run / "last.pt", weights_only=True)
    state["history"] = _RunsCode(marker)
    torch.save(state, saved_run / "last.pt")
    with pytest.raises(CheckpointError) as info:
        _resume(tiny_config)
    assert "holds objects other than tensors and plain values" in _message(info)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("optimizer"), "its entry 'optimizer' is missing or malformed"),
        (lambda s: s.update(epoch="2"), "its entry 'epoch' is missing or malformed"),
        (lambda s: s.update(history="[{"), "its config, history or vocabulary is not valid JSON"),
        (lambda s: s.update(history='[{"epoch": 1}]'), "its config or history is malformed"),
        (lambda s: s.update(config='{"encoder": "resnet50"}'),
         "it was saved with encoder='resnet50', this run has encoder='efficientnet_lite0'"),
        (lambda s: s.update(vocab='["a", "cat"]'), "it was saved with another vocabulary"),
        (lambda s: (s.pop("vocab"), s["model"].update({"decoder.out.bias": torch.zeros(3)})),
         r"tensor decoder.out.bias is \[3\], this run has \[\d+\]"),
        (lambda s: s["model"].pop("decoder.out.bias"), "tensor decoder.out.bias is missing"),
    ],
)
def test_resume_from_a_checkpoint_of_another_run_is_a_clear_error(tiny_config, saved_run, change, message):
    state = torch.load(saved_run / "last.pt", weights_only=True)
    change(state)
    torch.save(state, saved_run / "last.pt")
    with pytest.raises(CheckpointError, match=rf"^{saved_run}/last.pt: cannot resume: {message}.*; start over"):
        _resume(tiny_config)


@pytest.mark.parametrize("field, value", [("lr", 5.0), ("weight_decay", 0.5), ("seed", 99)])
def test_resume_with_a_setting_the_checkpoint_restores_is_refused(tiny_config, saved_run, field, value):
    saved = getattr(tiny_config, field)
    with pytest.raises(CheckpointError, match=rf"^{saved_run}/last.pt: cannot resume with {field}={value!r}: the run "
                                              rf"was saved with {field}={saved!r}"):
        _resume(dataclasses.replace(tiny_config, **{field: value}))
    assert _resume(tiny_config).epoch == 0


def test_more_cross_entropy_epochs_after_self_critical_ones_are_refused_not_ignored(tiny_config, saved_run):
    state = torch.load(saved_run / "last.pt", weights_only=True)
    state["scst_done"] = 1
    torch.save(state, saved_run / "last.pt")
    grown = tiny_config.epochs + 1
    with pytest.raises(CheckpointError, match=rf"^{saved_run}/last.pt: cannot resume with epochs={grown}: the run "
                                              rf"has begun its self-critical epochs.*epochs={tiny_config.epochs}"):
        _resume(dataclasses.replace(tiny_config, epochs=grown))
    assert _resume(dataclasses.replace(tiny_config, scst_epochs=2)).scst_done == 1  # more self-critical ones: fine


def test_a_run_saved_with_an_ignored_encoder_lr_still_resumes(tiny_config, saved_run):
    state = torch.load(saved_run / "last.pt", weights_only=True)
    state["config"] = json.dumps({**json.loads(state["config"]), "encoder_lr": 1e-4})  # older versions took it
    torch.save(state, saved_run / "last.pt")
    assert _resume(tiny_config).epoch == 0


def test_resume_with_another_model_shape_or_vocabulary_is_refused(tiny_config, saved_run):
    wider = dataclasses.replace(tiny_config, hidden_dim=48)
    with pytest.raises(CheckpointError, match="it was saved with hidden_dim=32, this run has hidden_dim=48"):
        _resume(wider)
    fewer_words = dataclasses.replace(tiny_config, min_word_count=2)
    with pytest.raises(CheckpointError, match=r"another vocabulary \(\d+ words, this run has \d+\)"):
        _resume(fewer_words)


@pytest.mark.slow
def test_checkpoint_averaging_scores_the_mean_of_the_last_epochs(tiny_config):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(tiny_config, epochs=3, average_last=2)
    trainer = Trainer(cfg)
    trainer.fit()
    assert [r["phase"] for r in trainer.history] == ["xe", "xe", "xe", "average"]
    assert trainer.history[-1]["averaged"] == [2, 3]
    snapshots = sorted(p.name for p in (Path(cfg.out_dir) / "epochs").iterdir())
    assert snapshots == ["epoch-2.safetensors", "epoch-3.safetensors"]
    two, three = (load_file(Path(cfg.out_dir) / "epochs" / name) for name in snapshots)
    averaged = CaptionModel.load(Path(cfg.out_dir) / "averaged").decoder.state_dict()
    for name in ("out.weight", "lstm.weight_hh"):  # saved as float16: compare at that precision
        assert torch.allclose(averaged[name], (two[name] + three[name]) / 2, atol=2e-3)
    assert not torch.equal(two["out.weight"], three["out.weight"])


@pytest.mark.slow
def test_init_from_continues_a_trained_decoder_with_its_vocabulary(tiny_config, tmp_path):
    first = dataclasses.replace(tiny_config, epochs=1)
    train(first)
    start = CaptionModel.load(Path(first.out_dir) / "best")
    manifest = tmp_path / "other.jsonl"  # other captions: a vocabulary built from them would differ
    write_manifest(manifest, [(str(SHARED_SAMPLES / "chelsea.png"), ["a cat sits on the floor"])])
    cfg = dataclasses.replace(tiny_config, train_manifest=str(manifest), out_dir=str(tmp_path / "fine"), epochs=1,
                              init_from=str(Path(first.out_dir) / "best"))
    trainer = Trainer(cfg)
    assert trainer.vocab.itos == start.vocab.itos
    for name, tensor in start.decoder.state_dict().items():
        assert torch.equal(trainer.model.decoder.state_dict()[name], tensor)
    with pytest.raises(OptionError, match=r"^init_from=.*: its model is shaped otherwise: hidden_dim 32 \(here 16\)$"):
        Trainer(dataclasses.replace(cfg, hidden_dim=16, out_dir=str(tmp_path / "other")))
    assert Trainer(dataclasses.replace(cfg, dropout=0.3, out_dir=str(tmp_path / "drop"))).model.config.decoder.dropout \
        == 0.3  # not a shape: a run from init_from may regularize otherwise


def test_init_from_a_fine_tuned_encoder_needs_fine_tuning_on(tiny_config, tmp_path):
    tuned = dataclasses.replace(tiny_config, epochs=1, finetune_encoder=True)
    train(tuned)
    cfg = dataclasses.replace(tiny_config, out_dir=str(tmp_path / "next"), init_from=str(Path(tuned.out_dir) / "best"))
    with pytest.raises(OptionError, match="has a fine-tuned encoder; continue with finetune_encoder on"):
        Trainer(cfg)
    assert Trainer(dataclasses.replace(cfg, finetune_encoder=True)).model.config.encoder_weights_stored


def _stopped_in_epoch(cfg, monkeypatch, epoch, where="_log"):
    """Train ``cfg`` as if killed in ``where`` at the end of ``epoch``."""
    original = getattr(Trainer, where)

    def stop(self, *args, **kwargs):
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, where, stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)


@pytest.mark.slow
def test_a_run_stopped_after_an_epochs_checkpoint_resumes_as_if_never_stopped(tiny_config, tmp_path, monkeypatch):
    whole = dataclasses.replace(tiny_config, out_dir=str(tmp_path / "whole"), epochs=3)
    train(whole)
    cut = dataclasses.replace(whole, out_dir=str(tmp_path / "cut"))
    _stopped_in_epoch(cut, monkeypatch, 2)  # checkpoint written; the log line and best/ of epoch 2 maybe not
    train(cut, resume=True)
    logs = [[json.loads(line) for line in open(Path(run.out_dir) / "metrics.jsonl")] for run in (whole, cut)]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs, strict=True):  # Python's random state resumes too: the same batches, the same losses
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    best = max(logs[1], key=lambda r: r["CIDEr-D"])
    snapshot = torch.load(Path(cut.out_dir) / "last.pt", weights_only=True) if best["epoch"] == 3 else None
    kept = CaptionModel.load(Path(cut.out_dir) / "best").decoder.state_dict()
    if snapshot is not None:
        assert all(torch.equal(kept[k].float(), v.float()) for k, v in _decoder_state(snapshot).items())


def _decoder_state(checkpoint) -> dict:
    return {k.removeprefix("decoder."): v for k, v in checkpoint["model"].items() if k.startswith("decoder.")}


@pytest.mark.slow
def test_best_is_written_again_when_a_run_stopped_before_or_while_writing_it(tiny_config, monkeypatch):
    _stopped_in_epoch(tiny_config, monkeypatch, 1, where="_finish_epoch")  # epoch 1 is always the best so far
    best = Path(tiny_config.out_dir) / "best"
    assert (Path(tiny_config.out_dir) / "last.pt").exists() and not best.exists()
    for name in (".best.0123abcd.old", ".best.89abcdef.tmp", ".best-kept"):  # as a kill mid-replacement leaves
        (Path(tiny_config.out_dir) / name).mkdir()
    train(tiny_config, resume=True)
    assert sorted(p.name for p in Path(tiny_config.out_dir).glob(".best*")) == [".best-kept"]
    checkpoint = torch.load(Path(tiny_config.out_dir) / "last.pt", weights_only=True)
    lines = [json.loads(line) for line in open(Path(tiny_config.out_dir) / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    kept = CaptionModel.load(best).decoder.state_dict()
    if max(lines, key=lambda r: r["CIDEr-D"])["epoch"] == 2:
        assert all(torch.equal(kept[k].float(), v.float()) for k, v in _decoder_state(checkpoint).items())
    else:  # epoch 1's weights, rewritten from its checkpoint on resuming
        assert kept.keys() == _decoder_state(checkpoint).keys()


@pytest.mark.slow
def test_checkpoint_averaging_leaves_the_last_epochs_weights_to_resume_from_and_averages_again(tiny_config):
    cfg = dataclasses.replace(tiny_config, epochs=3, average_last=2)
    train(cfg)
    out = Path(cfg.out_dir)
    from safetensors.torch import load_file

    last_epoch = load_file(out / "epochs" / "epoch-3.safetensors")
    resumable = _decoder_state(torch.load(out / "last.pt", weights_only=True))
    assert all(torch.equal(resumable[k].float(), v) for k, v in last_epoch.items())
    train(dataclasses.replace(cfg, epochs=4), resume=True)
    phases = [(r["epoch"], r["phase"]) for r in map(json.loads, open(out / "metrics.jsonl"))]
    assert phases == [(1, "xe"), (2, "xe"), (3, "xe"), (3, "average"), (4, "xe"), (4, "average")]


@contextlib.contextmanager
def locked_by_another_process(out: Path):
    """``out`` made and locked by another process (a training run's lock), until the block ends."""
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from captioner.train import lock_run_folder; lock_run_folder(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_training_into_the_same_folder_is_refused(tiny_config):
    out = Path(tiny_config.out_dir)
    with locked_by_another_process(out):
        with pytest.raises(OutputError, match=rf"^{out}: another training run is writing to this folder"):
            Trainer(tiny_config)
    assert Trainer(tiny_config).epoch == 0  # a killed run leaves no lock behind


def test_a_run_refused_by_anothers_lock_leaves_that_lock_in_place(tiny_config):
    out = Path(tiny_config.out_dir)
    with locked_by_another_process(out):
        for _ in range(2):  # the second try meets the same lock: the first left it in place
            with pytest.raises(OutputError, match=rf"^{out}: another training run is writing to this folder"):
                train(tiny_config)
        assert (out / ".lock").exists()


def test_a_lock_file_removed_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch):
    import captioner.train as training

    out = tmp_path / "run"
    out.mkdir()
    real, calls = fcntl.lockf, []

    def removed_first(fd, operation):
        if not calls:  # a run that failed to start tidies its lock away between this run's open and lock
            (out / ".lock").unlink()
        calls.append(fd)
        return real(fd, operation)

    monkeypatch.setattr(training.fcntl, "lockf", removed_first)
    training.lock_run_folder(out)
    try:
        assert len(calls) == 2 and (out / ".lock").exists()
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from captioner.train import lock_run_folder; lock_run_folder(Path(sys.argv[1]))",
                                str(out)], capture_output=True, text=True)
        assert "another training run is writing to this folder" in other.stderr
    finally:
        training.unlock_run_folder(out)


def test_a_dev_set_that_cider_cannot_score_is_refused_at_the_start(tiny_config, tmp_path):
    entries = read_manifest(tiny_config.dev_manifest)
    one = tmp_path / "one.jsonl"
    write_manifest(one, [(str(entries[0].image), entries[0].captions)])
    with pytest.raises(DataError, match=rf"^{one}: 1 image; CIDEr-D .* needs at least 2"):
        train(dataclasses.replace(tiny_config, dev_manifest=str(one)))
    with pytest.raises(DataError, match="1 image; CIDEr-D"):
        train(dataclasses.replace(tiny_config, dev_limit=1))
    wordless = tmp_path / "wordless.jsonl"  # a letter to Python, nothing to the scorer's tokenizer
    write_manifest(wordless, [(str(e.image), e.captions) for e in entries[:2]] + [(str(entries[2].image), ["ⅷ"])])
    with pytest.raises(DataError, match=rf"^{wordless}: {entries[2].image}: its reference captions have no word"):
        train(dataclasses.replace(tiny_config, dev_manifest=str(wordless)))
    assert not Path(tiny_config.out_dir).exists()  # refused before any output


def test_averaging_outputs_that_cannot_be_written_are_refused_at_the_start(tiny_config):
    out = Path(tiny_config.out_dir)
    out.mkdir(parents=True)
    (out / "epochs").write_text("not a folder")
    averaging = dataclasses.replace(tiny_config, average_last=2)
    with pytest.raises(OutputError, match=rf"^{out}/epochs: cannot keep epoch snapshots here: not a writable folder"):
        Trainer(averaging)
    (out / "epochs").unlink()
    (out / "averaged").write_text("not a folder")
    with pytest.raises(OutputError, match=rf"^{out}/averaged: exists and is not a folder"):
        Trainer(averaging)
    assert Trainer(tiny_config).epoch == 0  # without averaging neither name is used
    (out / "averaged").unlink()
    elsewhere = out.parent / "snapshots"  # a link to a folder on another disk, say
    elsewhere.mkdir()
    (out / "epochs").symlink_to(elsewhere)
    assert Trainer(averaging).epoch == 0
    (out / "epochs").unlink()
    (out / "epochs").symlink_to(out.parent / "gone")
    with pytest.raises(OutputError, match="epochs: cannot keep epoch snapshots here: not a writable folder"):
        Trainer(averaging)


def test_a_full_disk_is_named_as_such_when_the_checkpoint_is_written(tiny_config):
    trainer = Trainer(tiny_config)
    (trainer.out / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(OutputError, match=rf"^{trainer.out}/last.pt: cannot write checkpoint: No space left on"):
        trainer.save_checkpoint()
    assert not (trainer.out / "last.pt").exists() and not os.path.lexists(trainer.out / "last.pt.tmp")


@pytest.mark.slow
def test_self_critical_training_alone_starts_from_init_from_and_keeps_it_unless_beaten(tiny_config, tmp_path):
    first = dataclasses.replace(tiny_config, epochs=6)
    train(first)
    start = CaptionModel.load(Path(first.out_dir) / "best")
    cfg = dataclasses.replace(tiny_config, out_dir=str(tmp_path / "scst"), epochs=0,
                              init_from=str(Path(first.out_dir) / "best"), scst_epochs=3, scst_lr=1e-3,
                              scst_batch_images=4)
    trainer = Trainer(cfg)
    best = trainer.fit()
    assert [r["phase"] for r in trainer.history] == ["start", "scst", "scst", "scst"]
    first_best = max(json.loads(line)["CIDEr-D"] for line in open(Path(first.out_dir) / "metrics.jsonl"))
    assert trainer.history[0]["CIDEr-D"] == pytest.approx(first_best, abs=1e-6)  # the starting model, scored
    assert best["CIDEr-D"] == max(r["CIDEr-D"] for r in trainer.history)
    kept = CaptionModel.load(Path(cfg.out_dir) / "best").decoder.state_dict()
    changed = any(not torch.equal(kept[k], v) for k, v in start.decoder.state_dict().items())
    assert changed == (best["phase"] == "scst")  # the start stays the best unless an SCST epoch beat it
    with pytest.raises(OptionError, match="epochs=0 .* needs init_from"):
        dataclasses.replace(cfg, scst_epochs=0)


def _started_self_critical_run(tiny_config, tmp_path) -> TrainConfig:
    """A self-critical-only run (epochs 0) from a 2-epoch run's best, stopped once its start is scored."""
    first = dataclasses.replace(tiny_config, epochs=2)
    train(first)
    cfg = dataclasses.replace(tiny_config, out_dir=str(tmp_path / "scst"), epochs=0,
                              init_from=str(Path(first.out_dir) / "best"), scst_epochs=1, scst_batch_images=4)
    Trainer(cfg)._start_scst()
    return cfg


@pytest.mark.slow
def test_self_critical_training_alone_resumed_in_its_first_epoch_scores_the_start_once(tiny_config, tmp_path):
    cfg = _started_self_critical_run(tiny_config, tmp_path)  # the process dies inside the first self-critical epoch
    train(cfg, resume=True)
    phases = [json.loads(line)["phase"] for line in open(Path(cfg.out_dir) / "metrics.jsonl")]
    assert phases == ["start", "scst"]


@pytest.mark.slow
def test_self_critical_training_alone_stopped_right_after_its_start_checkpoint_resumes(tiny_config, tmp_path):
    """Stopped after the start's checkpoint, before its best/ and log line (the order every epoch keeps)."""
    import shutil

    cfg = _started_self_critical_run(tiny_config, tmp_path)
    shutil.rmtree(Path(cfg.out_dir) / "best")
    (Path(cfg.out_dir) / "metrics.jsonl").unlink()
    train(cfg, resume=True)
    phases = [json.loads(line)["phase"] for line in open(Path(cfg.out_dir) / "metrics.jsonl")]
    assert phases == ["start", "scst"] and CaptionModel.load(Path(cfg.out_dir) / "best").vocab


@pytest.mark.parametrize("field, value, message", [
    ("scst_lr", 5.0, "cannot resume with scst_lr=5.0: the run has begun its self-critical epochs"),
    ("dev_beam_size", 1, "cannot resume: it chose its best epoch at dev_beam_size=3"),
])
def test_resume_refuses_settings_that_would_not_act_or_would_not_compare(tiny_config, saved_run, field, value,
                                                                         message):
    state = torch.load(saved_run / "last.pt", weights_only=True)
    state["scst_done"] = 1
    torch.save(state, saved_run / "last.pt")
    with pytest.raises(CheckpointError, match=rf"^{saved_run}/last.pt: {message}"):
        _resume(dataclasses.replace(tiny_config, **{field: value}))


@pytest.mark.slow
def test_word_level_distillation_moves_the_student_towards_the_teacher(tiny_config, tmp_path):
    teacher_run = dataclasses.replace(tiny_config, epochs=3)
    train(teacher_run)
    teacher_dir = str(Path(teacher_run.out_dir) / "best")
    teacher = CaptionModel.load(teacher_dir)

    def distance_to_teacher(cfg: TrainConfig) -> float:
        trainer = Trainer(cfg)
        trainer.fit()
        student = trainer.model.eval()
        grid = trainer.train_grids[0]
        tokens = torch.tensor([trainer.pairs[i][1][:4] for i in range(len(trainer.pairs))
                               if len(trainer.pairs[i][1]) >= 4])
        images = [trainer.pairs[i][0] for i in range(len(trainer.pairs)) if len(trainer.pairs[i][1]) >= 4]
        with torch.no_grad():
            s = student.decoder(grid[images], tokens).log_softmax(-1)
            t = teacher.decoder(grid[images], tokens).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    common = dict(epochs=2, seed=1, teacher=teacher_dir)
    plain = distance_to_teacher(dataclasses.replace(tiny_config, out_dir=str(tmp_path / "plain"),
                                                    **common, distill_weight=0.0))
    distilled = distance_to_teacher(dataclasses.replace(tiny_config, out_dir=str(tmp_path / "kd"),
                                                        **common, distill_weight=1.0))
    assert distilled < 0.7 * plain  # measured 0.021 against 0.040


def test_a_teacher_with_another_encoder_or_vocabulary_is_refused(tiny_config, small_model, tmp_path):
    small_model.save(tmp_path / "teacher")
    with pytest.raises(OptionError, match="teacher=.*its encoder is efficientnet_lite0, this run's is resnet50"):
        Trainer(dataclasses.replace(tiny_config, teacher=str(tmp_path / "teacher"), encoder="resnet50"))
    stranger = dataclasses.replace(tiny_config, epochs=1, out_dir=str(tmp_path / "first"))
    train(stranger)  # its vocabulary is the tiny captions', not the small model's six words
    with pytest.raises(OptionError, match="teacher=.*vocabulary differs from init_from"):
        Trainer(dataclasses.replace(tiny_config, teacher=str(tmp_path / "teacher"),
                                    init_from=str(tmp_path / "first" / "best"), out_dir=str(tmp_path / "second")))


def test_a_decoder_too_large_for_this_machine_is_refused_before_allocating(tiny_config):
    huge = dataclasses.replace(tiny_config, embed_dim=8192, hidden_dim=8192, attention_dim=8192)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > 64 * 2**30:
        pytest.skip("this machine could train it")
    with pytest.raises(OptionError, match="M parameters needs about .* GB to train"):
        Trainer(huge)


def test_a_missing_dev_photo_is_named_before_any_training_feature_is_cached(tiny_config, tmp_path):
    from captioner.errors import ImageReadError

    dev = tmp_path / "dev.jsonl"
    write_manifest(dev, [(str(SHARED_SAMPLES / "chelsea.png"), ["a cat"]), (str(tmp_path / "gone.jpg"), ["a cat"])])
    with pytest.raises(ImageReadError, match=rf"^{tmp_path}/gone\.jpg: No such file"):
        Trainer(dataclasses.replace(tiny_config, dev_manifest=str(dev)))
    new, given = tmp_path / "new-run", tmp_path / "given"
    given.mkdir()
    for out in (new, given):
        with pytest.raises(ImageReadError):
            train(dataclasses.replace(tiny_config, dev_manifest=str(dev), out_dir=str(out)))
    assert not new.exists() and given.is_dir() and not any(given.iterdir())  # made by the run: removed; given: kept
    cache = Path(tiny_config.cache_dir)
    assert not cache.exists() or not any(cache.iterdir())  # the training photos' features were not cached first


def test_resume_on_another_dev_set_is_refused_and_on_a_moved_copy_of_it_goes_on(tiny_config, tmp_path):
    train(tiny_config)
    entries = read_manifest(tiny_config.dev_manifest)
    moved = tmp_path / "moved"
    moved.mkdir()
    for entry in entries:
        shutil.copy(entry.image, moved / entry.image.name)
    same = tmp_path / "same.jsonl"
    write_manifest(same, [(str(moved / e.image.name), list(e.captions)) for e in entries])
    other = tmp_path / "other.jsonl"
    write_manifest(other, [(str(e.image), [*e.captions[:-1], "another caption"]) for e in entries])
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot resume: it chose its best epoch on another dev set "
                                              r"\(4 photos; this run's has 4\)"):
        train(dataclasses.replace(tiny_config, dev_manifest=str(other), epochs=3), resume=True)
    lines = train(dataclasses.replace(tiny_config, dev_manifest=str(same), epochs=3), resume=True)
    assert lines["epoch"] in (1, 2, 3)
    assert [json.loads(line)["epoch"] for line in open(Path(tiny_config.out_dir) / "metrics.jsonl")] == [1, 2, 3]
