"""What the four scripts share: Ctrl-C while they are still starting (importing torch) is one line, exit 130."""
import signal
import subprocess
import sys
import time

import pytest

from script_runner import ROOT, script_env

ARGS = {"sample.py": ["--prompt", "a cat"], "train.py": ["--help"], "bench.py": ["--tiny"],
        "weights.py": ["check", "."]}


@pytest.mark.parametrize("script", sorted(ARGS))
def test_ctrl_c_while_starting_up_is_one_line(tmp_path, script):
    process = subprocess.Popen([sys.executable, str(ROOT / script), *ARGS[script]], cwd=tmp_path, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch takes longer than this
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == f"{script}: interrupted", stderr
