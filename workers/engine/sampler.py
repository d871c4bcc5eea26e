"""Token choice from logits: greedy, or temperature / top-k / top-p sampling by an exponential race
against the request's noise for that position (Sequence.noise: a seeded request samples the same
tokens however it is stepped, speculated or resubmitted).

Any finite temperature > 0 gives a distribution: the logits are shifted so the largest is 0
before dividing, so a tiny temperature sends the others to -inf (probability exactly 0) instead
of overflowing to inf (softmax of inf is NaN). Logits with NaN or +inf give no distribution;
`usable_rows` finds them so the engine fails that request only.
"""

import torch

from specserve.workers.engine.sequence import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: logits [..., V] -> probs [..., V].

    Temperature scales the logits, then top-k keeps the k largest, then top-p keeps the
    smallest set of most likely tokens whose mass reaches top_p (at least one token).
    Speculative verification draws from exactly this distribution.
    """
    if params.greedy:
        raise ValueError("greedy requests have no sampling distribution")
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values  # (..., 1)
    # l / T, shifted by max(l) / T (softmax does not change): 0 at the likeliest tokens, <= 0 elsewhere.
    logits = torch.where(logits == top, 0.0, (logits - top) / params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly likelier tokens
        drop = mass_before >= params.top_p  # the first token always stays
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] bool: rows a token can be chosen from (no NaN, no +inf, and at least
    one finite value; -inf marks a token that cannot be chosen)."""
    return ~(logits.isnan() | logits.isposinf()).any(dim=-1) & logits.isfinite().any(dim=-1)


def race(probs: torch.Tensor, noise: torch.Tensor) -> int:
    """The token that wins the exponential race: argmax p(t) / E(t), E i.i.d. Exp(1) (noise). It is
    t with probability exactly p(t) (the Gumbel-max trick: -log E is Gumbel); p(t) = 0 never wins."""
    return int(torch.argmax(probs / noise))


def sample_tokens(
    logits: torch.Tensor,  # [N, V] one row per sequence
    params: list[SamplingParams],
    noises: list[torch.Tensor | None],  # [V] each sampled row's noise (Sequence.noise); None for greedy rows
) -> list[int]:
    """One token per row: argmax for greedy rows, race(target_probs, noise) otherwise."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, noise) in enumerate(zip(params, noises)):
        if not p.greedy:
            tokens[row] = race(target_probs(logits[row], p), noise)
    return tokens
