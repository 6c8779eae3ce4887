"""Background production: order kept, errors re-raised, early stop does not leave a thread behind."""

import threading

import pytest

from captioner.pipelines.prefetch import in_background


def test_items_arrive_in_order():
    assert list(in_background(range(1000), depth=4)) == list(range(1000))


def test_a_producer_error_reaches_the_consumer():
    def broken():
        yield 1
        raise OSError("disk gone")

    consumer = in_background(broken())
    assert next(consumer) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(consumer)


def test_stopping_early_stops_the_producer():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    consumer = in_background(endless(), depth=2)
    assert [next(consumer) for _ in range(3)] == [0, 1, 2]
    consumer.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 2  # consumed + queue depth + the one being put


def test_finished_is_set_when_the_producer_is_done_before_the_consumer_takes_everything():
    finished = threading.Event()
    consumer = in_background(range(10), depth=32, finished=finished)
    assert next(consumer) == 0
    assert finished.wait(timeout=10)  # nine items still wait in the buffer
    assert list(consumer) == list(range(1, 10))
