"""Which prompts a sequence-parallel prefill group computes: one rule for `generate` and `serve`.

A prompt goes to the group when more than `threshold` of its tokens have to be computed, i.e.
are not already cached. `generate` (scheduler/cli/long_prefill.py) counts what the engine's
prefix cache does not hold; `serve` over Ray (scheduler/ray/prefill_group.py) cannot see a
verify worker's cache, so there every prompt token counts as uncached. The group computes the
K/V of every prompt token but the last, so a threshold of 1 (the least) still leaves it work.
"""

from dataclasses import dataclass

DEFAULT_LONG_PROMPT_THRESHOLD = 4096


@dataclass(frozen=True)
class LongPromptPolicy:
    threshold: int = DEFAULT_LONG_PROMPT_THRESHOLD  # prompts with more uncached tokens than this use the group

    def __post_init__(self):
        if self.threshold < 1:
            raise ValueError(f"long prompt threshold (--long-prompt-threshold) must be >= 1, got {self.threshold}")

    def wants(self, uncached_tokens: int) -> bool:
        """True when a prompt with this many tokens still to compute goes to the prefill group."""
        return uncached_tokens > self.threshold
