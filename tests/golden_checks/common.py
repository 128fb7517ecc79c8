"""Building the whole tiny model of a golden case from its config and official weights."""
from ovis_min.model import OvisU1


def load_model(case) -> OvisU1:
    model = OvisU1(case.config()).eval()
    model.load_state_dict(case.state_dict(), strict=True)
    return model
