"""The sink's partitioner chooses exactly what aiokafka's (and the Java client's) would."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from worker.pipeline.partitioner import Partitioner, murmur2


def test_murmur2_equals_aiokafkas_for_every_length_and_byte():
    rng = random.Random(3)
    keys = [bytes(rng.randrange(256) for _ in range(length)) for length in range(70) for _ in range(20)]
    keys += [b"", b"\x00", b"\xff" * 7, "ünïcode-key-😀".encode(), b"conv-17"]
    for key in keys:
        assert murmur2(key) == aiokafka_murmur2(key), key


def test_keyed_records_go_where_the_default_partitioner_puts_them():
    rng = random.Random(5)
    reference = DefaultPartitioner()
    partitioner = Partitioner()
    for count in (1, 3, 4, 12):
        partitions = list(range(count))
        for _ in range(300):
            key = rng.randbytes(rng.randrange(1, 40))
            expected = reference(key, partitions, partitions)
            assert partitioner(key, partitions) == expected
            assert partitioner(key, partitions) == expected  # from the cache too


def test_unkeyed_records_spread_over_the_partitions():
    partitioner = Partitioner()
    assert {partitioner(None, [0, 1, 2]) for _ in range(300)} == {0, 1, 2}
