"""Which way a prompt's K/V is computed before its verify worker decodes it.

- prompts of more than the group's threshold (LongPromptPolicy), with a sequence-parallel prefill group and no draft
  worker (the group prefills the target only): the group (scheduler/ray/prefill_group.py);
- prompts of at least `threshold` tokens: a PrefillWorker, taken in turn, for the target's and
  (with a draft worker) the draft model's K/V;
- shorter prompts: none, the verify worker prefills them itself.

What is handed on are ObjectRefs, never the tensors: they go from the prefill node to the workers.
"""

import itertools
from dataclasses import dataclass

from specserve.scheduler.ray.prefill_group import RayPrefillGroup


@dataclass(frozen=True)
class PrefillHandoff:
    prefix: list | None = None  # [ObjectRef of the target's PrefixKV]; None: the verify worker prefills
    draft_prefix: list | None = None  # [ObjectRef of the draft model's PrefixKV], with a draft worker


class PrefillRouter:
    def __init__(self, handles: list, threshold: int, with_draft: bool, group: RayPrefillGroup | None = None):
        """handles: PrefillWorker actors; with_draft: the model drafter runs in a DraftWorker."""
        self.handles, self.threshold, self.with_draft, self.group = handles, threshold, with_draft, group
        self._turn = itertools.count()

    async def handoff(self, prompt_ids: list[int]) -> PrefillHandoff:
        if self.group is not None and not self.with_draft and self.group.wants(prompt_ids):
            return PrefillHandoff(await self.group.prefill(prompt_ids))
        if not self.handles or len(prompt_ids) < self.threshold:
            return PrefillHandoff()
        handle = self.handles[next(self._turn) % len(self.handles)]
        target, draft = handle.prefill.options(num_returns=2).remote(prompt_ids, self.with_draft)
        return PrefillHandoff([target], [draft] if self.with_draft else None)
