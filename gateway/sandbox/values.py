"""Salesforce's ids and its REST renderings of dates and dateTimes, shared by the org, SOQL and the
appointment store."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone

_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# what Salesforce takes for an id: 15 case-sensitive letters and digits, or 18 with the suffix
ID_SHAPE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


def salesforce_id(prefix: str, number: int) -> str:
    """An 18-character id with Salesforce's case-safety suffix, so clients that check it can."""
    digits = ""
    n = number
    for _ in range(10):
        n, r = divmod(n, 62)
        digits = _BASE62[r] + digits
    short = f"{prefix}Hs{digits}"
    assert len(short) == 15
    suffix = ""
    for chunk in range(3):
        bits = 0
        for i, ch in enumerate(short[chunk * 5 : chunk * 5 + 5]):
            if "A" <= ch <= "Z":
                bits |= 1 << i
        suffix += _CHECKSUM_ALPHABET[bits]
    return short + suffix


def looks_like_id(value: object) -> bool:
    return isinstance(value, str) and ID_SHAPE.fullmatch(value) is not None


def sf_datetime(value: datetime) -> str:
    """Salesforce's REST rendering of a dateTime field: UTC, milliseconds, `+0000`."""
    utc = value.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}+0000"


def parse_datetime(text: str) -> datetime | None:
    """A dateTime as REST bodies and answers write it (`Z`, `+0000`, `+00:00`, with or without
    milliseconds). One without a zone is read as UTC, as Salesforce reads a body's (inference)."""
    if "T" not in text:
        return None
    fixed = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", text.replace("Z", "+00:00"))
    try:
        parsed = datetime.fromisoformat(fixed)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def parse_date(text: str) -> date | None:
    if len(text) != 10:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None
