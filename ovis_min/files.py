"""Writing files so that nothing half-written ever looks finished.

Every output of ovis-min (images, checkpoints, configs, logs, JSON reports) is written under a temporary name in
the destination's own folder and renamed into place: a rename within one file system is atomic, so a reader, a
crash, a full disk or Ctrl-C sees either the old state or the whole new file, never part of it.
"""
import errno
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # names of files and folders being written; never read as outputs


def write_atomic(path: Path | str, data: bytes | str, replace: bool = True) -> Path:
    """Write `data` to `path` through a temporary file in the same folder.

    `replace=False` never overwrites an existing file: it raises FileExistsError instead, so two processes that
    picked the same free name cannot both win (the loser picks another name and keeps its work).
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=path.parent)
    try:
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


def disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
