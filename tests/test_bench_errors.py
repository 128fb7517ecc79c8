"""bench.py's bad inputs, each run as its own process: a non-zero exit and one line naming the flag, checked
before any workload runs (and before the --json file would be written)."""
import pytest

from script_runner import one_line_error, run_script

BAD_INPUTS = [
    (["--dtype", "int8"], ["--dtype"]),
    (["--device", "toaster"], ["--device"]),
    (["--device", "cuda"], ["--device"]),
    (["--device", "cuda:3"], ["--device"]),
    (["--device", "mps"], ["--device"]),
    (["--size", "0"], ["--size"]),
    (["--size", "-16"], ["--size"]),
    (["--size", "40"], ["--size", "16"]),
    (["--size", "abc"], ["--size"]),
    (["--size", "100000"], ["--size", "at most"]),
    (["--only", "W9"], ["W9"]),
    (["--only", "W1,"], ["workloads"]),
    (["--only", "w1"], ["w1"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "1000000000"], ["--steps", "at most"]),
    (["--decode-tokens", "0"], ["--decode-tokens"]),
    (["--decode-tokens", "1000000000"], ["--decode-tokens", "at most"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--repeat", "0"], ["--repeat"]),
    (["--repeat", "1.5"], ["--repeat"]),
    (["--threads", "-1"], ["--threads"]),
    (["--threads", "two"], ["--threads"]),
    (["--json", "{tmp}/no/such/folder/b.json"], ["--json"]),
    (["--json", "{tmp}"], ["--json"]),
    (["--json", "{tmp}/a-file/b.json"], ["--json"]),
    (["--frobnicate"], ["--frobnicate"]),
]


@pytest.mark.parametrize("args,names", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, args, names):
    (tmp_path / "a-file").write_text("")
    result = run_script("bench.py", "--tiny", *[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert one_line_error(result, *names), (result.returncode, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bench.py: error: ") and all(n in last for n in names), result.stderr
    assert result.stdout == ""  # nothing was measured


def test_full_model_in_bf16_on_a_cpu_without_native_bf16_is_refused(tmp_path):
    """An AVX2-only CPU, as torch and oneDNN are told to behave (the probe measures the real slowdown)."""
    result = run_script("bench.py", "--dtype", "bf16", "--device", "cpu", cwd=tmp_path, fresh=True,
                        env={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert one_line_error(result, "--dtype bf16", "--dtype fp32"), result.stderr[-2000:]
