"""A response's log-probabilities (GenerateResponse.logprobs) in OpenAI's two shapes.

Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict per
token: the k likeliest and the emitted token, text -> log-probability; tokens whose texts are
equal share one key) and `text_offset`. Chat: `content`, one entry per token with its text,
log-probability, UTF-8 bytes and the k likeliest tokens in order.

A token's text is the token decoded alone, as vLLM shows it; a token that holds part of a
multi-byte character decodes to U+FFFD, and its `bytes` are those of U+FFFD. `text_offset`
counts the lengths of the tokens before it (from `offset`, where the stream's earlier chunks
ended); it equals the position in the text wherever the text is the tokens' texts joined.
"""

from collections.abc import Sequence

from specserve.v1 import generation_pb2 as pb

from specserve.scheduler.server import openai_types as oa


class TokenTexts:
    """Token id -> its text, decoded once per id with the served model's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def completion_logprobs(logprobs: Sequence[pb.TokenLogprobs], texts: TokenTexts,
                        offset: int = 0) -> oa.CompletionLogprobs:
    """The legacy shape of these tokens' log-probabilities; offset: where the first token starts."""
    tokens = [texts(t.token_id) for t in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [{**{texts(a.token_id): a.logprob for a in t.top}, texts(t.token_id): t.logprob} for t in logprobs]
    return oa.CompletionLogprobs(tokens=tokens, token_logprobs=[t.logprob for t in logprobs], top_logprobs=top,
                                 text_offset=offsets)


def chat_logprobs(logprobs: Sequence[pb.TokenLogprobs], texts: TokenTexts) -> oa.ChatLogprobs:
    """The chat shape of these tokens' log-probabilities."""

    def entry(token_id: int, logprob: float) -> oa.TopLogprob:
        text = texts(token_id)
        return oa.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = [oa.ChatTokenLogprob(**entry(t.token_id, t.logprob).model_dump(),
                                   top_logprobs=[entry(a.token_id, a.logprob) for a in t.top]) for t in logprobs]
    return oa.ChatLogprobs(content=content)
