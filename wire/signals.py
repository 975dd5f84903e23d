"""Process signals delivered twice.

The same signal again within `SIGNAL_ECHO_S` of the first is one signal delivered twice, not an operator
asking again: the one-file binary's launcher passes on to its child the Ctrl-C the child had from the
terminal already, and systemd signals every process of a unit, the launcher included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

SIGNAL_ECHO_S = 0.2


async def absorb_signal_echoes(signals: AsyncIterator[int], since: float | None) -> None:
    """Take the copies of a signal still arriving until `SIGNAL_ECHO_S` after it came (at `since`, trio
    time, if it did). Leaving a signal receiver delivers what it holds again, to Python's default
    handler: an echo would end the program with a KeyboardInterrupt traceback after a clean stop."""
    if since is None:
        return
    with trio.move_on_at(since + SIGNAL_ECHO_S):
        async for _ in signals:
            pass
