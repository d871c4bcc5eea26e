"""Speculation methods by name: none, recycling, ngram, and '+' combinations of them."""

import enum
from dataclasses import dataclass

from .drafter import CombinedDrafter, Drafter
from .ngram import NgramDrafter
from .recycling import RecyclingDrafter


class SpecMethod(enum.Enum):
    NONE = "none"
    RECYCLING = "recycling"
    NGRAM = "ngram"
    MODEL = "model"


@dataclass(frozen=True)
class SpecConfig:
    method: str = "none"  # a SpecMethod value or several joined by '+', e.g. "ngram+recycling"
    max_draft_tokens: int = 0  # draft nodes per sequence and step; 0 = chosen per step by the latency model
    draft_model: str | None = None  # the `model` drafter's model (a --model style argument)

    def __post_init__(self):
        uses_model = SpecMethod.MODEL in parse_method(self.method)
        if uses_model and not self.draft_model:
            raise ValueError("spec method 'model' needs a draft model (--draft-model)")
        if self.draft_model and not uses_model:
            raise ValueError(f"a draft model is only used by spec method 'model', not {self.method!r}")
        if self.max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {self.max_draft_tokens}")


def parse_method(method: str) -> list[SpecMethod]:
    """'ngram+recycling' -> [NGRAM, RECYCLING]; ValueError naming the valid names otherwise."""
    valid = ", ".join(m.value for m in SpecMethod)
    try:
        parts = [SpecMethod(p.strip()) for p in method.split("+")]
    except ValueError:
        raise ValueError(f"unknown spec method {method!r} (valid: {valid}, or several joined by '+')") from None
    if len(parts) > 1 and SpecMethod.NONE in parts:
        raise ValueError(f"spec method 'none' cannot be combined, got {method!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"spec method {method!r} names a drafter twice")
    return parts


def build_drafter(method: str, vocab_size: int, model_drafter: Drafter | None = None) -> Drafter | None:
    """The drafter for a method; None for 'none'. model_drafter serves the 'model' part."""
    parts = parse_method(method)
    if parts == [SpecMethod.NONE]:
        return None
    if SpecMethod.MODEL in parts and model_drafter is None:
        raise ValueError("spec method 'model' needs a loaded draft model")
    factories = {
        SpecMethod.RECYCLING: lambda: RecyclingDrafter(vocab_size),
        SpecMethod.NGRAM: NgramDrafter,
        SpecMethod.MODEL: lambda: model_drafter,
    }
    drafters = [factories[m]() for m in parts]
    return drafters[0] if len(drafters) == 1 else CombinedDrafter(drafters)
