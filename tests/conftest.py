import sys
from pathlib import Path

# tests import the repo's top-level scripts and the helpers next to this file
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
