"""Incremental detokenizer: streamed deltas, stop strings with hold-back, split UTF-8 characters."""

import pytest

from specserve.workers.engine.detokenizer import IncrementalDetokenizer

from tests.helpers.tiny_models import tiny_tokenizer

PROMPT = [11, 12, 13]  # "w11 w12 w13"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add([t]) for t in ids]


def test_deltas_concatenate_to_the_full_decode(tok):
    output = [5, 7, 42, 3, 96]
    detok = IncrementalDetokenizer(tok, PROMPT)
    deltas = stream(detok, output)
    # No stop strings: nothing is held back, each token's text comes out with its own step.
    assert deltas == [" w5", " w7", " w42", " w3", " w96"]
    full = tok.decode(PROMPT + output)
    assert "".join(deltas) == full[len(tok.decode(PROMPT)) :]
    assert detok.flush() == ""
    assert not detok.stopped


def test_several_tokens_in_one_add(tok):
    detok = IncrementalDetokenizer(tok, PROMPT)
    assert detok.add([5, 7]) + detok.add([8]) == " w5 w7 w8"


def test_long_prompt_uses_only_the_last_context_tokens(tok):
    detok = IncrementalDetokenizer(tok, list(range(2, 40)))
    assert "".join(stream(detok, [5, 6])) == " w5 w6"


def test_stop_string_cuts_the_text_right_before_it(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, stop=("w9",))
    deltas = stream(detok, [5, 9, 7])
    # text " w5" -> emit " w", hold "5" (a stop of 2 chars holds back 1)
    # text " w5 w9" -> stop found at 4: text " w5 ", emit the rest "5 "
    assert deltas == [" w", "5 ", ""]  # nothing after the stop
    assert detok.stopped
    assert detok.text == " w5 "
    assert detok.flush() == ""


def test_emitted_text_never_runs_past_a_stop_string(tok):
    output = [5, 19, 3, 4, 2, 9, 8]  # " w5 w19 w3 w4 w2 w9 w8"
    stop = "w4 w2"
    detok = IncrementalDetokenizer(tok, PROMPT, stop=(stop,))
    final = " w5 w19 w3 "
    emitted = ""
    for t in output:
        emitted += detok.add([t])
        assert final.startswith(emitted)  # only text before the stop ever leaves
    assert detok.stopped and emitted + detok.flush() == final


def test_stop_string_spanning_two_tokens(tok):
    # "5 w6" starts inside token w5 and ends inside token w6.
    detok = IncrementalDetokenizer(tok, PROMPT, stop=("5 w6",))
    deltas = stream(detok, [3, 5, 6, 7])
    # hold-back 3 chars: " w3" -> "", " w3 w5" -> " w3", then " w3 w5 w6" cuts to " w3 w"
    assert deltas == ["", " w3", " w", ""]
    assert detok.stopped and detok.text == " w3 w"


def test_stop_is_the_earliest_of_several(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, stop=("w8", "w7"))
    assert "".join(stream(detok, [5, 7, 8])) == " w5 "
    assert detok.stopped


def test_stop_inside_the_prompt_does_not_count(tok):
    detok = IncrementalDetokenizer(tok, [9, 9], stop=("w9",))
    assert "".join(stream(detok, [5, 6])) + detok.flush() == " w5 w6"
    assert not detok.stopped


def test_flush_returns_the_held_back_remainder(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, stop=("w99 w98",))  # holds back 6 chars
    emitted = "".join(stream(detok, [5, 7, 42]))
    assert emitted == " w5 "  # " w5 w7 w42" is 10 chars; the last 6 are held back
    assert detok.flush() == "w7 w42"
    assert detok.flush() == ""


def test_special_tokens_are_skipped(tok):
    detok = IncrementalDetokenizer(tok, PROMPT)
    assert stream(detok, [5, 0, 6]) == [" w5", "", " w6"]  # id 0 is the eos token


# ---- a real byte-level BPE tokenizer (trained offline on a few sentences) ----------------------

EMOJI = "\U0001f600"  # 4 UTF-8 bytes; seen once in training, so it stays split into byte tokens


@pytest.fixture(scope="module")
def byte_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["the cafe is open", "a café near the sea", "the cat sat on the mat", "naïve résumé"] * 5
    tok.train_from_iterator(corpus + [f"smile {EMOJI}"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_split_utf8_characters_are_held_back(byte_tok):
    text = f"the café {EMOJI} is open"
    ids = byte_tok(text)["input_ids"]
    emoji_ids = byte_tok(EMOJI)["input_ids"]
    assert len(emoji_ids) > 1  # the emoji really is split across tokens
    assert "\ufffd" in byte_tok.decode(emoji_ids[:1])  # a naive per-token decode would show U+FFFD

    detok = IncrementalDetokenizer(byte_tok, prompt_ids=byte_tok("say:")["input_ids"])
    deltas = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= len(emoji_ids) - 1  # the incomplete bytes produced no text
    assert EMOJI in deltas or any(d.endswith(EMOJI) for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_split_utf8_with_a_stop_string(byte_tok):
    text = f"a café {EMOJI} near the sea"
    detok = IncrementalDetokenizer(byte_tok, prompt_ids=byte_tok("x")["input_ids"], stop=("near",))
    emitted = ""
    for t in byte_tok(text)["input_ids"]:
        delta = detok.add([t])
        assert "\ufffd" not in delta
        emitted += delta
    assert detok.stopped
    assert emitted + detok.flush() == f"a café {EMOJI} "


# ---- a resubmitted request: the delivered output replayed (LLMEngine.add_request's resumed) -----

@pytest.mark.parametrize("stop", [(), ("w4 w2",), ("5 w6",)])
def test_replay_at_any_point_gives_the_same_text_as_one_run(tok, stop):
    """The text delivered before a resubmission point plus what a detokenizer resumed there
    delivers is the one run's text: held-back text is not lost, and a stop string spanning the
    point still stops it."""
    output = [3, 5, 6, 19, 3, 4, 2, 9, 8]
    one = IncrementalDetokenizer(tok, PROMPT, stop=stop)
    whole = "".join(stream(one, output)) + one.flush()
    for k in range(1, len(output)):
        first = IncrementalDetokenizer(tok, PROMPT, stop=stop)
        delivered = "".join(stream(first, output[:k]))
        if first.stopped:
            break  # the first attempt already ended: nothing to resume
        resumed = IncrementalDetokenizer(tok, PROMPT, stop=stop)
        resumed.replay(output[:k], len(delivered))
        rest = "".join(stream(resumed, output[k:])) + resumed.flush()
        assert delivered + rest == whole, k
        assert resumed.stopped == one.stopped


def test_replay_finishes_a_character_split_at_the_resubmission_point(byte_tok):
    text = f"the café {EMOJI} is open"
    ids, prompt = byte_tok(text)["input_ids"], byte_tok("say:")["input_ids"]
    emoji_start = next(k for k in range(len(ids)) if EMOJI not in byte_tok.decode(ids[: k + 1])
                       and EMOJI in byte_tok.decode(ids[: k + 2]))
    first = IncrementalDetokenizer(byte_tok, prompt)
    delivered = "".join(stream(first, ids[: emoji_start + 1]))  # a piece of the emoji: held back
    resumed = IncrementalDetokenizer(byte_tok, prompt)
    resumed.replay(ids[: emoji_start + 1], len(delivered))
    assert delivered + "".join(stream(resumed, ids[emoji_start + 1 :])) + resumed.flush() == text
