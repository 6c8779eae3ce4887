"""The dynamic batcher on the real model: concurrent requests share batches, options never mix."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from conftest import SHARED_SAMPLES

from captioner.api import caption_images
from captioner.batching import DynamicBatcher
from captioner.images import model_pixels

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]


def pixels(name):
    return model_pixels(SHARED_SAMPLES / name, 224)


def test_requests_arriving_together_share_one_batch_and_get_their_own_captions(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.5)
    try:
        futures = [batcher.submit(name, pixels(name)) for name in PHOTOS * 2]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [8]
    assert batcher.warmed_sizes == ()  # only a GPU pays per batch shape (tests/test_cuda.py)
    expected = [c.text for c in caption_images(default_model, [SHARED_SAMPLES / n for n in PHOTOS])]
    assert [r.captions[0].text for r in results] == expected * 2
    assert [r.path for r in results] == PHOTOS * 2 and all(r.tags for r in results[:2])


def test_a_full_batch_goes_at_once_and_different_options_are_never_mixed(default_model):
    greedy = dataclasses.replace(default_model.config.decoding, method="greedy", beam_size=1)
    batcher = DynamicBatcher(default_model, max_batch_size=3, max_wait=0.5)
    try:
        futures = [batcher.submit(n, pixels(n), None if i % 2 else greedy) for i, n in enumerate(PHOTOS * 2)]
        [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert sorted(batcher.batch_sizes) == [1, 1, 3, 3]  # 4 greedy and 4 beam items, in batches of at most 3


def test_threads_submitting_at_once_are_batched_and_close_finishes_what_is_queued(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=16, max_wait=0.2)
    results = {}

    def client(i):
        name = PHOTOS[i % 4]
        results[i] = batcher.submit(name, pixels(name)).result(timeout=60).captions[0].text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    late = batcher.submit("chelsea.png", pixels("chelsea.png"))
    batcher.close()
    assert late.result(timeout=1).captions[0].text == "a cat is playing with a toy"
    assert len(results) == 12 and max(batcher.batch_sizes) > 1
    assert np.mean(list(batcher.batch_sizes)[:-1]) > 2


def test_a_batch_waits_past_max_wait_for_requests_on_their_way_with_its_options_only(default_model):
    """Clients answered together send their next photos together, but the server decodes them
    one after another: gathering for max_wait alone split them into two smaller batches."""
    greedy = dataclasses.replace(default_model.config.decoding, method="greedy", beam_size=1)
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.05, max_wait_coming=30.0)
    try:
        with batcher.expecting():  # a request received, its photo still being decoded
            first = batcher.submit("chelsea.png", pixels("chelsea.png"))
            time.sleep(0.5)  # ten times max_wait
            second = batcher.submit("coffee.png", pixels("coffee.png"))
        assert "cat" in first.result(timeout=60).captions[0].text and second.result(timeout=60).captions
        with batcher.expecting(greedy):  # on its way, but with options of its own: not waited for
            alone = batcher.submit("rocket.jpg", pixels("rocket.jpg"))
            assert alone.result(timeout=10).captions  # well before max_wait_coming
            batcher.submit("rocket.jpg", pixels("rocket.jpg"), greedy)
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [2, 1, 1]


def test_a_request_received_during_the_short_wait_is_waited_for_and_its_arrival_ends_the_wait(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.2, max_wait_coming=30.0)
    photo = pixels("chelsea.png")
    try:
        first = batcher.submit("a.png", photo)
        time.sleep(0.05)  # the batch has started its 0.2 s wait: nothing was on its way
        with batcher.expecting():  # then a request comes in
            time.sleep(0.6)
            second = batcher.submit("b.png", photo)
        assert first.result(timeout=10).captions and second.result(timeout=10).captions  # not after 30 s
        with batcher.expecting():  # the request's images are queued, but it has not left expecting()
            third = batcher.submit("c.png", photo)
            time.sleep(0.6)
        assert third.result(timeout=10).captions  # its leaving wakes the batch, which then goes: not after 30 s
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [2, 1]


def test_the_wait_for_requests_on_their_way_is_bounded_and_ends_with_a_failed_one(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.01, max_wait_coming=0.5)
    try:
        with batcher.expecting():  # never submits before the photo below is answered
            assert "cat" in batcher.submit("chelsea.png", pixels("chelsea.png")).result(timeout=60).captions[0].text
        patient = DynamicBatcher(default_model, max_wait=0.01, max_wait_coming=600.0)
        try:
            with pytest.raises(ValueError, match="not a photo"), patient.expecting():
                raise ValueError("not a photo")  # the request fails while being decoded
            assert patient.submit("coffee.png", pixels("coffee.png")).result(timeout=60).captions  # no 600 s wait
        finally:
            patient.close()
    finally:
        batcher.close()


def test_a_caller_that_gave_up_does_not_stop_the_worker_and_a_closed_batcher_refuses(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.3)
    try:
        abandoned = batcher.submit("chelsea.png", pixels("chelsea.png"))
        assert abandoned.cancel()  # as asyncio does for a request that timed out
        kept = batcher.submit("coffee.png", pixels("coffee.png"))
        assert kept.result(timeout=60).captions[0].text == "a small brown dog is running through the water"
        again = batcher.submit("chelsea.png", pixels("chelsea.png"))
        assert again.result(timeout=60).captions[0].text == "a cat is playing with a toy"
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [1, 1]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("chelsea.png", pixels("chelsea.png"))


def test_a_running_batch_whose_callers_all_gave_up_stops_and_one_still_awaited_runs_on(default_model):
    from captioner.search import SearchStopped

    heavy = dataclasses.replace(default_model.config.decoding, beam_size=64, n_best=64, max_length=100,
                                min_length=99)  # about a minute of search on 2 cores
    batcher = DynamicBatcher(default_model, max_batch_size=4, max_wait=0.05)
    try:
        gone = [batcher.submit(n, pixels(n), heavy) for n in PHOTOS]
        time.sleep(1.0)  # running now
        started = time.monotonic()
        batcher.abandon(gone)
        with pytest.raises(SearchStopped):
            gone[0].result(timeout=30)
        assert time.monotonic() - started < 5
        after = batcher.submit("chelsea.png", pixels("chelsea.png"))
        assert after.result(timeout=30).captions[0].text == "a cat is playing with a toy"  # the worker is free

        shorter = dataclasses.replace(heavy, max_length=24, min_length=23)  # a few seconds
        both = [batcher.submit(n, pixels(n), shorter) for n in PHOTOS[:2]]
        time.sleep(0.5)  # running now
        batcher.abandon(both[:1])  # the other still waits: the batch runs to its end
        assert len(both[1].result(timeout=60).captions[0].tokens) >= 23  # searched to min_length and on
    finally:
        batcher.close()


def test_many_option_sets_for_same_named_uploads_are_all_captioned(default_model):
    """Uploads are often all named alike (photo.jpg): with three or more option sets waiting,
    taking held items out of the queue once compared their pixel arrays, which raised and
    killed the worker, and every later request hung."""
    batcher = DynamicBatcher(default_model, max_batch_size=8, max_wait=0.3)
    try:
        photo = pixels("chelsea.png")
        options = [dataclasses.replace(default_model.config.decoding, beam_size=b) for b in (1, 2, 3, 4, 1, 2, 3)]
        futures = [batcher.submit("photo.jpg", photo.copy(), o) for o in options]  # equal, not the same, arrays
        results = [f.result(timeout=120) for f in futures]
        later = batcher.submit("photo.jpg", photo).result(timeout=60)
    finally:
        batcher.close()
    assert all("cat" in r.captions[0].text for r in [*results, later])
    assert sorted(batcher.batch_sizes) == [1, 1, 2, 2, 2]  # a batch per option set (4), then the later one


def test_a_fault_while_gathering_fails_that_batch_and_the_worker_goes_on(default_model, monkeypatch):
    batcher = DynamicBatcher(default_model, max_batch_size=4, max_wait=0.01)
    try:
        gather = batcher._gather
        monkeypatch.setattr(batcher, "_gather", lambda *args: (_ for _ in ()).throw(RuntimeError("broken")))
        with pytest.raises(RuntimeError, match="broken"):
            batcher.submit("a.jpg", pixels("chelsea.png")).result(timeout=60)
        monkeypatch.setattr(batcher, "_gather", gather)
        assert "cat" in batcher.submit("b.jpg", pixels("chelsea.png")).result(timeout=60).captions[0].text
    finally:
        batcher.close()


def test_a_thread_count_below_one_is_refused_before_a_worker_starts(default_model):
    with pytest.raises(ValueError, match="torch_threads=0 must be at least 1"):
        DynamicBatcher(default_model, torch_threads=0)


def test_pixels_that_are_not_the_models_input_are_refused_at_submit_not_in_a_shared_batch(default_model):
    batcher = DynamicBatcher(default_model, max_batch_size=4, max_wait=0.2)
    try:
        good = batcher.submit("chelsea.png", pixels("chelsea.png"))
        for bad in (np.zeros((100, 100, 3), np.uint8), pixels("chelsea.png").astype(np.float32), [[0]]):
            with pytest.raises(ValueError, match="pixels must be a \\(224, 224, 3\\) uint8 array"):
                batcher.submit("bad", bad)
        assert good.result(timeout=60).captions[0].text == "a cat is playing with a toy"
    finally:
        batcher.close()
    with pytest.raises(ValueError, match="max_batch_size=0"):
        DynamicBatcher(default_model, max_batch_size=0)
