"""The top-level scripts run as a user runs them, each in a process of its own, without paying torch's start-up
per run.

A run is a new process: its own exit status, stdout, stderr, working folder, environment and signals, exactly
as `python sample.py ...` has them. It is forked from a server process (multiprocessing's forkserver) that
imported the heavy third-party packages once and never ran a tensor operation, so the fork is safe and a run
starts in milliseconds instead of a second or more. Nothing of ovis-min is imported before the fork: each run
imports the project (and huggingface_hub, which reads its environment at import) afresh, under its own
environment. `fresh=True` runs a real `python script ...` instead, for what depends on the interpreter itself.
"""
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ["torch", "numpy", "PIL.Image", "PIL.PngImagePlugin", "safetensors.torch", "tokenizers"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _child(script: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str,
           own_group: bool) -> None:
    if own_group:
        os.setpgid(0, 0)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    if env.get("OMP_NUM_THREADS"):
        import torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *argv]
    sys.path[0] = str(Path(script).parent)
    # A forkserver child inherits the forkserver start method; `python script` has the platform's default (fork
    # on Linux up to Python 3.13), under which DataLoader workers start without importing the script again.
    multiprocessing.set_start_method(None, force=True)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    os._exit(code)


class Started:
    """A run in progress: `pid`, `send_signal`, and `wait` for its Run. With `own_group`, the run and the processes
    it starts are a process group of their own, which `signal_group` signals as a whole, as `kill -SIG -PGID`
    does."""

    def __init__(self, script: str, args: list[str], cwd: Path, env: dict[str, str], own_group: bool = False):
        self._folder = tempfile.TemporaryDirectory(prefix="script-run-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        self._process = _context.Process(target=_child, args=(script, args, str(cwd), env, self._out, self._err,
                                                              own_group))
        self._process.start()
        self.pid = self._process.pid

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pid, sig)

    def stdout_so_far(self) -> str:
        try:
            return Path(self._out).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_so_far(self) -> str:
        try:
            return Path(self._err).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float = 120, stderr: bool = False) -> None:
        """Block until `text` appears on the run's stdout (or stderr; the run flushes its lines)."""
        so_far = self.stderr_so_far if stderr else self.stdout_so_far
        deadline = time.monotonic() + timeout
        while text not in so_far():
            if self._process.exitcode is not None or time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} never appeared; output so far:\n{so_far()[-2000:]}")
            time.sleep(0.02)

    def wait(self, timeout: float = 300) -> Run:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise TimeoutError(f"the run did not end within {timeout} s")
        code = self._process.exitcode
        code = 128 - code if code < 0 else code  # killed by a signal, as a shell reports it
        run = Run(code, *(Path(p).read_text(encoding="utf-8", errors="replace") for p in (self._out, self._err)))
        self._folder.cleanup()
        return run


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test run: this one, one CPU thread (a tiny model gains nothing from more, and on a
    busy CPU their spin-waits cost seconds a run), UTF-8 output, and `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", **(extra or {})}


def start_script(name: str, *args: str, cwd: Path | str = ROOT, env: dict[str, str] | None = None,
                 own_group: bool = False) -> Started:
    return Started(str(ROOT / name), [str(a) for a in args], Path(cwd), script_env(env), own_group)


def run_script(name: str, *args: str, cwd: Path | str = ROOT, env: dict[str, str] | None = None,
               fresh: bool = False, timeout: float = 300) -> Run:
    """`python name args...` in `cwd`: forked from the preloaded server, or a new interpreter with `fresh`."""
    if fresh:
        result = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=script_env(env),
                                capture_output=True, timeout=timeout)
        return Run(result.returncode, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace"))
    return start_script(name, *args, cwd=cwd, env=env).wait(timeout)


def one_line_error(run: Run, *names: str) -> bool:
    """The shape of every user error: exit status not 0, no traceback, and a message naming each of `names`."""
    return run.returncode != 0 and "Traceback" not in run.stderr and all(n in run.stderr for n in names)
