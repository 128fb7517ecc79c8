import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# tests import the repo's top-level scripts and the helpers next to this file
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# torch.compile's kernel cache is keyed without the CPU capability that ATen and oneDNN were told to use: kernels
# built while imitating an AVX2 CPU (ATEN_CPU_CAPABILITY=avx2) and loaded by a native run abort the process. One
# cache per capability keeps both kinds of run working and still warm.
from ovis_min.tiny import write_tiny_checkpoint  # noqa: E402  (after the path set-up above)

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(
    Path(tempfile.gettempdir()) / f"ovis-min-inductor-{torch.backends.cpu.get_cpu_capability()}-"
                                  f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}".lower()))


@pytest.fixture(scope="module")
def single_thread():
    """The tiny model's ops are microseconds long: OpenMP threads only add contention (badly so on a busy box),
    and script runs use one thread (script_runner), so in-process runs that compare with them must too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the official layout (two shards)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0, shards=2)
