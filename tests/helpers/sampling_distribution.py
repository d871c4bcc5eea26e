"""What the sampling distribution tests share (engine, gRPC and Ray actor levels): the tiny target
and a genuinely different draft model, the exact distribution of a request's first sampled
tokens computed from the target's logits (transformers, not our engine), and a deliberately
broken verifier each of them must catch.

The prompt repeats every token of the vocabulary, so prompt lookup, suffix trees and the other
drafters propose on every step.
"""

import torch

from specserve.workers.engine.sampler import race, target_probs
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.verify import Acceptance

from tests.helpers.tiny_models import tiny_hf, tiny_tokenizer

V = 12
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]  # every token recurs
SHAPE = dict(vocab_size=V, initializer_range=0.2)
TARGET_SEED, DRAFT_SEED = 0, 1
DRAFT_SHAPE = dict(num_hidden_layers=1)  # with DRAFT_SEED: other weights, one layer, the same vocabulary


def save_target_and_draft(tmp_path_factory, **shape) -> tuple[str, str]:
    """The target and the draft model (SHAPE + shape) with the word-level tokenizer of V words,
    each saved as a Hugging Face folder: (target folder, draft folder)."""

    def save(name: str, seed: int, **config) -> str:
        folder = tmp_path_factory.mktemp(name)
        tiny_hf("llama", seed=seed, **SHAPE, **shape, **config).save_pretrained(folder)
        tiny_tokenizer(V).save_pretrained(folder)
        return str(folder)

    return save("dist-target", TARGET_SEED), save("dist-draft", DRAFT_SEED, **DRAFT_SHAPE)


def exact_first_tokens(model, prompt: list[int], params: SamplingParams,
                       length: int) -> dict[tuple[int, ...], float]:
    """P(the first `length` sampled tokens are t) for every t in V^length (V: the model's
    vocabulary), from one batched forward per position over every prefix."""
    vocab = model.config.vocab_size
    prefixes, probs = [()], torch.ones(1, dtype=torch.float64)  # probs: [len(prefixes)]
    for _ in range(length):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]  # [n, V]
        joint = probs[:, None] * target_probs(logits, params).double()  # [n, V]
        prefixes = [p + (t,) for p in prefixes for t in range(vocab)]  # [(a,), (b,)] -> [(a, 0), .., (b, V-1)]
        probs = joint.reshape(-1)  # row-major, as prefixes
    return dict(zip(prefixes, probs.tolist()))


def accept_first_drafts(tree, target_p, noise) -> Acceptance:
    """Broken on purpose (monkeypatched over speculator.verify_sampling): takes every first child
    down the tree, then races p for the bonus."""
    children, path = tree.children(), [0]
    while children[path[-1]]:
        path.append(children[path[-1]][0])
    bonus = race(target_p(path[-1]), noise(tree.depths[path[-1]]))
    return Acceptance(path, [tree.tokens[n] for n in path[1:]] + [bonus])
