"""The bounded queue between source and learner: memory bound, drop accounting, blocking."""

import threading
import time

import pytest

from adapters.base import Chunk
from somad.chunk_queue import ChunkQueue


def test_drop_oldest_keeps_newest_and_counts_every_dropped_byte():
    q = ChunkQueue(max_bytes=100, policy="drop_oldest")
    sent = 0
    for i in range(1000):
        data = bytes([i % 256]) * 7
        q.put(Chunk(data))
        sent += len(data)
        assert q.queued_bytes <= 100
    kept = sum(len(c.data) for c in q.get(timeout=0))
    assert kept + q.dropped_bytes == sent
    assert q.high_water_bytes <= 100


def test_drop_oldest_cuts_an_oversized_chunk_to_its_newest_bytes():
    q = ChunkQueue(max_bytes=10, policy="drop_oldest")
    q.put(Chunk(b"0123456789abcdef"))
    assert [c.data for c in q.get(timeout=0)] == [b"6789abcdef"]
    assert q.dropped_bytes == 6


def test_block_policy_waits_for_room_and_loses_nothing():
    q = ChunkQueue(max_bytes=64, policy="block")
    total = 200 * 16
    received = bytearray()

    def consume():
        while len(received) < total:
            for c in q.get(timeout=0.5):
                received.extend(c.data)
            time.sleep(0.001)  # a slow consumer

    t = threading.Thread(target=consume)
    t.start()
    for i in range(200):
        assert q.put(Chunk(bytes([i]) * 16), timeout=5.0)
        assert q.queued_bytes <= 64
    t.join(10)
    assert bytes(received) == b"".join(bytes([i]) * 16 for i in range(200))
    assert q.dropped_bytes == 0


def test_block_put_times_out_when_nobody_reads():
    q = ChunkQueue(max_bytes=4, policy="block")
    assert q.put(Chunk(b"abcd"))
    t0 = time.monotonic()
    assert not q.put(Chunk(b"e"), timeout=0.1)
    assert time.monotonic() - t0 < 2.0


def test_close_wakes_a_blocked_producer_and_a_waiting_consumer():
    q = ChunkQueue(max_bytes=4, policy="block")
    q.put(Chunk(b"abcd"))
    results = []
    producer = threading.Thread(target=lambda: results.append(q.put(Chunk(b"x"))))
    producer.start()
    time.sleep(0.05)
    q.close()
    producer.join(2.0)
    assert results == [False]
    assert [c.data for c in q.get(timeout=0)] == [b"abcd"]  # what was queued still drains
    assert q.get(timeout=5.0) == []  # closed and empty: returns at once


def test_get_respects_max_bytes_but_always_returns_one():
    q = ChunkQueue(max_bytes=1000, policy="block")
    for _ in range(5):
        q.put(Chunk(b"x" * 100))
    assert len(q.get(timeout=0, max_bytes=250)) == 2
    assert len(q.get(timeout=0, max_bytes=10)) == 1


@pytest.mark.parametrize("kwargs", [{"policy": "lossy"}, {"max_bytes": 0}])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        ChunkQueue(**kwargs)
