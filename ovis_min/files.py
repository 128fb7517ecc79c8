"""Writing files so that nothing half-written ever looks finished.

Every output of ovis-min (images, checkpoints, configs, logs, JSON reports) is written under a temporary name in
the destination's own folder and renamed into place: a rename within one file system is atomic, so a reader, a
crash, a full disk or Ctrl-C sees either the old state or the whole new file, never part of it.
"""
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # names of files and folders being written; never read as outputs
# `.tmp-<pid>-...`: the writer's process id, so that leftovers of a killed writer can be told from work in flight
_LEFTOVER = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


def temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def write_atomic(path: Path | str, data: bytes | str, replace: bool = True) -> Path:
    """Write `data` to `path` through a temporary file in the same folder.

    `replace=False` never overwrites an existing file: it raises FileExistsError instead, so two processes that
    picked the same free name cannot both win (the loser picks another name and keeps its work).
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())  # mkstemp makes the file private; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)  # fails with FileExistsError if the name was taken meanwhile
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: reserve the name, then fill it
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.replace(temp, path)
            else:
                os.unlink(temp)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def default_mode(directory: bool = False) -> int:
    """The permissions a plain `open(path, "w")` (or `mkdir`) would give a new file (folder): 0o666 (0o777) less
    the umask. Temporary files and folders are made private; what is renamed into place gets these."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, also from writers that report it only in their message (safetensors' Rust writer)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"(os error {errno.ENOSPC})" in str(error) or f"(os error {errno.EDQUOT})" in str(error)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(folder: Path | str) -> list[Path]:
    """Delete the temporary files and folders that killed writers left in `folder` (their process is gone);
    those of running processes are theirs to finish. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def read_json(path: Path, kind: type, error: type[Exception], fix: str):
    """The JSON value in `path`, which must be a `kind` (dict or list); anything else raises `error` with a message
    that names the file and ends with `fix`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as reason:
        raise error(f"{path}: not valid JSON ({reason}); {fix}") from None
    if not isinstance(value, kind):
        raise error(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}; "
                    f"{fix}")
    return value
