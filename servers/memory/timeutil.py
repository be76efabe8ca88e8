"""Timestamps: ISO 8601 at the edges, UTC epoch seconds inside (they compare and sort on every backend)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class TimeFormatError(ValueError):
    """A timestamp the server cannot read."""


def now() -> float:
    return time.time()


def parse_time(value: str | float | int | datetime | None, field: str = "at") -> float | None:
    """Epoch seconds from an ISO 8601 string (date-only means midnight UTC; no offset means UTC)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TimeFormatError(f"{field} must be an ISO 8601 timestamp such as 2026-03-05T14:00:00Z")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        try:
            dt = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise TimeFormatError(
                f"{field}={value!r} is not an ISO 8601 timestamp; use a form like 2026-03-05T14:00:00Z or 2026-03-05"
            ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def from_ts(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def to_iso(dt: datetime | float | None) -> str | None:
    if dt is None:
        return None
    if isinstance(dt, (int, float)):
        dt = from_ts(float(dt))
    text = dt.astimezone(UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")
