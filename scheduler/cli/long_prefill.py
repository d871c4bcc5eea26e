"""Routing of long prompts to a local prefill group (`specserve generate --prefill-group-size N`).

A prompt that the LongPromptPolicy (scheduler/long_prompt.py) wants, counting the tokens not
already in the engine's prefix cache, is prefilled sequence-parallel by N local worker
processes (ring or Ulysses attention); its K/V goes to the engine as `prefix_kv`, so the engine
computes only the last prompt token. When the group fails (a member died twice), the engine
prefills that prompt itself: slower, never a failed request. The group is formed when the
router is made (re-formed after a member dies) and kept until `close`.
"""

import sys
from dataclasses import dataclass

from specserve.cluster.prefill_group import LocalPrefillGroup, PrefillGroupError
from specserve.workers.engine.llm_engine import LLMEngine
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.model.sequence_parallel import CheckpointModel, PrefillProgram, SequenceParallelMode

from specserve.scheduler.long_prompt import LongPromptPolicy


@dataclass(frozen=True)
class LongPrefillConfig:
    workers: int = 1  # prefill group size; 1 = off (the engine prefills every prompt itself)
    mode: SequenceParallelMode = SequenceParallelMode.RING
    policy: LongPromptPolicy = LongPromptPolicy()  # which prompts use the group

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--prefill-group-size must be >= 1, got {self.workers}")

    @property
    def enabled(self) -> bool:
        return self.workers > 1


class LongPrefillRouter:
    """prefix_kv(prompt_ids) for the engine: the group's K/V for a long prompt, else None."""

    def __init__(self, config: LongPrefillConfig, engine: LLMEngine, model: str, device: str = "cpu",
                 threads_per_worker: int | None = None, group: LocalPrefillGroup | None = None):
        """model: the --model argument each worker loads. group: a group to use instead of the
        local one built here (tests)."""
        self.config, self.engine = config, engine
        if config.mode is SequenceParallelMode.ULYSSES:
            from specserve.kernels.ulysses_attention import kv_heads_for_ranks

            mc = engine.model.config
            kv_heads_for_ranks(mc.num_heads, mc.num_kv_heads, config.workers)  # a clear error before any spawn
        if group is None:
            program = PrefillProgram(CheckpointModel(model, engine.model.dtype, device), config.mode,
                                     threads_per_worker or 1)
            group = LocalPrefillGroup(program, config.workers, device)
        self.group = group
        if config.enabled:
            self.group.start()  # the workers load the model now: like the engine's load, not in any prompt's time
        self.prefilled = 0  # prompts the group prefilled
        self.failed = 0  # prompts the group failed (the engine prefilled them)

    def uncached_tokens(self, prompt_ids: list[int], cache_salt: str = "") -> int:
        """Prompt tokens past the leading blocks this engine already holds."""
        held = 0
        if self.engine.config.prefix_caching:
            for key in self.engine.block_keys(prompt_ids, cache_salt):
                if not self.engine.kv.allocator.is_cached(key):
                    break
                held += 1
        return len(prompt_ids) - held * self.engine.config.block_size

    def prefix_kv(self, prompt_ids: list[int], cache_salt: str = "") -> PrefixKV | None:
        """None when the engine should prefill itself (it then asks the shared cache as usual);
        the shared cache's blocks when they leave a prompt the policy does not want; else the
        group's K/V of the whole prompt (the group does not start from cached K/V)."""
        policy = self.config.policy
        if not self.config.enabled or not policy.wants(self.uncached_tokens(prompt_ids, cache_salt)):
            return None
        shared = self.engine.lookup_shared_prefix(prompt_ids, cache_salt)  # Redis (L2), past what L1 holds
        if shared is not None and not policy.wants(len(prompt_ids) - shared.end):
            return shared
        try:
            kv = self.group.run(prompt_ids)[0]  # a dead member is retried once on a re-formed group
        except PrefillGroupError as e:
            self.failed += 1
            print(f"specserve: warning: prefill group failed ({str(e).splitlines()[0]}); "
                  "the engine prefills this prompt itself", file=sys.stderr)
            return None
        self.prefilled += 1
        return kv

    def close(self) -> None:
        self.group.close()
