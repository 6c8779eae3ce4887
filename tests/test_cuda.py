"""The GPU paths, checked against the CPU: captions, video cues, the server's batcher and training steps.

CI has no GPU, so these are skipped there (with that reason); they run wherever CUDA is,
e.g. `pytest tests/test_cuda.py` on a lent GPU machine. A GPU computes in another order
than the CPU, so scores agree to a tolerance and the chosen words are compared exactly.
"""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES, SHARED_SAMPLES
from test_train import tiny_config  # noqa: F401  (a fixture)
from test_video_source import write_video

from captioner.api import caption_paths, load_model
from captioner.batching import DynamicBatcher
from captioner.images import model_pixels
from captioner.pipelines.video import subtitle_video
from captioner.pipelines.video_options import VideoOptions
from captioner.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: these compare the GPU paths with the CPU's")

# Mean log-probabilities and confidences of the same words, GPU against CPU (float32, other kernels).
SCORE_TOLERANCE = 2e-3
PHOTOS = sorted(SAMPLES.glob("*.png")) + sorted(SHARED_SAMPLES.glob("*.[jp][pn]g"))


@pytest.fixture(scope="module")
def models():
    return load_model(device="cpu"), load_model(device="cuda")


def captions_of(model, paths, batch_size=32):
    return [(r.captions[0], [t.label for t in r.tags]) for r in caption_paths(model, paths, batch_size=batch_size)]


def test_the_gpu_writes_the_cpus_captions_with_the_same_scores_confidences_and_tags(models):
    cpu, gpu = models
    assert gpu.device.type == "cuda"
    for (on_cpu, cpu_tags), (on_gpu, gpu_tags) in zip(captions_of(cpu, PHOTOS), captions_of(gpu, PHOTOS),
                                                      strict=True):
        assert on_gpu.text == on_cpu.text
        assert on_gpu.score == pytest.approx(on_cpu.score, abs=SCORE_TOLERANCE)
        assert on_gpu.confidence == pytest.approx(on_cpu.confidence, abs=SCORE_TOLERANCE)
        assert gpu_tags == cpu_tags
    cat = captions_of(gpu, [SAMPLES / "chelsea.png"])[0][0]
    assert "cat" in cat.tokens


def test_a_photo_gets_the_same_caption_on_the_gpu_alone_or_batched_with_others(models):
    _, gpu = models
    batched = [c.text for c, _ in captions_of(gpu, PHOTOS)]
    alone = [c.text for c, _ in captions_of(gpu, PHOTOS, batch_size=1)]
    assert alone == batched


def test_video_cues_on_the_gpu_are_the_cpus(models, tmp_path):
    cpu, gpu = models
    names = [p.name for p in PHOTOS if p.parent == SHARED_SAMPLES][:3]
    if len(names) < 3:
        pytest.skip(f"the shared sample photos are not at {SHARED_SAMPLES}")
    clip = write_video(tmp_path / "shots.mp4", [(name, 3.0) for name in names])
    on_cpu = subtitle_video(clip, model=cpu, settings=VideoOptions(every=1.0))
    on_gpu = subtitle_video(clip, model=gpu, settings=VideoOptions(every=1.0))
    assert [(s.start, s.end, s.text) for s in on_gpu.segments] == [(s.start, s.end, s.text) for s in on_cpu.segments]
    assert len(on_gpu.segments) == 3


def test_the_server_batches_uploads_on_the_gpu(models):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captioner.pipelines.server import create_app

    cpu, gpu = models
    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in PHOTOS]
    with TestClient(create_app(gpu)) as client:
        response = client.post("/v1/captions", files=files)
    assert response.status_code == 200, response.text
    served = [record["caption"] for record in response.json()["captions"]]
    assert served == [c.text for c, _ in captions_of(cpu, PHOTOS)]


def test_a_gpu_batch_is_encoded_in_float32_at_its_padded_shape_and_each_grid_is_the_pictures_own(models):
    cpu, gpu = models
    pixels = torch.from_numpy(np.stack([model_pixels(p, gpu.encoder.preprocess.size) for p in PHOTOS[:3]]))
    tf32 = torch.backends.cudnn.allow_tf32
    grid = gpu.encode(pixels)  # encoded as a batch of 4, in float32
    assert grid.shape[0] == 3 and torch.backends.cudnn.allow_tf32 == tf32  # the switch is given back
    alone = torch.cat([gpu.encode(pixels[i : i + 1]) for i in range(3)])
    # measured on an H100: 0 and 3e-5 in float32; 0.016 and 0.04 with TF32 (grid values up to 6)
    assert torch.allclose(grid, alone, rtol=0, atol=1e-5)
    assert torch.allclose(grid.cpu(), cpu.encode(pixels), rtol=0, atol=2e-4)


def test_the_batcher_warms_every_batch_size_on_the_gpu_and_captions_as_before(models):
    cpu, gpu = models
    batcher = DynamicBatcher(gpu, max_batch_size=4, max_wait=0.5)
    try:
        assert batcher.warmed_sizes == (1, 2, 4) and not batcher.batch_sizes  # warm-up batches are not counted
        futures = [batcher.submit(p.name, model_pixels(p, gpu.encoder.preprocess.size)) for p in PHOTOS[:3]]
        served = [future.result(timeout=120).captions[0].text for future in futures]
    finally:
        batcher.close()
    assert served == [c.text for c, _ in captions_of(cpu, PHOTOS[:3])]


def test_the_cli_captions_on_the_gpu():
    done = subprocess.run([sys.executable, "-m", "captioner.pipelines.cli", "caption", "--device", "cuda",
                           str(SAMPLES / "chelsea.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cat" in done.stdout.split("\t")[1].split()


def test_training_steps_run_on_the_gpu_and_follow_the_cpus_losses(tiny_config):  # noqa: F811
    losses = {}
    for device in ("cpu", "cuda"):
        config = dataclasses.replace(tiny_config, device=device, out_dir=f"{tiny_config.out_dir}-{device}")
        trainer = Trainer(config)
        assert trainer.model.device.type == device
        losses[device] = [trainer.train_epoch() for _ in range(3)]
        if device == "cuda":
            assert trainer.scst_epoch() >= 0.0  # the self-critical sampling and its reward on the GPU
    assert losses["cuda"][-1] < losses["cuda"][0]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.02)
