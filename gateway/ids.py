"""Ids that must be unique but need not be secret: request ids and idempotency lease tokens.

`secrets.token_hex` asks the kernel for randomness on every call, twice per booking. These ids are
only compared, never trusted as credentials, so a per-process generator seeded from the kernel once
(and again in a forked child) is enough: 64 random bits, as before.
"""

from __future__ import annotations

import os
import random

_rng = random.Random(os.urandom(32))


def _reseed() -> None:
    _rng.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)  # a forked child must not repeat its parent's ids


def new_id() -> str:
    """16 hex digits (64 bits), like `secrets.token_hex(8)`."""
    return f"{_rng.getrandbits(64):016x}"
