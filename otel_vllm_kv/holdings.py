"""Who holds an engine's KV cache, by holder key: the data the engine's pass produces
(``engine.holders``) and the exporter reports, and its encoding in the relay (pure: no vLLM).

A key is (LoRA adapter name, tenant), either None where a request has none, or ``OVERFLOW``
for every request past the engine's limit of keys. Blocks, not tokens: the exporter converts
them with the pool's rate (``kv_cache.PoolLayout``), as it does ``used``.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

#: The longest adapter name or tenant kept as a key (longer ones count under ``OVERFLOW``).
MAX_NAME_LENGTH = 100
#: At most this many keys in one engine's relay (the engine's limit is checked against it).
MAX_KEYS = 1000

HolderKey = tuple  # (adapter name | None, tenant | None), or OVERFLOW
#: The key of every request past the limit (not a pair of names: no request can have it).
OVERFLOW: HolderKey = (None, None, "overflow")
#: The key of a request with neither an adapter nor a tenant.
NO_HOLDER_NAMES: HolderKey = (None, None)

#: A year of every block held: far beyond any real figure, so a double stays exact enough and finite.
_MAX_BLOCK_SECONDS_PER_BLOCK = 366 * 86400.0


class Holding(NamedTuple):
    """What one key holds: ``block_seconds`` so far, ``held_blocks`` at the pass."""

    key: HolderKey
    block_seconds: float
    held_blocks: float


class HoldersPass(NamedTuple):
    """One pass over an engine's pool: every key seen so far, and the used blocks and written tokens then."""

    holdings: tuple[Holding, ...]
    used_blocks: int
    written_tokens: float | None
    """None unless the pool has one full-attention group (sliding windows, Mamba: no per-token slots)."""


def valid_name(name: object) -> bool:
    """Whether ``name`` can be a key's adapter name or tenant: None, or short printable text."""
    return name is None or (isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and name.isprintable())


def encode(holders: HoldersPass) -> bytes:
    rows = [
        [key == OVERFLOW, *(key[:2] if key != OVERFLOW else (None, None)), block_seconds, held]
        for key, block_seconds, held in holders.holdings
    ]
    document = {"used": holders.used_blocks, "written": holders.written_tokens, "holders": rows}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode(payload: bytes, num_blocks: int) -> HoldersPass:
    """``encode``'s output for a pool of ``num_blocks`` blocks; ValueError for anything else."""
    document = json.loads(payload.decode("utf-8"))
    _require(isinstance(document, dict) and set(document) == {"used", "written", "holders"}, "its fields")
    used, written, rows = document["used"], document["written"], document["holders"]
    allocatable = num_blocks - 1
    _require(type(used) is int and 0 <= used <= allocatable, f"{used!r} used blocks")
    _require(written is None or (_is_number(written) and 0 <= written <= 2**53), f"{written!r} written tokens")
    _require(isinstance(rows, list) and len(rows) <= MAX_KEYS, "its holders")
    holdings = []
    for row in rows:
        _require(isinstance(row, list) and len(row) == 5, f"a holder {row!r}")
        overflow, adapter, tenant, block_seconds, held = row
        _require(type(overflow) is bool and valid_name(adapter) and valid_name(tenant), f"a holder key {row[:3]!r}")
        _require(not overflow or adapter is tenant is None, "an overflow key with names")
        _require(
            _is_number(block_seconds) and 0 <= block_seconds <= allocatable * _MAX_BLOCK_SECONDS_PER_BLOCK,
            f"{block_seconds!r} block-seconds",
        )
        _require(_is_number(held) and 0 <= held <= allocatable, f"{held!r} held blocks")
        holdings.append(Holding(OVERFLOW if overflow else (adapter, tenant), float(block_seconds), float(held)))
    keys = [holding.key for holding in holdings]
    _require(len(set(keys)) == len(keys), "a key twice")
    _require(sum(holding.held_blocks for holding in holdings) <= allocatable * (1 + 1e-9), "more blocks than the pool")
    return HoldersPass(tuple(holdings), used, None if written is None else float(written))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"holders: {what}")
