"""An exponential moving average of the trained weights, the copy that is usually sampled from at the end.

After every optimizer step: ema <- decay * ema + (1 - decay) * weight, in float32 whatever the training precision.
The copies have the parameters' own layout: under FSDP each rank averages only its shards (DTensors), so the EMA
costs 4 bytes per trained parameter divided by the number of processes, like the weights themselves.
"""
import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        """Starts equal to the trained parameters of `model` (those with requires_grad), by official name."""
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.weights = {name: p.detach().float().clone() for name, p in self.params.items()}
        # a tied name (lm_head, the input embedding's matrix) shares its parameter's average
        first = {id(p): name for name, p in self.params.items()}
        self.aliases = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
                        if id(p) in first and name not in self.params}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by official name, tied names included (the same tensor): what a checkpoint holds."""
        return {**self.weights, **{alias: self.weights[name] for alias, name in self.aliases.items()}}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.weights[name].lerp_(param.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def restart_from_weights(self) -> None:
        """ema = the current weights (a resumed run that had no EMA before)."""
        for name, param in self.params.items():
            self.weights[name].copy_(param.detach())
