"""What one model forward runs: the flat batch of new slots of many sequences."""

from dataclasses import dataclass

import torch

from specserve.kernels.paged_layout import BatchLayout, build_batch_layout

from specserve.workers.engine.kv_cache import BlockTable, PagedKVCache


@dataclass
class SequenceSlots:
    """One sequence's part of a forward: new tokens appended after what its table holds."""

    table: BlockTable  # the sequence's blocks; the forward appends len(token_ids) slots to it
    token_ids: list[int]  # new tokens, in slot order
    positions: list[int] | None = None  # default: consecutive after the table's tokens
    tree_mask: torch.Tensor | None = None  # [n, R] bool over the last R keys (R >= n); None = causal
    logits_rows: list[int] | None = None  # which of the new slots need logits; None = the last


@dataclass(frozen=True)
class ForwardBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot that receives each new slot's key/value
    layout: BatchLayout
    logits_index: torch.Tensor  # [L] flat slots whose logits the forward returns, in sequence order
    logits_counts: list[int]  # per sequence, how many of the L rows are its own

    @property
    def num_slots(self) -> int:
        return self.token_ids.numel()


def build_forward_batch(
    seqs: list[SequenceSlots],
    kv: PagedKVCache,
    sliding_window: int | None = None,
    device: str | torch.device = "cpu",
) -> ForwardBatch:
    """Reserves cache slots for every sequence's new tokens and lays the batch out.

    Appends to each table; the caller checked with `PagedKVCache.blocks_needed` that they fit.
    """
    token_ids, positions, slot_mapping, kv_slots, logits_index, counts = [], [], [], [], [], []
    num_new, trees, query_positions = [], [], []
    offset = 0
    for seq in seqs:
        n = len(seq.token_ids)
        if n == 0:
            raise ValueError("a sequence in a forward batch has no new tokens")
        first = seq.table.num_tokens
        pos = torch.tensor(seq.positions, dtype=torch.long) if seq.positions is not None else torch.arange(first, first + n)
        slot_mapping.append(kv.append(seq.table, n))
        kv_slots.append(kv.slots(seq.table, 0, seq.table.num_tokens).to(device))
        token_ids.extend(seq.token_ids)
        positions.append(pos)
        rows = seq.logits_rows if seq.logits_rows is not None else [n - 1]
        logits_index.extend(offset + r for r in rows)
        counts.append(len(rows))
        num_new.append(n)
        trees.append(seq.tree_mask)
        query_positions.append(pos.to(device))
        offset += n
    layout = build_batch_layout(kv_slots, num_new, trees, query_positions, sliding_window)
    return ForwardBatch(
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slot_mapping).to(device),
        layout=layout,
        logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        logits_counts=counts,
    )
