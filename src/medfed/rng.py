"""Randomness keyed by position, so every execution order gives the same numbers.

A run has one integer seed. Every random draw is keyed by where it happens
(repeat, setting, round, site, ...) through ``numpy.random.SeedSequence(seed, spawn_key=key)``,
never by the order in which earlier draws happened: serial, parallel and networked
execution therefore draw the same numbers. Generators are built on first use because
building one costs ~30 µs, which matters in a round that otherwise costs a few hundred.
"""

from __future__ import annotations

import zlib

import numpy as np


def name_key(name: str) -> int:
    """A stable integer for a name (CRC-32), to key draws by setting or site name."""
    return zlib.crc32(name.encode("utf-8"))


class KeyedRng:
    """A random generator identified by ``(seed, key)`` and created lazily."""

    __slots__ = ("_generator", "key", "seed")

    def __init__(self, seed: int, key: tuple[int, ...] = ()) -> None:
        self.seed = int(seed)
        self.key = tuple(int(k) for k in key)
        self._generator: np.random.Generator | None = None

    def child(self, *key: int) -> KeyedRng:
        """The generator one level down, e.g. ``rng.child(round, site)``."""
        return KeyedRng(self.seed, self.key + tuple(int(k) for k in key))

    @property
    def generator(self) -> np.random.Generator:
        if self._generator is None:
            self._generator = np.random.default_rng(
                np.random.SeedSequence(self.seed, spawn_key=self.key)
            )
        return self._generator

    def __repr__(self) -> str:
        return f"KeyedRng(seed={self.seed}, key={self.key})"
