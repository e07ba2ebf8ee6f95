"""Stable 64-bit seeds for every RNG of the streams, and the tags that keep them apart."""

from __future__ import annotations

# Tags that keep the RNG streams derived from one seed independent of each other.
_TAG_SHARD_ORDER = 1
_TAG_BUFFER = 2
_TAG_AUGMENT = 3
_TAG_BALANCED = 4
_TAG_INTERLEAVE = 5
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into a 64-bit seed (splitmix64 rounds).

    Stable across processes, platforms and Python versions, unlike ``hash()``; used for every RNG
    of the streams and the augmentations so that they depend only on the values passed.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h
