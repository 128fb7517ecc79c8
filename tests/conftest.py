import os
import sys
import tempfile
from pathlib import Path

import torch

# tests import the repo's top-level scripts and the helpers next to this file
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# torch.compile's kernel cache is keyed without the CPU capability that ATen and oneDNN were told to use: kernels
# built while imitating an AVX2 CPU (ATEN_CPU_CAPABILITY=avx2) and loaded by a native run abort the process. One
# cache per capability keeps both kinds of run working and still warm.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(
    Path(tempfile.gettempdir()) / f"ovis-min-inductor-{torch.backends.cpu.get_cpu_capability()}-"
                                  f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}".lower()))
