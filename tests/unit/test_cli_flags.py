"""Flags defined once and shared: the same names, defaults and meaning under `generate` and
`serve`, old names kept as aliases, one long-prompt rule (LongPromptPolicy)."""

import pytest

from specserve.scheduler.cli.main import build_parser
from specserve.scheduler.long_prompt import DEFAULT_LONG_PROMPT_THRESHOLD, LongPromptPolicy

PREFILL_GROUP = ("prefill_group_size", "sequence_parallel", "long_prompt_threshold")


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def group_flags(args) -> tuple:
    return tuple(getattr(args, name) for name in PREFILL_GROUP)


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
@pytest.mark.parametrize("size_flag", ["--prefill-group-size", "--prefill-workers"])
def test_prefill_group_flags_and_the_old_alias_mean_the_same_in_both_commands(command, size_flag):
    args = parse(*command, size_flag, "3", "--sequence-parallel", "ulysses", "--long-prompt-threshold", "100")
    assert group_flags(args) == (3, "ulysses", 100)


def test_generate_and_serve_share_the_defaults():
    assert group_flags(parse("generate", "hi")) == group_flags(parse("serve")) == \
        (1, "ring", DEFAULT_LONG_PROMPT_THRESHOLD)


def test_long_prompt_policy_counts_more_than_the_threshold():
    policy = LongPromptPolicy(16)
    assert not policy.wants(16) and policy.wants(17)
    assert LongPromptPolicy(1).wants(2)  # the least threshold still leaves the group a token


def test_a_threshold_below_one_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--long-prompt-threshold.*>= 1, got 0"):
        LongPromptPolicy(0)


def test_serve_help_says_ray_is_the_default(capsys):
    with pytest.raises(SystemExit):
        parse("serve", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "by default the engines run in Ray worker actors" in text and "--no-ray: in this process" in text


def test_bench_shares_the_spec_and_sequence_parallel_flags():
    args = parse("bench", "longctx", "--sequence-parallel", "ulysses", "--spec-tokens", "4", "--draft-model", "d")
    assert (args.sequence_parallel, args.spec_tokens, args.draft_model) == ("ulysses", 4, "d")


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"], ["bench", "engine"]])
def test_kernels_flag_reaches_load_options(command):
    from specserve.scheduler.cli.flags import load_options

    assert load_options(parse(*command)).kernels == "auto"
    assert load_options(parse(*command, "--kernels", "mm_t")).kernels == "mm_t"
    with pytest.raises(SystemExit):
        parse(*command, "--kernels", "fastest")


def test_bench_fuzz_needs_a_server():
    from specserve.scheduler.cli.bench import run_bench

    with pytest.raises(ValueError, match="--server HOST:PORT"):
        run_bench(parse("bench", "fuzz", "--requests", "10"))


def test_bench_kernels_builds_its_config(monkeypatch):
    import specserve.bench.kernel_paths as kernel_paths
    from specserve.scheduler.cli.bench import run_bench

    seen = []
    monkeypatch.setattr(kernel_paths, "run_kernel_paths_bench", seen.append)
    assert run_bench(parse("bench", "kernels", "--dtype", "bfloat16", "--threads", "1")) == 0
    assert (seen[0].dtype, seen[0].threads, seen[0].model) == ("bfloat16", 1, "smollm2-135m")
