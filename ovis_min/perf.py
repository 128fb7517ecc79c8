"""Measuring speed: FLOPs counted by torch, the machine's ceilings, timing and peak memory.

bench.py reports every workload with these; train.py's MFU (throughput.py) counts with the same formulas
(FLOP_FORMULAS), on the forward only, since a counter around the backward would change how it rounds.

FLOPs are what torch's FlopCounterMode counts while the call runs: 2*M*N*K per matrix product (and per
convolution, counted the same way), 4*B*H*Lq*Lk*D per attention forward and 2.5 times that for its backward,
element-wise work free. It counts the shapes that run, so a batched call counts its padding too: to count only
useful work, count the call without padding (bench.py counts each guidance branch alone).
"""
import platform
import sys
import time
from typing import Callable

try:
    import resource
except ImportError:  # Windows
    resource = None

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count,
                                     shape_wrapper)

aten = torch.ops.aten

# FlopCounterMode knows the CUDA attention kernels but not the CPU's fused one, which SDPA uses for float32,
# bf16 and fp16 on a CPU: without these it would count CPU attention as free. The shapes are (B, H, L, D).
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad_out, query, key, value),
}


# Every op's formula, by op: FlopCounterMode's own and the CPU attention above, in the form its registry keeps.
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in CPU_ATTENTION_FLOPS.items()}}


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs of `fn()`, run once for real (a `.backward()` inside it counts the backward too)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> list[float]:
    """Wall-clock seconds of `repeat` calls of fn() after `warmup` untimed ones, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class Ceilings:
    """This machine's matmul FLOP/s in `dtype` (an n^3 matmul) and its copy bandwidth, each the best seen over
    all the times `measure` is called.

    n is chosen once: doubled from 256 until one matmul takes 20 ms (or n reaches 4096), so a measurement costs
    a fraction of a second on any machine while the matmul is still large enough to run at the kernel's peak.
    Copy bandwidth is bytes copied per second, for a tensor much larger than the caches: the copy reads and
    writes that many bytes each, so the memory traffic is twice this number. A decode only reads.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, megabytes: int = 512):
        self.device, self.dtype, self.numel = device, dtype, megabytes * 2 ** 20 // 4
        self.flops = self.bandwidth = 0.0
        self.n = 256
        while self.n < 4096 and self._matmul_seconds(self.n, repeat=1) < 0.02:
            self.n *= 2

    def _matmul_seconds(self, n: int, repeat: int) -> float:
        # allocated here and freed on return, so they are not in any workload's peak memory
        a, b = (torch.randn(n, n, device=self.device).to(self.dtype) for _ in range(2))
        return min(seconds(lambda: a @ b, self.device, repeat=repeat))

    def measure(self, repeat: int = 2) -> None:
        self.flops = max(self.flops, 2 * self.n ** 3 / self._matmul_seconds(self.n, repeat))
        src = torch.ones(self.numel, device=self.device)
        dst = torch.empty_like(src)
        self.bandwidth = max(self.bandwidth, self.numel * 4 / min(seconds(lambda: dst.copy_(src), self.device,
                                                                          repeat=repeat)))


def bf16_slowdown_on_cpu() -> float:
    """How many times slower a bf16 matmul runs than a float32 one on this CPU (a 256^3 probe, milliseconds).

    CPUs without native bf16 (AVX2 only, no AVX512-BF16 or AMX) emulate it: ~400x slower at 4096^3, so a
    full-size bf16 benchmark there would run for hours. One thread and the best of several runs, so that another
    busy process on the machine cannot hide the difference.
    """
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        fp32 = min(seconds(lambda: a @ a, cpu, repeat=10))
        b = a.bfloat16()
        return min(seconds(lambda: b @ b, cpu, repeat=3)) / fp32
    finally:
        torch.set_num_threads(threads)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


# -- peak memory: max allocated on a GPU, peak resident set size on the CPU (both include the weights) --------------

def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: on CUDA the allocator's; on Linux the process's peak RSS (elsewhere it cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes since the last `reset_peak_memory` (or since the start): CUDA max allocated, MPS driver
    memory, CPU peak resident set size; None where the system does not tell (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the lifetime peak: KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024)


def peak_memory_gb(device: torch.device) -> float:
    """`peak_memory` in GB (1e9 bytes); 0.0 where it is unknown."""
    return (peak_memory(device) or 0) / 1e9
