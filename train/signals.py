"""SIGTERM and Ctrl-C as a request to stop at the next safe point: one handler for the training
loop (`train.loop`, which stops after the current step and saves) and the sweep (`train.sweep`,
which stops taking trials while its trials' loops stop and save)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals(
    on_stop: Callable[[], None] | None = None, *, second_interrupt_stops_now: bool = True
) -> Iterator[list[str]]:
    """Turns SIGTERM and SIGINT into a request to stop, for the duration of the `with` block.

    Yields a list that receives the name of each signal; `on_stop()`, if given, runs after each
    (e.g. to wake a thread that waits). With `second_interrupt_stops_now`, a second SIGINT
    (Ctrl-C twice) raises KeyboardInterrupt at once. The previous handlers come back at the end.
    Outside the main thread, where Python cannot take signals, nothing is installed.
    """
    received: list[str] = []

    def request_stop(signum, frame):
        del frame
        if received and signum == signal.SIGINT and second_interrupt_stops_now:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        if on_stop is not None:
            on_stop()

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
