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


TRAIN_FREE = (SpecMethod.RECYCLING, SpecMethod.NGRAM)


@dataclass(frozen=True)
class SpecConfig:
    method: str = "none"  # a SpecMethod value or several joined by '+', e.g. "ngram+recycling"
    max_draft_tokens: int = 0  # draft nodes per sequence and step; 0 = chosen per step by the latency model

    def __post_init__(self):
        parse_method(self.method)
        if self.max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {self.max_draft_tokens}")

    @property
    def enabled(self) -> bool:
        return parse_method(self.method) != [SpecMethod.NONE]


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


def build_drafter(method: str, vocab_size: int) -> Drafter | None:
    """The drafter for a method; None for 'none'."""
    parts = parse_method(method)
    if parts == [SpecMethod.NONE]:
        return None
    factories = {SpecMethod.RECYCLING: lambda: RecyclingDrafter(vocab_size), SpecMethod.NGRAM: NgramDrafter}
    drafters = [factories[m]() for m in parts]
    return drafters[0] if len(drafters) == 1 else CombinedDrafter(drafters)
