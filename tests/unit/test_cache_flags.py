"""The prefix-cache flags reach the engine options: --redis, --cache-ttl-s, --no-prefix-cache."""

import pytest

from specserve.scheduler.cli.flags import load_options
from specserve.scheduler.cli.main import build_parser

URL = "redis://127.0.0.1:6379/0"


def options(*flags: str):
    return load_options(build_parser().parse_args(["generate", "hi", *flags]))


def test_redis_and_ttl_are_passed_to_the_loader():
    opts = options("--redis", URL, "--cache-ttl-s", "30")
    assert opts.redis_url == URL and opts.cache_ttl_s == 30 and opts.config.prefix_caching


def test_no_prefix_cache_turns_both_levels_off():
    opts = options("--redis", URL, "--no-prefix-cache")
    assert opts.redis_url is None and not opts.config.prefix_caching


def test_redis_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("SPECSERVE_REDIS", URL)
    assert options().redis_url == URL


def test_a_ttl_below_one_second_is_refused():
    with pytest.raises(ValueError, match="--cache-ttl-s must be >= 1"):
        options("--cache-ttl-s", "0")
