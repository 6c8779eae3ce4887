"""keep_torch_off_this_thread with a real batcher, in a fresh process (the settings are per process)."""

import json
import subprocess
import sys

from conftest import ROOT, SHARED_SAMPLES

SCRIPT = """
import json, sys, threading
import torch
from captioner.torch_threads import keep_torch_off_this_thread

before = torch.get_num_threads()
threads = keep_torch_off_this_thread()
main_threads = torch.get_num_threads()

from captioner.api import caption_images, load_model
from captioner.batching import DynamicBatcher
from captioner.images import model_pixels

model = load_model()
photos = sys.argv[1:]
batcher = DynamicBatcher(model, max_batch_size=8, max_wait=0.2, torch_threads=threads)
try:
    futures = [batcher.submit(p, model_pixels(p, 224)) for p in photos]
    served = [f.result(timeout=120).captions[0].text for f in futures]
finally:
    batcher.close()
probe = []
thread = threading.Thread(target=lambda: probe.append(torch.get_num_threads()))
thread.start()
thread.join()
print(json.dumps({"before": before, "returned": threads, "main": main_threads, "new_thread": probe[0],
                  "served": served, "main_thread": [c.text for c in caption_images(model, photos)]}))
"""


def test_the_main_thread_runs_torch_alone_and_the_batcher_gets_the_threads_back():
    photos = [str(SHARED_SAMPLES / name) for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
    run = subprocess.run([sys.executable, "-c", SCRIPT, *photos], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.splitlines()[-1])
    assert seen["returned"] == seen["before"] and seen["main"] == 1
    # the batcher set the process's count back, so threads started later get it too
    assert seen["new_thread"] == seen["before"]
    assert seen["served"] == seen["main_thread"] and "cat" in seen["served"][0]
