"""What the four command-line scripts share before anything heavy is imported. Standard library only: this runs
before torch is imported, which takes seconds."""
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
