"""Several processes (torchrun): the process group, DDP or FSDP2 around the training step, and the few
collectives the training loop needs. With one process every function here is a no-op."""
import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


# Work that one rank does while the others wait for it (indexing new manifests, the export at the end of a run,
# the ranks of `train.py cache` finishing their shares far apart) takes minutes to hours at scale: the others wait
# on a gloo group of their own with this timeout, never in a collective of the training step's group, whose
# timeout (--dist-timeout; NCCL's own default is 10 minutes) is there to end a hung step. A rank that dies is
# noticed by torchrun, which stops the others: this timeout only ends a wait on a rank stuck alive.
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    waits: dist.ProcessGroup | None = None  # gloo, WAIT_TIMEOUT: see wait_for_every_rank

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str | None, timeout: timedelta) -> Runtime:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then join the process group (NCCL on GPU, gloo on CPU), whose
    collectives give up after `timeout`, and make the group of long waits."""
    use_cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if "RANK" not in os.environ:
        return Runtime(0, 1, torch.device(device_name or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    waits = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, waits)


def wait_for_every_rank(runtime: Runtime) -> None:
    """A barrier for the end of one rank's long work (see WAIT_TIMEOUT)."""
    if runtime.world > 1:
        dist.barrier(group=runtime.waits)


@contextlib.contextmanager
def main_rank_first(runtime: Runtime):
    """Rank 0 runs the block, then the others (e.g. rank 0 writes files that the others then read)."""
    if not runtime.main:
        wait_for_every_rank(runtime)
    yield
    if runtime.main:
        wait_for_every_rank(runtime)


def wrap(step_module: nn.Module, runtime: Runtime, parallel: str, precision: str, uses_generator: bool
         ) -> nn.Module:
    """DDP ("ddp"), or FSDP2 ("fsdp", for training the LLM): one shard group per transformer block (LLM, encoder,
    and the decoder's if the run uses the decoder) plus the root for the rest. `step_module.model` is the OvisU1
    the step runs."""
    if runtime.world == 1:
        return step_module
    if parallel == "ddp":
        # the gradients are views into DDP's reduction buckets instead of a second copy of them
        return nn.parallel.DistributedDataParallel(step_module, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard
    model = step_module.model
    decoder, vae = model.visual_generator.backbone, model.visual_generator.vae
    blocks = [*model.llm.model.layers, *model.visual_tokenizer.backbone.trunk.blocks]
    ignored = set(vae.parameters())  # small, frozen, convolutional: whole on every process, never gathered
    if uses_generator:
        blocks += [*decoder.double_blocks, *decoder.single_blocks, *decoder.txt_in.individual_token_refiner.blocks]
    else:  # unused, kept in CPU memory (stages.apply_memory_policy): not part of the sharded model at all
        ignored |= set(decoder.parameters())
    for block in blocks:
        fully_shard(block, mp_policy=precision_policy(block, precision))
    fully_shard(step_module, mp_policy=precision_policy(step_module, precision), ignored_params=ignored)
    return step_module


def precision_policy(module: nn.Module, precision: str):
    """bf16: weights gathered and used in bf16, gradients reduced in float32 (a bf16 sum over many processes
    loses the small ones); the sharded master weights and the optimizer stay float32. A frozen block has no
    gradient to reduce (and FSDP, given a reduce dtype, would look for one in blocks a micro-batch left unused)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision != "bf16":
        return MixedPrecisionPolicy()
    trains = any(p.requires_grad for p in module.parameters())
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32 if trains else None)


def gradient_sync(module: nn.Module, sync: bool):
    """DDP reduces gradients on the last pass of a step only (its gradients are whole on every rank anyway).
    FSDP reduce-scatters after every pass, as torchtitan does: skipping it would keep an unsharded float32
    gradient of every trained weight from pass to pass, the memory FSDP is there to save."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float | torch.Tensor], runtime: Runtime) -> list[float]:
    """The sums over the processes of Python numbers and 0-dim tensors on the device, read back in one copy: the
    training loop's one wait for the accelerator per step."""
    tensor = torch.stack([torch.as_tensor(v, device=runtime.device).to(torch.float64).reshape(()) for v in values])
    if runtime.world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(values: list[int], runtime: Runtime) -> list[int]:
    """The elementwise maxima over the processes of a list of whole numbers."""
    tensor = torch.tensor(values, dtype=torch.int64, device=runtime.device)
    if runtime.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of `tensors` is finite (of a DTensor: this rank's shard), as a 0-dim bool tensor on
    their device: no wait for the accelerator."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return torch.stack([torch.isfinite(t).all() for t in local]).all()


def all_gather(obj, runtime: Runtime) -> list:
    if runtime.world == 1:
        return [obj]
    gathered = [None] * runtime.world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj, runtime: Runtime):
    """The first process's `obj` (picklable), on every process."""
    if runtime.world == 1:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def fingerprint(model: nn.Module, leave_out: str | None = None) -> str:
    """A hash of every parameter's bytes (but those whose name starts with `leave_out`): equal across ranks iff
    the replicas are bit-identical."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if leave_out is not None and name.startswith(leave_out):
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
