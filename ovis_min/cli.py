"""What the command-line scripts share. Standard library only: it is imported before torch, which takes seconds."""
import argparse
import math
import os
import signal
import sys


def ctrl_c_quits_quietly(script: str) -> None:
    """Until `ctrl_c_raises()`: Ctrl-C prints one line and exits 130 at once. Nothing has been written yet, and an
    exception raised inside an import can be swallowed by the library being imported, so no exception is used."""
    def quit_now(signum, frame):
        sys.stderr.write(f"\n{script}: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    signal.signal(signal.SIGINT, quit_now)


def ctrl_c_raises() -> None:
    """From here on Ctrl-C is a KeyboardInterrupt, which each script's main turns into its one line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def whole_number(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper end when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (f" and at most {high}" if high else "")
                                             + f", got {value}")
        return value
    return parse


def real(low: float = 0.0, high: float = math.inf, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite number in [low, high] (ends excluded where open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (open_low and value == low) \
                or (open_high and value == high):
            interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    return parse


class TrainError(SystemExit):
    """Something a user can fix stops train.py: one line on stderr, exit status 1 (a SystemExit, so that code
    calling train.main() stops the same way)."""

    def __init__(self, message: str):
        super().__init__(f"train.py: error: {message}")
