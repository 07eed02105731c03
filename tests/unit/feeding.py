"""Ways to deliver a byte string to a sans-I/O parser: whole, one byte at a time, random cuts.

Every handshake test runs under each of them (the ``feeding`` fixture in conftest.py), so a
parser that treats one read as one message fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Splitter = Callable[[bytes], list[bytes]]


def random_splits(seed: int) -> Splitter:
    def split(data: bytes) -> list[bytes]:
        rng = random.Random(seed)
        chunks, i = [], 0
        while i < len(data):
            n = rng.randint(1, 7)
            chunks.append(data[i : i + n])
            i += n
        return chunks

    return split


SPLITTERS: dict[str, Splitter] = {
    "whole": lambda data: [data],
    "one-byte": lambda data: [data[i : i + 1] for i in range(len(data))],
    "random-1": random_splits(1),
    "random-2": random_splits(2),
}
