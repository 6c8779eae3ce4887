"""Training under torchrun: 2 CPU processes (gloo) take the same steps as 1 process with the same global batch,
and the self-critical phase keeps them in step."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_train import tiny_config  # noqa: F401 (the fixture)

from captioner.distributed import ProcessGroup, join
from captioner.errors import OptionError
from captioner.train import Trainer


def run_torchrun(config: dict, path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "captioner.pipelines.cli", "train", "--config", str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(out_dir) -> list[float]:
    return [json.loads(line)["train_loss"] for line in open(f"{out_dir}/metrics.jsonl")]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_config, tmp_path):  # noqa: F811
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    config.update(epochs=3, batch_size=4, patience=10)
    one = run_torchrun({**config, "out_dir": str(tmp_path / "one")}, tmp_path / "one.json", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun({**config, "out_dir": str(tmp_path / "two")}, tmp_path / "two.json", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    alone, together = losses(tmp_path / "one"), losses(tmp_path / "two")
    print("1 process:", alone, "2 processes:", together)
    assert len(together) == 3  # rank 0 alone logs
    assert two.stdout.count('"epoch"') == one.stdout.count('"epoch"')  # and prints: the result once, not per rank
    assert together == pytest.approx(alone, rel=1e-4)
    assert alone[-1] < alone[0]  # it learned: the match is not two untrained copies agreeing
    assert (tmp_path / "two" / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_too_few_captions_for_the_processes_is_one_line_not_a_crash(tiny_config, tmp_path):  # noqa: F811
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    first = open(tiny_config.train_manifest).readline()
    entry = json.loads(first)
    (tmp_path / "one.jsonl").write_text(json.dumps({**entry, "captions": entry["captions"][:1]}) + "\n")
    config.update(epochs=1, batch_size=2, out_dir=str(tmp_path / "run"), train_manifest=str(tmp_path / "one.jsonl"))
    done = run_torchrun(config, tmp_path / "c.json", 2)
    assert done.returncode != 0 and "1 caption cannot give each of the 2 processes one item" in done.stderr
    assert "ZeroDivisionError" not in done.stderr


@pytest.mark.slow
def test_a_distributed_run_resumes_from_its_checkpoint(tiny_config, tmp_path):  # noqa: F811
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    config.update(epochs=1, batch_size=4, patience=10, out_dir=str(tmp_path / "run"))
    assert run_torchrun(config, tmp_path / "a.json", 2).returncode == 0
    resumed = run_torchrun({**config, "epochs": 2}, tmp_path / "b.json", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-8000:]  # the ranks' own lines come before torchrun's summary
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_the_self_critical_phase_runs_on_two_processes_that_stay_in_step(tiny_config, tmp_path):  # noqa: F811
    """Each process samples for half of every batch; the trainer itself checks after each epoch
    that both decoders are still the same, and fails the run otherwise."""
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    config.update(epochs=2, batch_size=4, patience=10, scst_epochs=2, scst_batch_images=4, scst_lr=1e-3,
                  out_dir=str(tmp_path / "run"))
    done = run_torchrun(config, tmp_path / "c.json", 2)
    assert done.returncode == 0, done.stderr[-8000:]  # the ranks' own lines come before torchrun's summary
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["phase"] for r in records] == ["xe", "xe", "scst", "scst"]  # rank 0 alone logs
    assert all(0 <= r["train_reward"] for r in records[2:])
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def _two_ranks(rank: int, init: str, folder: str, results) -> None:
    """Rank ``rank`` of a real 2-process gloo group: each collective of ProcessGroup, checked."""
    import types
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from captioner.train import _checkpoint_everywhere

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = ProcessGroup(rank, rank, 2)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    torch.nn.init.constant_(module[0].weight, float(rank))
    differed = not group.same_everywhere(module)
    group.broadcast(module)
    module[0].weight.grad = torch.full_like(module[0].weight, rank + 1.0)
    if rank == 1:
        module[0].bias.grad = torch.full_like(module[0].bias, 5.0)  # rank 0 has none: it joins as zeros
    group.sum_gradients(module)  # module[1] has no gradient anywhere: it stays without one
    out = Path(folder) / f"machine-{rank}"
    out.mkdir()
    if rank == 0:
        (out / "last.pt").write_bytes(b"")
    try:
        _checkpoint_everywhere(types.SimpleNamespace(out=out, group=group))
        resume = "no error"
    except OptionError as e:
        resume = str(e)
    results.put((rank, differed, group.same_everywhere(module), module[0].weight.sum().item(),
                 module[0].weight.grad.unique().tolist(), module[0].bias.grad.unique().tolist(),
                 module[1].weight.grad is None, resume))
    dist.destroy_process_group()


def test_group_collectives_add_gradients_and_copy_rank_0s_weights(tmp_path):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [context.Process(target=_two_ranks, args=(rank, init, str(tmp_path), results)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    outcomes = sorted(results.get(timeout=10) for _ in processes)
    assert [outcome[0] for outcome in outcomes] == [0, 1]
    for _, differed, same, weight_sum, gradients, bias_gradients, untouched, resume in outcomes:
        assert differed  # 0.0 against 1.0 everywhere
        assert same and weight_sum == 0.0  # rank 0's weights, on both
        assert gradients == [3.0]  # 1 + 2
        assert bias_gradients == [5.0]  # a gradient one process lacks joins the sum as zeros
        assert untouched  # and one that no process has stays None, as in one process
        assert "found the checkpoint on 1 of 2 processes" in resume  # both refuse, neither runs out of step


def test_without_torchrun_the_group_is_this_process_alone(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    group = join("cpu")
    assert group == ProcessGroup() and group.leader and not group.distributed
    assert group.share({"CIDEr-D": 0.5}) == {"CIDEr-D": 0.5}


def _as_rank_1_of_2(monkeypatch) -> None:
    """This process as rank 1 of 2 whose other process was given the same settings (no real group)."""
    monkeypatch.setattr("captioner.train.join", lambda device: ProcessGroup(rank=1, local_rank=1, world=2))
    monkeypatch.setattr(ProcessGroup, "gather", lambda self, value: [value] * self.world)
    monkeypatch.setattr(ProcessGroup, "share", lambda self, value: value)  # the leader found nothing to refuse


def test_a_phase_too_small_for_the_processes_is_refused_before_any_work(tiny_config, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    from captioner.errors import DataError

    _as_rank_1_of_2(monkeypatch)
    entry = json.loads(open(tiny_config.train_manifest).readline())
    (tmp_path / "one.jsonl").write_text(json.dumps(entry) + "\n")  # one image, its captions
    one_image = dataclasses.replace(tiny_config, train_manifest=str(tmp_path / "one.jsonl"), min_word_count=1,
                                    batch_size=2, scst_epochs=1, scst_batch_images=2)
    with pytest.raises(DataError, match="1 image cannot give each of the 2 processes one item"):
        Trainer(one_image)  # not after a whole cross-entropy phase


def test_phases_that_cannot_run_data_parallel_are_refused_at_start(tiny_config, monkeypatch):  # noqa: F811
    _as_rank_1_of_2(monkeypatch)
    with pytest.raises(OptionError, match="under torchrun.*finetune_encoder false"):
        Trainer(dataclasses.replace(tiny_config, finetune_encoder=True))
    with pytest.raises(OptionError, match="scst_batch_images=1 is the global batch"):
        Trainer(dataclasses.replace(tiny_config, scst_epochs=1, scst_batch_images=1))
    with pytest.raises(OptionError, match="batch_size=1 is the global batch"):
        Trainer(dataclasses.replace(tiny_config, batch_size=1))


def _ranks_of_one_run(rank: int, init: str, lr: float, results) -> None:
    """Rank ``rank`` of a real 2-process gloo group: the settings check, then a peer that goes away."""
    import torch.distributed as dist

    from captioner.train import TrainConfig, TrainingStopped, _check_same_settings, _peers_watched

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = ProcessGroup(rank, rank, 2)
    config = TrainConfig(train_manifest="t.jsonl", dev_manifest="d.jsonl", out_dir=f"machine-{rank}", lr=lr,
                         cache_dir=f"/cache/{rank}")  # paths may differ per machine
    try:
        _check_same_settings(config, group)
        outcome = "same"
    except OptionError as e:
        outcome = str(e)
    if rank == 1:
        os._exit(0)  # as a process killed, or stopped by its own error
    try:
        with _peers_watched():
            group.barrier()
            group.barrier()
        stopped = "nothing"
    except TrainingStopped as e:
        stopped = str(e)
    results.put((outcome, stopped))


@pytest.mark.parametrize("rates", [(1e-3, 1e-3), (1e-3, 1e-2)])
def test_settings_that_differ_between_processes_are_refused_alike_and_a_lost_peer_is_one_line(tmp_path, rates):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [context.Process(target=_ranks_of_one_run, args=(rank, init, rates[rank], results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcome, stopped = results.get(timeout=120)  # rank 0's
    for process in processes:
        process.join(timeout=120)
    if rates[0] == rates[1]:
        assert outcome == "same"
    else:
        assert outcome == ("the processes of this run were given different settings (lr: 0.001 on rank 0, 0.01 on "
                           "rank 1); give every process the same")
    assert stopped.startswith("another process of this training run stopped (its own message says why)")


def test_a_process_started_by_hand_without_a_rendezvous_is_told_to_use_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    from captioner.errors import CaptionerError

    message = r"^cannot join the training processes that RANK=0 and WORLD_SIZE=2 describe \(.*MASTER_ADDR.*\); start"
    with pytest.raises(CaptionerError, match=message + " them with torchrun"):
        join("cpu")


def test_a_follower_that_cannot_start_leaves_the_run_folder_to_the_leader(tiny_config, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    from captioner.errors import DataError
    from captioner.train import train

    _as_rank_1_of_2(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError):
        train(dataclasses.replace(tiny_config, train_manifest=str(tmp_path / "missing.jsonl")))
    assert Path(tiny_config.out_dir).is_dir()  # the leader locks it, and tidies it if the run cannot start


@pytest.mark.slow
def test_a_distributed_run_resumed_continues_as_if_it_had_not_stopped(tiny_config, tmp_path):  # noqa: F811
    """Each process's own random stream (its self-critical samples) is where it was."""
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    config.update(epochs=1, batch_size=4, patience=10, scst_batch_images=4, scst_lr=1e-3, scst_samples=2)
    whole = run_torchrun({**config, "scst_epochs": 2, "out_dir": str(tmp_path / "whole")}, tmp_path / "w.json", 2)
    assert whole.returncode == 0, whole.stderr[-4000:]
    first = run_torchrun({**config, "scst_epochs": 1, "out_dir": str(tmp_path / "cut")}, tmp_path / "c.json", 2)
    assert first.returncode == 0, first.stderr[-4000:]
    rest = run_torchrun({**config, "scst_epochs": 2, "out_dir": str(tmp_path / "cut")}, tmp_path / "r.json", 2,
                        "--resume")
    assert rest.returncode == 0, rest.stderr[-4000:]
    records = [[json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("whole", "cut")]
    assert [r["phase"] for r in records[1]] == ["xe", "scst", "scst"]
    assert [r["train_reward"] for r in records[1][1:]] == [r["train_reward"] for r in records[0][1:]]


def test_a_lost_connection_in_a_run_of_one_process_is_not_blamed_on_another(monkeypatch):
    from captioner.train import _peers_watched

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="Connection reset by peer"), _peers_watched():
        raise RuntimeError("a DataLoader worker's socket: Connection reset by peer")


def test_only_the_leader_checks_the_dev_references_which_need_java(tiny_config, tmp_path, monkeypatch):  # noqa: F811
    import types

    from captioner.data import read_manifest, write_manifest
    from captioner.errors import DataError

    _as_rank_1_of_2(monkeypatch)  # the leader's verdict (share) is that there is nothing to refuse
    monkeypatch.setattr("captioner.train.check_references", lambda *_: pytest.fail("a follower ran the tokenizer"))
    entries = read_manifest(tiny_config.dev_manifest)
    wordless = tmp_path / "wordless.jsonl"
    write_manifest(wordless, [(str(e.image), e.captions) for e in entries[:2]] + [(str(entries[2].image), ["ⅷ"])])
    follower = types.SimpleNamespace(group=ProcessGroup(rank=1, local_rank=1, world=2), cfg=tiny_config,
                                     dev_entries=read_manifest(wordless))
    Trainer._check_dev_references(follower)  # the leader's verdict, shared: nothing to refuse
    monkeypatch.setattr(ProcessGroup, "share", lambda self, value: "wordless.jsonl: the leader's refusal")
    with pytest.raises(DataError, match="^wordless.jsonl: the leader's refusal$"):
        Trainer._check_dev_references(follower)  # raised alike in every process
