"""asyncio helpers shared by the actors' background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended; never raises its cancellation."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def every(interval_s: float, step: Callable[[], Awaitable[Any]], what: str) -> None:
    """Run `step` every `interval_s` until cancelled; a failing step is logged, not fatal."""
    while True:
        try:
            await step()
        except Exception:
            logger.exception("%s failed; continuing", what)
        await asyncio.sleep(interval_s)
