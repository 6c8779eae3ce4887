"""Training under torchrun: 2 CPU processes (gloo) take the same steps as 1 process with the same global batch."""

import dataclasses
import json
import os
import subprocess
import sys

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
    assert together == pytest.approx(alone, rel=1e-4)
    assert alone[-1] < alone[0]  # it learned: the match is not two untrained copies agreeing
    assert (tmp_path / "two" / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_distributed_run_resumes_from_its_checkpoint(tiny_config, tmp_path):  # noqa: F811
    config = {k: v for k, v in dataclasses.asdict(tiny_config).items() if v is not None}
    config.update(epochs=1, batch_size=4, patience=10, out_dir=str(tmp_path / "run"))
    assert run_torchrun(config, tmp_path / "a.json", 2).returncode == 0
    resumed = run_torchrun({**config, "epochs": 2}, tmp_path / "b.json", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_without_torchrun_the_group_is_this_process_alone(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    group = join("cpu")
    assert group == ProcessGroup() and group.leader and not group.distributed
    assert group.share({"CIDEr-D": 0.5}) == {"CIDEr-D": 0.5}


def test_phases_that_cannot_run_data_parallel_are_refused_at_start(tiny_config, monkeypatch):  # noqa: F811
    monkeypatch.setattr("captioner.train.join", lambda device: ProcessGroup(rank=1, local_rank=1, world=2))
    with pytest.raises(OptionError, match="under torchrun.*scst_epochs 0"):
        Trainer(dataclasses.replace(tiny_config, scst_epochs=1))
    with pytest.raises(OptionError, match="batch_size=1 is the global batch"):
        Trainer(dataclasses.replace(tiny_config, batch_size=1))
