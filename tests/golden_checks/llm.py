"""Golden check of the Qwen3 decoder (ovis_min/llm.py) against the official forward."""
import torch

from ovis_min.llm import Qwen3


def check_llm(case):
    llm = Qwen3(case.config().llm)
    llm.load_state_dict(case.state_dict(case.meta.get("weight_keys_prefix", "llm.")), strict=True)
    llm.eval()
    attention_mask = case.input(case.meta["compare_mask_input"])
    valid = attention_mask.bool()  # (B, L): outputs at left-padding positions are undefined
    inputs = {"ids": dict(input_ids=case.input("input_ids")), "embeds": dict(inputs_embeds=case.input("inputs_embeds"))}
    with torch.no_grad():
        for source, given in inputs.items():
            # The official call passes no position_ids: 0..L-1 for every row, the padded one included.
            case.expect(f"{source}_logits", llm(**given, attention_mask=attention_mask), where=valid)
            states = llm.hidden_states(**given, attention_mask=attention_mask)
            stored = sorted(int(n.rsplit(".", 1)[1]) for n in case.outputs() if n.startswith(f"{source}_hidden_states."))
            assert stored == list(range(len(states))), f"stored hidden states {stored}, ovis-min has {len(states)}"
            for i, state in enumerate(states):
                case.expect(f"{source}_hidden_states.{i}", state, where=valid)
