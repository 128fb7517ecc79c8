"""How fast a run goes: the time left (ETA) and the model FLOPs utilisation (MFU) of the log line.

FLOPs are counted on the forward pass of the first micro-batch of each kind (the tasks it holds), with the FLOP
formulas of torch.utils.flop_counter.FlopCounterMode that bench.py counts with (perf.FLOP_FORMULAS). Its backward is
not run under the counter: a Python dispatch mode makes autograd take other (equal but differently rounded) backward
formulas, and a resumed run would then no longer repeat the uninterrupted one exactly. The backward is charged
instead per operation: a matrix product's backward is one product of the same size per operand that needs a gradient
(the input's, the weight's), so an operation run with gradients enabled costs its forward FLOPs times 1 + min(2, its
inputs that require a gradient); under no_grad (the frozen VAE, a frozen condition) times 1. Recomputation under
--grad-checkpointing is not counted: this is the model's FLOPs, not the hardware's. Later micro-batches of a kind
are charged its FLOPs per token times their tokens, since their lengths vary.

MFU divides the achieved FLOP/s by the accelerator's dense peak from PEAK_TFLOPS; a CPU or an accelerator missing
from the table has no MFU, only the achieved TFLOP/s. A step's time runs from its first micro-batch to its logged
losses: validation, samples and checkpoints are left out of it (and of the ETA).
"""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..perf import FLOP_FORMULAS

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets: bf16 on tensor cores, and plain fp32
# (float32 matmuls do not use TF32 unless torch is told to). Matched in order against torch's device name, so a
# more specific name comes first.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.0, "fp32": 82.6}),
)
RECENT_STEPS = 20  # the ETA's mean step time is taken over this many most recent steps


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s at `precision` ("bf16" or "fp32"), or None when it is not known (any CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision] * 1e12
    return None


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the operations run under it, forward and (as estimated above) backward."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            forward = formula(*args, **kwargs, out_val=result)
            needs_grad = sum(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            self.flops += forward * (1 + min(2, needs_grad) if torch.is_grad_enabled() else 1)
        return result


class Throughput:
    """Per step: FLOPs of this process's micro-batches; per log line: ETA, achieved TFLOP/s and MFU."""

    def __init__(self, peak: float | None):
        self.peak = peak  # FLOP/s of one process's device
        self.flops_per_token: dict[str, float] = {}
        self.step_flops = 0.0
        self.step_times = collections.deque(maxlen=RECENT_STEPS)
        self._counter = None

    def counting(self, kind: str):
        """Wrap a micro-batch's forward (not its backward): counts its FLOPs if none of `kind` were counted yet."""
        if kind in self.flops_per_token:
            return contextlib.nullcontext()
        self._counter = FlopCounter()
        return self._counter

    def micro_batch(self, kind: str, tokens: int) -> None:
        """Charge a micro-batch of `tokens` tokens to the step (after `counting`)."""
        if self._counter is not None:
            self.flops_per_token[kind] = self._counter.flops / max(1, tokens)
            self._counter = None
        self.step_flops += self.flops_per_token[kind] * tokens

    def end_step(self, seconds: float, total_flops: float, world: int, steps_left: int) -> dict:
        """The log record's speed fields; `total_flops`: the step's FLOPs summed over the `world` processes."""
        self.step_times.append(seconds)
        self.step_flops = 0.0
        achieved = total_flops / seconds / world  # per process
        return {"step_s": seconds, "eta_s": steps_left * sum(self.step_times) / len(self.step_times),
                "tflops": achieved / 1e12, "mfu": achieved / self.peak if self.peak else None}


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h{minutes:02d}m" if days else f"{hours}:{minutes:02d}:{secs:02d}"
