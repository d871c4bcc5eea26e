"""Log-probabilities of emitted tokens under the target model, for requests that ask for them.

Which distribution: the target model's log-softmax of its *raw* logits at the position that
chose the token, before temperature, top-k and top-p (vLLM's default "raw logprobs"). It is
the same whether the token was sampled, chosen greedily, or accepted from a draft tree: a
verify forward computes, at every node of the accepted path, the logits a plain forward
computes at that position, so the rows of the accepted path (root first, the bonus token's
row last) are the rows that chose the emitted tokens:

    accepted path [0, a, b], new tokens [t_a, t_b, bonus]:
    t_a from logits[0], t_b from logits[a], bonus from logits[b]

A sampled token always has a finite log-probability here even where top-k / top-p gave it
probability 0 in the distribution it was drawn from (it was not: such a token is never drawn).
"""

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask for per token (as OpenAI's chat API)


@dataclass(frozen=True)
class TopLogprob:
    """One of the likeliest tokens at a position."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """An emitted token's log-probability, and the likeliest tokens at its position."""

    token_id: int  # the emitted token
    logprob: float  # its log-probability under the target model
    top: tuple[TopLogprob, ...] = ()  # the k likeliest tokens, likeliest first (k = SamplingParams.logprobs)

    def __post_init__(self):
        if len(self.top) > MAX_TOP_LOGPROBS:
            raise ValueError(f"at most {MAX_TOP_LOGPROBS} top log-probabilities, got {len(self.top)}")


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """logits [n, V]: row i is the raw logits that chose tokens[i]; k: alternatives per token."""
    if logits.shape[0] != len(tokens):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(tokens)} tokens")
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).squeeze(1).tolist()  # [n]
    if k:
        top_values, top_ids = (t.tolist() for t in torch.topk(logp, min(k, logp.shape[1]), dim=-1))  # [n, k]
    else:
        top_values, top_ids = [[]] * len(tokens), [[]] * len(tokens)
    return [TokenLogprobs(token, lp, tuple(TopLogprob(i, v) for i, v in zip(ids, values)))
            for token, lp, ids, values in zip(tokens, chosen, top_ids, top_values)]
