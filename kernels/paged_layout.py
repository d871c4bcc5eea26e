"""Who attends to whom in one flat forward over many sequences.

A forward runs T new *slots* from B sequences, concatenated in sequence order. Sequence b
has P_b keys already in the paged cache (its prefix) and Q_b new slots whose keys are
written before attention, so it attends over K_b = P_b + Q_b keys. Among the new slots the
pattern is causal, or a draft tree's mask (slot i sees slot j iff j is i or an ancestor).

Example, two sequences: a decode step (P=5, Q=1) and a 3-node tree (P=2) drawn as
    r ─ a        (a, b are children of the root r)
      └ b
The tree's mask over its new slots [r, a, b] is [[1,0,0],[1,1,0],[1,0,1]].

A mask may also cover earlier keys: [Q, R] with R > Q describes the last R keys, of which
the new slots are the last Q (a draft model growing a tree level by level attends to the
tree nodes it wrote at earlier levels, but not to their siblings).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedAttentionLayout:
    q_index: torch.Tensor  # [B, Q] flat slot of sequence b's i-th query (padding repeats its last)
    kv_slots: torch.Tensor  # [B, K] cache slot of sequence b's j-th key (padding repeats key 0)
    mask: torch.Tensor | None  # [B, 1, Q, K] bool, True = may attend; None: see `causal`
    causal: bool  # only with mask None: True = causal over Q == K keys, False = every key
    out_index: torch.Tensor | None  # [T] row of each flat slot in the (B*Q) output; None = same order
    dense_kv_start: int | None  # B == 1 and kv_slots[0] == arange(start, start + K): slice, not gather

    @property
    def is_dense_single(self) -> bool:
        return self.dense_kv_start is not None


def build_paged_layout(
    kv_slots: list[torch.Tensor],  # per sequence: [K_b] cache slots, prefix keys then new slots
    num_new: list[int],  # per sequence: Q_b, the new slots (the last Q_b of its keys)
    tree_masks: list[torch.Tensor | None] | None = None,  # per sequence: [Q_b, R_b] bool over its last R_b keys, or None = causal
    query_positions: list[torch.Tensor] | None = None,  # per sequence: [Q_b], needed with a sliding window
    sliding_window: int | None = None,
) -> PagedAttentionLayout:
    """Builds the gather indices and mask for `paged_attention`. Every Q_b >= 1."""
    num_seqs = len(kv_slots)
    if num_seqs == 0 or len(num_new) != num_seqs:
        raise ValueError(f"need one num_new per sequence, got {len(num_new)} for {num_seqs}")
    tree_masks = tree_masks if tree_masks is not None else [None] * num_seqs
    device = kv_slots[0].device
    key_lens = [int(s.numel()) for s in kv_slots]
    for q_len, k_len in zip(num_new, key_lens):
        if not 1 <= q_len <= k_len:
            raise ValueError(f"a sequence has {q_len} new slots but {k_len} keys")
    max_q, max_k = max(num_new), max(key_lens)

    q_rows, kv_rows = [], []
    offset = 0
    for q_len, slots in zip(num_new, kv_slots):
        rows = torch.arange(offset, offset + max_q, device=device).clamp_(max=offset + q_len - 1)
        q_rows.append(rows)
        kv_rows.append(torch.cat([slots, slots[:1].expand(max_k - slots.numel())]))
        offset += q_len
    q_index = torch.stack(q_rows)  # (B, Q)
    kv_index = torch.stack(kv_rows)  # (B, K)

    out_index = None
    if any(q_len != max_q for q_len in num_new):
        out_index = torch.cat([b * max_q + torch.arange(q, device=device) for b, q in enumerate(num_new)])

    dense_start = None
    if num_seqs == 1:
        first = int(kv_index[0, 0])
        if torch.equal(kv_index[0], torch.arange(first, first + max_k, device=device)):
            dense_start = first

    window_binds = sliding_window is not None and max_k > sliding_window
    if num_seqs == 1 and not window_binds and tree_masks[0] is None:
        if max_q == 1:
            return PagedAttentionLayout(q_index, kv_index, None, False, out_index, dense_start)
        if max_q == max_k:
            return PagedAttentionLayout(q_index, kv_index, None, True, out_index, dense_start)

    mask = torch.zeros(num_seqs, 1, max_q, max_k, dtype=torch.bool, device=device)
    for b, (q_len, k_len, tree) in enumerate(zip(num_new, key_lens, tree_masks)):
        new = tree.to(device=device, dtype=torch.bool) if tree is not None else None
        if new is None:
            new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril_()
        elif new.dim() != 2 or new.shape[0] != q_len or not q_len <= new.shape[1] <= k_len:
            raise ValueError(f"tree mask has shape {tuple(new.shape)}, expected ({q_len}, R) with {q_len} <= R <= {k_len}")
        prefix = k_len - new.shape[1]
        mask[b, 0, :q_len, :prefix] = True
        mask[b, 0, :q_len, prefix:k_len] = new
        if window_binds:
            if query_positions is None or new.shape[1] != q_len:
                raise ValueError("a sliding window needs query_positions and a mask over the new slots only")
            q_pos = query_positions[b].to(device)  # (Q_b,)
            k_pos = torch.cat([torch.arange(prefix, device=device), q_pos])  # (K_b,)
            mask[b, 0, :q_len, :k_len] &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
        mask[b, 0, q_len:] = mask[b, 0, q_len - 1]  # padded query rows copy a real one: no empty rows
    return PagedAttentionLayout(q_index, kv_index, mask, False, out_index, dense_start)


# Sequences share one padded attention call only while the longest is at most this many times
# the shortest, in keys and in new slots. Padding is wasted gather and math (on a CPU the math
# dominates even for one query, so a draft tree never pads decode steps); every extra call costs
# a fixed overhead. SmolLM2, 16 sequences decoding with 76..700 keys, 2 CPU threads: a step took
# 179 ms as one padded call, 110 ms grouped at ratio 2.0, 101 ms at 1.25.
MAX_PAD_RATIO = 1.25


@dataclass(frozen=True)
class LayoutGroup:
    slots: torch.Tensor | None  # [T_g] flat slots of the group's sequences, in order; None = all T slots
    layout: PagedAttentionLayout  # over the group's sequences only (its q_index counts within the group)


@dataclass(frozen=True)
class BatchLayout:
    """A forward's attention as groups of sequences of similar lengths, one padded call each."""

    groups: tuple[LayoutGroup, ...]


