"""Speculation methods by name: none, recycling, ngram, suffix, model, '+' combinations of them,
and auto (suffix, ngram and recycling mixed per request by their observed acceptance)."""

import enum
from dataclasses import dataclass

from specserve.workers.spec.drafter import CombinedDrafter, Drafter
from specserve.workers.spec.drafter_mix import DrafterMix
from specserve.workers.spec.ngram import NgramDrafter
from specserve.workers.spec.recycling import DEFAULT_TEMPLATE, RecyclingDrafter, find_template
from specserve.workers.spec.suffix import SuffixDrafter


class SpecMethod(enum.Enum):
    NONE = "none"
    RECYCLING = "recycling"
    NGRAM = "ngram"
    MODEL = "model"
    SUFFIX = "suffix"
    AUTO = "auto"  # suffix, ngram and recycling, node budgets per request by observed acceptance


# The fastest lossless train-free method measured (`specserve bench spec`, SmolLM2-135M, 2 CPU
# threads, 20 HumanEval + 20 ShareGPT prompts): ngram 2.20x HF generate, ngram+recycling 2.16x,
# recycling 1.82x. See README "Speculative decoding".
DEFAULT_TRAIN_FREE_METHOD = SpecMethod.NGRAM.value


def default_method(draft_model: str | None) -> str:
    """The method used when none is named: the draft model's if one is given, else the default."""
    return SpecMethod.MODEL.value if draft_model else DEFAULT_TRAIN_FREE_METHOD


@dataclass(frozen=True)
class SpecConfig:
    method: str = "none"  # a SpecMethod value or several joined by '+', e.g. "ngram+recycling"
    max_draft_tokens: int = 0  # draft nodes per sequence and step; 0 = chosen per step by the latency model
    draft_model: str | None = None  # the `model` drafter's model (a --model style argument)
    template: str = DEFAULT_TEMPLATE  # the recycling drafter's tree template: a shipped name or a JSON path
    # The speculation gate (spec_gate.py) turns drafting off where it measurably does not pay;
    # False drafts on every decode step whatever it measures (tests, and workloads known to pay).
    gate: bool = True

    def __post_init__(self):
        parts = parse_method(self.method)
        if SpecMethod.RECYCLING in parts or SpecMethod.AUTO in parts:
            find_template(self.template)  # a bad template is an error before any model loads
        uses_model = SpecMethod.MODEL in parts
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
    for alone in (SpecMethod.NONE, SpecMethod.AUTO):
        if len(parts) > 1 and alone in parts:
            raise ValueError(f"spec method {alone.value!r} cannot be combined, got {method!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"spec method {method!r} names a drafter twice")
    return parts


def build_drafter(spec: SpecConfig, vocab_size: int, model_drafter: Drafter | None = None) -> Drafter | None:
    """The drafter for a method; None for 'none'. model_drafter serves the 'model' part."""
    parts = parse_method(spec.method)
    if parts == [SpecMethod.NONE]:
        return None
    if SpecMethod.MODEL in parts and model_drafter is None:
        raise ValueError("spec method 'model' needs a loaded draft model")

    def recycling() -> RecyclingDrafter:
        return RecyclingDrafter(vocab_size, find_template(spec.template))

    factories = {
        SpecMethod.RECYCLING: recycling,
        SpecMethod.NGRAM: NgramDrafter,
        SpecMethod.MODEL: lambda: model_drafter,
        SpecMethod.SUFFIX: SuffixDrafter,
        SpecMethod.AUTO: lambda: DrafterMix([SuffixDrafter(), NgramDrafter(), recycling()]),
    }
    drafters = [factories[m]() for m in parts]
    return drafters[0] if len(drafters) == 1 else CombinedDrafter(drafters)
