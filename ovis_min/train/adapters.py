"""LoRA in training (train.py --lora RANK): the options' defaults and checks, and the two exports of a LoRA run.

A LoRA run trains only the adapters (ovis_min/lora.py) of its stage's part: its checkpoints hold the adapter
tensors by name (`<official module name>.lora_A.weight`, ...), their optimizer state and EMA, like any run's
trained weights. `train.py export RUN --lora-only --out X.safetensors` writes them as an adapter file for
sample.py --lora; the official-layout export (`train.py export RUN --out DIR`, and the last step of a run) merges
them into the frozen weights (ovis_min/train/checkpoint.py's write_export), so that it loads wherever the
official release loads.
"""
from pathlib import Path

from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from ..cli import TrainError
from ..lora import TARGETS, is_adapter, save_adapters
from .checkpoint import read_trained, read_trainer_state, resolve_resume, save_error, step_name
from .stages import STAGES

# The parts a LoRA run of each stage adapts by default (--lora-targets): what the stage trains. An understanding
# stage adapts the LLM; its visual encoder is left out unless asked for (--lora-targets llm encoder): it is
# large in activations, and a fine-tune on one's own questions rarely needs new visual features.
DEFAULT_TARGETS = {0: ("decoder", "refiner"), 1: ("head",), 2: ("encoder", "head"), 3: ("llm",),
                   4: ("decoder", "refiner"), 5: ("decoder", "refiner")}
LORA_ARGS = ("lora", "lora_alpha", "lora_targets")
# --lora-alpha's ceiling: common values are 1 to 2 x the rank (ranks up to a few hundred); far beyond, the scale
# alpha / rank overflows the adapters' bf16 outputs.
MAX_LORA_ALPHA = 4096.0


def fill_lora_defaults(args, trainer_state: dict | None) -> None:
    """--lora-alpha defaults to the rank (scale 1) and --lora-targets to the stage's part; what does not fit the
    stage is refused, and so is a resume with other LoRA settings: a run's adapters are its trained weights."""
    stage = STAGES[args.stage]
    if args.lora:
        if args.scratch:
            raise TrainError("--lora with --scratch: adapters fine-tune trained weights, which --scratch replaces "
                             "with random ones; leave one of them out")
        args.lora_alpha = float(args.lora) if args.lora_alpha is None else args.lora_alpha
        args.lora_targets = list(args.lora_targets or DEFAULT_TARGETS[args.stage])
        stray = [t for t in args.lora_targets if not TARGETS[t][0].startswith(stage.trains)]
        if stray:
            trained = [t for t in TARGETS if TARGETS[t][0].startswith(stage.trains)]
            raise TrainError(f"--lora-targets {' '.join(stray)}: stage {args.stage} ({stage.name}) trains "
                             f"{', '.join(trained)}, not {', '.join(stray)}")
    else:
        given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets))
                 if value is not None]
        if given:
            raise TrainError(f"{' and '.join(given)} without --lora RANK: give the adapters' rank, e.g. --lora 16")
    if trainer_state is not None:
        saved = trainer_state["args"]
        changed = [f"{key} {saved.get(key)} -> {vars(args)[key]}" for key in LORA_ARGS
                   if saved.get(key) != vars(args)[key]]
        if changed:
            raise TrainError(f"--resume: the run's adapters were made with other LoRA settings "
                             f"({'; '.join(changed)}); resume with the run's own, or start a new run with --init "
                             "from an export of it")


def export_adapters(run: Path, out: Path, ema: bool = False, step: int | None = None) -> Path:
    """`train.py export RUN --lora-only --out X.safetensors`: the adapters of the run's newest complete checkpoint
    (or of step `step`, or their EMA) as an adapter file."""
    step_dir, _ = resolve_resume(run if step is None else run / step_name(step), flag="export")
    args = read_trainer_state(step_dir)["args"]
    if not args.get("lora"):
        raise TrainError(f"export --lora-only: {step_dir} is not a LoRA run (trained without --lora); export it "
                         "without --lora-only")
    if out.exists():
        raise TrainError(f"export --out {out} already exists; choose another --out or remove it")
    # DCP also saves a frozen weight that is tied to another (lm_head): not an adapter
    adapters = {name: tensor for name, tensor in read_trained(step_dir, ema).items() if is_adapter(name)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_adapters(out, adapters, args["lora"], args["lora_alpha"], args["lora_targets"])
    except (OSError, SafetensorError, CheckpointException) as error:
        raise save_error(error, out, "export again") from None
    return out