def group_sequences(num_new: list[int], key_lens: list[int], max_ratio: float = MAX_PAD_RATIO) -> list[list[int]]:
    """Sequence indices in groups whose new-slot and key counts are within max_ratio of each other."""
    order = sorted(range(len(num_new)), key=lambda b: (num_new[b], key_lens[b]))
    groups: list[list[int]] = []
    for b in order:
        if groups:
            group = groups[-1]
            q_lo, k_lo = num_new[group[0]], min(key_lens[g] for g in group)
            k_hi = max(key_lens[g] for g in group)
            if num_new[b] <= max_ratio * q_lo and max(k_hi, key_lens[b]) <= max_ratio * min(k_lo, key_lens[b]):
                group.append(b)
                continue
        groups.append([b])
    return [sorted(g) for g in groups]


def build_batch_layout(
    kv_slots: list[torch.Tensor],
    num_new: list[int],
    tree_masks: list[torch.Tensor | None] | None = None,
    query_positions: list[torch.Tensor] | None = None,
    sliding_window: int | None = None,
    max_ratio: float = MAX_PAD_RATIO,
) -> BatchLayout:
    """build_paged_layout per group of similar sequences (arguments as there)."""
    tree_masks = tree_masks if tree_masks is not None else [None] * len(kv_slots)
    groups = group_sequences(num_new, [int(s.numel()) for s in kv_slots], max_ratio)
    if len(groups) == 1:
        return BatchLayout((LayoutGroup(None, build_paged_layout(kv_slots, num_new, tree_masks, query_positions,
                                                                 sliding_window)),))
    device = kv_slots[0].device
    offsets = [0]
    for n in num_new:
        offsets.append(offsets[-1] + n)
    built = []
    for group in groups:
        pick = lambda xs: [xs[b] for b in group] if xs is not None else None  # noqa: E731
        layout = build_paged_layout(pick(kv_slots), pick(num_new), pick(tree_masks), pick(query_positions),
                                    sliding_window)
        slots = torch.cat([torch.arange(offsets[b], offsets[b + 1], device=device) for b in group])
        built.append(LayoutGroup(slots, layout))
    return BatchLayout(tuple(built))
