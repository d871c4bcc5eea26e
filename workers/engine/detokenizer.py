"""Token ids -> streamed text deltas, and stop-string detection."""

# Prompt tokens decoded ahead of the output so the first output token gets its leading space.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decodes a growing output a few tokens at a time (never the whole output again).

    `add` returns the text that became final: bytes of a character split across tokens
    are held back until complete, and text that could still grow into a stop string is
    held back until it cannot. When a stop string appears the text ends right before it.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""  # all final output text so far (stop string excluded)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (),
                   resumed=None) -> "IncrementalDetokenizer":
        """A request's detokenizer. resumed (sequence.Resumed): the prompt ends with output an
        earlier attempt delivered; it is replayed, so the text goes on from what was delivered."""
        if resumed is None:
            return cls(tokenizer, prompt_ids, stop)
        if resumed.tokens >= len(prompt_ids):
            raise ValueError(f"resumed.tokens ({resumed.tokens}) must be less than the prompt's {len(prompt_ids)} tokens")
        detok = cls(tokenizer, prompt_ids[: -resumed.tokens], stop)
        detok.replay(prompt_ids[-resumed.tokens :], resumed.text_chars)
        return detok

    def add(self, new_ids: list[int]) -> str:
        """Feeds new output tokens; returns the newly final text (maybe empty)."""
        if self.stopped:
            return ""
        for token in new_ids:
            self.ids.append(token)
            self.text += self._decode_step()
            if self.stop and self._cut_at_stop():
                break
        holdback = 0 if self.stopped or not self.stop else max(map(len, self.stop)) - 1
        end = max(self.emitted, len(self.text) - holdback)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def replay(self, ids: list[int], delivered_chars: int) -> None:
        """Feeds output an earlier attempt delivered (ids) of which delivered_chars characters of
        text went out: what it held back comes with the next `add`, and a stop string that began
        in it is still found."""
        self.add(ids)
        self.emitted = min(delivered_chars, len(self.text))

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

    def _decode_step(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def _cut_at_stop(self) -> bool:
        window_start = max(0, self.emitted - max(map(len, self.stop)))
        hits = [i for s in self.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped
