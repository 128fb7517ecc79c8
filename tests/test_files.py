"""ovis_min/files.py: writes that never leave a partial file under a final name."""
import os
import stat
import subprocess
import sys

import pytest

from ovis_min.files import remove_leftovers, write_atomic


def test_write_replaces_or_refuses_and_keeps_usual_permissions(tmp_path):
    path = write_atomic(tmp_path / "a.txt", "one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_atomic(path, "three", replace=False)
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.txt", "data")
    assert os.listdir(tmp_path) == []


def test_only_leftovers_of_dead_writers_are_removed(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    (tmp_path / f".tmp-{process.pid}-x.part").write_text("half")
    (tmp_path / f".tmp-{process.pid}-step-00000002").mkdir()
    (tmp_path / f".tmp-{os.getppid()}-y.part").write_text("in flight")  # a live process: the test runner's parent
    (tmp_path / ".tmp-notapid").write_text("someone else's naming")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [f".tmp-{process.pid}-step-00000002", f".tmp-{process.pid}-x.part"]
    assert sorted(os.listdir(tmp_path)) == [f".tmp-{os.getppid()}-y.part", ".tmp-notapid"]
