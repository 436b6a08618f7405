"""Rate limits as part of the schedule: a hosted API's x-ratelimit-* headers and Retry-After,
--rpm and --tpm, a busy server that uses none of an image's tries, a spent quota."""

from __future__ import annotations

import io

import pytest
import test_apis
from conftest import captioner, distinct_pictures, picture
from stand_in_ollama import BUSY, QUOTA_SPENT, Reply
from test_apis import EVERY_API, captions_sent

Fault, Action = captioner.Fault, captioner.Action
run_against = test_apis.run_against  # the fixture: a stand-in of each kind, and a run against it
OPENAI_FLAVOURS = ["vllm", "llama-server", "lmstudio", "ollama-v1"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jobs", [1, 3])
@pytest.mark.parametrize("kind", OPENAI_FLAVOURS)
def test_a_rate_limited_server_is_paced_before_it_refuses(kind, jobs, tmp_path, run_against):
    start, run = run_against
    expected = distinct_pictures(tmp_path, 7)
    # 3 requests a window of 0.4 s: the probe picture and 7 images take three windows at least.
    server = start(kind, rate_limit=(3, 1_000_000), rate_window=0.4)

    result = run(kind, server, tmp_path, "--jobs", jobs, "--retries", 0)

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected
    assert server.refused_for_rate == []  # the headers said when to stop, before any 429
    assert (
        "is paced by its rate limit (its x-ratelimit-* headers: no requests left in the window)" in result.err
    )
    assert "was paced by its rate limit, not its speed (its x-ratelimit-* headers" in result.err


@pytest.mark.timeout(60)
def test_a_token_budget_the_server_says_is_spent_is_waited_out(tmp_path, run_against):
    start, run = run_against
    expected = distinct_pictures(tmp_path, 4)
    # Each request counts its max tokens (512) and the stand-in's 100 of prompt: 2 a window.
    server = start("vllm", rate_limit=(1000, 1300), rate_window=1.0)

    result = run("vllm", server, tmp_path, "--retries", 0)

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected
    assert server.refused_for_rate == []
    assert "too few tokens left in the window" in result.err


@pytest.mark.parametrize("kind", EVERY_API)
@pytest.mark.parametrize("status, said", [(429, "Rate limit exceeded"), (503, BUSY), (503, "Loading model")])
def test_a_busy_or_rate_limited_server_uses_none_of_an_images_tries(
    kind, status, said, tmp_path, run_against
):
    start, run = run_against
    expected = distinct_pictures(tmp_path, 3)
    server = start(kind)
    refused = set()

    def answer(chat):
        width = chat.picture().width
        if width == 64 or width in refused:  # the probe picture, or a second try
            return captioner_default(chat)
        refused.add(width)
        return Reply(status=status, error=said, retry_after=0.05)

    server.answer = answer

    result = run(kind, server, tmp_path, "--retries", 0)

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected
    assert len(captions_sent(server)) == 6


def captioner_default(chat) -> str:
    return f"A PNG picture, {chat.picture().width}x32 pixels."


@pytest.mark.parametrize("kind", ["ollama", "vllm"])
def test_a_server_that_keeps_refusing_past_wait_server_is_taken_out_and_no_image_fails(
    kind, tmp_path, run_against
):
    # Without --wait-server's bound a server that never stops refusing would be asked for ever:
    # past it the server is taken out, with the reason, and no image has failed.
    start, run = run_against
    distinct_pictures(tmp_path, 2)
    server = start(kind)
    server.answer = lambda chat: (
        "probe" if chat.picture().width == 64 else Reply(status=429, error="Rate limit exceeded")
    )

    result = run(kind, server, tmp_path, "--wait-server", 1)

    assert result.code == 1
    assert "answered 429: Rate limit exceeded, refusing for more than 1s (--wait-server)" in result.err
    assert "FAILED" not in result.err
    assert "2 images left for a rerun" in result.err


@pytest.mark.timeout(60)
def test_a_spent_quota_ends_the_run_with_the_reason(tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 6)
    server = start("vllm")
    answered = []

    def answer(chat):
        answered.append(chat)
        if len(answered) == 3:  # the probe and two captions: then the credit runs out
            server.quota_spent = True
        return captioner_default(chat)

    server.answer = answer

    result = run("vllm", server, tmp_path, "--jobs", 1)

    assert result.code == 1, result.err
    assert f"answered 429: {QUOTA_SPENT}; the quota is spent: check your plan and billing" in result.err
    assert "left for a rerun" in result.err
    assert len(list(tmp_path.glob("*.txt"))) == 2
    assert "FAILED" not in result.err


@pytest.mark.parametrize("listing", [False, True])
def test_a_quota_spent_at_the_start_stops_it_there(listing, tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 1)
    server = start("vllm", quota_spent=True)
    if listing:  # a provider that refuses even the list of models
        server.models_reply = Reply(status=429, error=QUOTA_SPENT)

    result = run("vllm", server, tmp_path)

    assert result.code == 2
    assert "the quota is spent: check your plan and billing" in result.err
    assert "cannot take a picture" not in result.err
    assert "does not answer like" not in result.err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_says_when_the_rate_limit_sets_the_pace():
    reporter = captioner.Reporter(stream=Terminal())
    reporter.start(captioner.Summary())
    reporter.draw_bar("")
    assert "at the rate limit" not in reporter.stream.getvalue()
    reporter.pace_sets(True)
    reporter.draw_bar("")
    assert " img/s at the rate limit ETA " in reporter.stream.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["vllm", "ollama"])
