"""Logging: structlog JSON, one summary line per request.

Only fields the gateway chooses go out: never a body, a patient identifier, a comment, a key or a
token. The libraries' own loggers (Litestar, uvicorn, httpx, aiohttp) are silenced, since they can
print URLs, headers or tracebacks with request data.
"""

from __future__ import annotations

import logging
import sys

import structlog

_QUIET = ("httpx", "httpcore", "aiohttp", "uvicorn", "uvicorn.access", "uvicorn.error", "litestar", "asyncio")


def configure(level: str = "INFO", stream=None) -> None:
    for name in _QUIET:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = False
        lib.setLevel(logging.CRITICAL + 1)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


log = structlog.get_logger("ehr_gateway")
