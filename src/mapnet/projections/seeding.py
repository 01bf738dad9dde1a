"""Seeds and integer hashes from which the fixed projections are regenerated (never stored).

Part of the seed contract: changing anything here changes W, and with it what every saved
latent means.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one named part of a mapping (independent of the other parts)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# splitmix64 constants (Steele, Lea & Flood 2014).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Counters hashed per NumPy pass: the in-place temporaries stay in cache (8x faster than one pass).
HASH_CHUNK = 1 << 18


def stream_key(seed: int, name: str) -> int:
    """A 64-bit key for one named random stream of the projection with this seed."""
    digest = hashlib.sha256(f"mapnet.structured/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def hash64(key: int, start: int, stop: int) -> np.ndarray:
    """splitmix64 outputs for counters start..stop-1 of the stream `key`: (stop - start,) uint64."""
    out = np.empty(stop - start, dtype=np.uint64)
    for lo in range(start, stop, HASH_CHUNK):
        hi = min(stop, lo + HASH_CHUNK)
        z = np.arange(lo, hi, dtype=np.uint64)
        z *= _GAMMA
        z += np.uint64(key)
        tmp = np.empty_like(z)
        np.right_shift(z, np.uint64(30), out=tmp)
        z ^= tmp
        z *= _MIX1
        np.right_shift(z, np.uint64(27), out=tmp)
        z ^= tmp
        z *= _MIX2
        np.right_shift(z, np.uint64(31), out=tmp)
        z ^= tmp
        out[lo - start : hi - start] = z
    return out


def hash_signs(key: int, start: int, stop: int) -> torch.Tensor:
    """±1 from the top bit of each hash (the best-mixed bit): (stop - start,) int8."""
    out = torch.empty(stop - start, dtype=torch.int8)
    for lo in range(start, stop, HASH_CHUNK):
        hi = min(stop, lo + HASH_CHUNK)
        top = (hash64(key, lo, hi) >> np.uint64(63)).astype(np.int8)
        out[lo - start : hi - start] = torch.from_numpy(1 - 2 * top)
    return out
