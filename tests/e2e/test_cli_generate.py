"""`specserve generate` as a user runs it: a subprocess, real model, stdout and exit codes."""

import json
import subprocess
import sys

import pytest

SPECSERVE = [sys.executable, "-m", "specserve.scheduler.cli.main"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SPECSERVE, *args], capture_output=True, text=True, timeout=timeout)


def test_streams_text_for_a_chat_prompt():
    out = run("generate", "Name three colors.", "--chat", "--max-new-tokens", "24", "--threads", "2")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 10


def test_prompt_file_json_lines(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def add(a, b):"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}) + "\n"
    )
    out = run("generate", "--prompt-file", str(prompts), "--json", "--max-new-tokens", "16", "--stop", "\n\n\n")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2
    for item in lines:
        assert set(item) >= {"token_ids", "text", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_s",
                             "elapsed_s", "finish_reason", "spec"}
        assert item["completion_tokens"] == len(item["token_ids"]) <= 16
        assert item["finish_reason"] in ("stop", "length")
        assert 0 < item["ttft_s"] <= item["elapsed_s"]
        spec = item["spec"]  # the default method: ngram
        assert spec["method"] == "ngram" and 0 < spec["steps"] <= item["completion_tokens"]
        assert spec["accepted_tokens"] <= spec["drafted_tokens"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "hi", "--model", "no-such-model"], "no-such-model"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--spec", "magic"], "magic"),
        (["generate", "hi", "--spec", "model"], "--draft-model"),
        (["generate", "hi", "--spec", "recycling", "--spec-template", "no-such-tree"], "no-such-tree"),
        (["generate"], "PROMPT"),
        (["generate", "hi", "--server", "127.0.0.1:9"], "UNAVAILABLE"),
        (["serve", "--host", "0.0.0.0"], "--token"),
        (["serve", "--tls-cert", "cert.pem"], "--tls-key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    out = run(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_malformed_prompt_file_line_is_named(tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    out = run("generate", "--prompt-file", str(prompts))
    assert out.returncode == 2
    assert "line 2" in out.stderr and "Traceback" not in out.stderr


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello " * 9000}) + "\n")
    out = run("generate", "--prompt-file", str(prompts), "--max-new-tokens", "4")
    assert out.returncode == 2
    assert "8192" in out.stderr and "Traceback" not in out.stderr