@pytest.mark.parametrize(
    "limit",
    [
        ("--rpm", 300),
        # 5 a second as well: each request counted as 512 + 1,200 tokens.
        ("--tpm", 60 * 5 * (512 + captioner.PROMPT_TOKENS_GUESS)),
    ],
)
def test_with_a_limit_given_any_window_holds_at_most_a_burst_and_the_rate(kind, limit, tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 12)
    server = start(kind)

    result = run(kind, server, tmp_path, *limit, "--jobs", 4)

    assert result.code == 0, result.err
    rate = 5.0  # a second
    times = sorted(chat.received_at for chat in server.chats)
    assert len(times) >= 12
    # The pacer's burst is 1. A request reaches the stand-in some time after the pacer let it go
    # (a thread starts, a connection opens, on a machine busy with other tests): times as the
    # stand-in records them are allowed that much slack.
    burst, slack = 1, 0.25
    for first in range(len(times)):
        for last in range(first, len(times)):
            held = last - first + 1
            assert held <= burst + rate * (times[last] - times[first] + slack), (first, last)
    assert f"was paced by its rate limit, not its speed ({limit[0]} " in result.err


def test_a_rate_limit_and_a_busy_server_are_no_images_fault_in_the_policy():
    assert captioner.decide(Fault.SERVER_BUSY, 3, 3, times=50) == (Action.WAIT_FOR_PACE, 3)
    assert captioner.decide(Fault.QUOTA_SPENT, 0, 3) == (Action.STOP_RUN, 0)
    assert captioner.status_fault(429, QUOTA_SPENT) is Fault.QUOTA_SPENT
    assert captioner.status_fault(429, "Rate limit reached for gpt-4o on requests per min (RPM)") is (
        Fault.SERVER_BUSY
    )


@pytest.mark.parametrize(
    "headers, limits",
    [
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-tokens": "20ms",
            },
            (0, 300.0, 149984, 0.02),  # a reset past RETRY_AFTER_LONGEST is read as it
        ),
        (
            {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1.5s"},
            (59, 1.5, None, 0.0),
        ),
        ({}, (None, 0.0, None, 0.0)),
        (
            {"x-ratelimit-remaining-requests": "many", "x-ratelimit-reset-requests": "1h"},
            (None, 300.0, None, 0.0),
        ),
    ],
)
def test_the_rate_limit_headers_are_read_as_openai_writes_them(headers, limits):
    captioner.import_run_libraries()
    got = captioner.rate_limits(captioner.httpx.Headers(headers))
    assert [round(value, 3) if isinstance(value, float) else value for value in got] == list(limits)


@pytest.mark.parametrize(
    "given, said",
    [
        (["--rpm", "0.001"], "--rpm 0.001 sends less than one request an hour"),
        (["--tpm", "1"], "--tpm 1 is less than one request counts (~1,712 tokens"),
    ],
)
def test_a_pace_no_run_could_keep_is_refused_at_the_start(tmp_path, server, caption, given, said):
    # Found by a red-team pass: both were accepted and the run waited, forever, with "ETA 0s".
    picture(tmp_path / "a.png")

    run = caption(tmp_path, *given)

    assert run.code == 2 and said in run.err and run.err.count("\n") == 1
    assert server.chats == []
