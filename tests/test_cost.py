"""What a run costs: the tokens each answer reports (Ollama's prompt_eval_count and eval_count,
the usage in an OpenAI-compatible stream's last chunk), the cost at --price, --max-cost, the dry
run's estimate, and a content filter's refusal, which no retry may pay for again."""

from __future__ import annotations

import json

import pytest
from conftest import captioner, distinct_pictures, picture
from stand_in_ollama import THINKING_MODEL, TOY, Reply
from toy_api import ToyApi

PRICE = (1000.0, 2000.0)  # per million tokens: large, so that every token shows in the cost
PROMPT_TOKENS = Reply().prompt_tokens  # what the stand-in reports of every prompt


def api_args(kind: str) -> list:
    return [] if kind == "ollama" else ["--api", "openai"]


def start(make_server, kind: str, **settings):
    return (
        make_server(**settings) if kind == "ollama" else make_server(flavour=kind, native=False, **settings)
    )


def paid(chat) -> tuple[int, int]:
    """(input, output) tokens the stand-in reported for one chat: its usage, or Ollama's
    prompt_eval_count and eval_count (at least 1)."""
    output = chat.tokens_sent if chat.api == "openai" else max(1, chat.tokens_sent)
    return PROMPT_TOKENS, output


def cost_of(tokens: tuple[int, int]) -> float:
    return (tokens[0] * PRICE[0] + tokens[1] * PRICE[1]) / 1e6


def jsonl_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["ollama", "vllm"])
def test_tokens_and_cost_are_the_sum_of_what_the_answers_report(kind, tmp_path, make_server, caption):
    distinct_pictures(tmp_path, 3)
    server = start(make_server, kind)

    result = caption(
        tmp_path,
        *api_args(kind),
        "--price",
        "1000/2000",
        "--jsonl",
        tmp_path / "metadata.jsonl",
        host=server.url,
    )

    assert result.code == 0, result.err
    # Every answer is paid for, the OpenAI preflight's probe picture too.
    tokens = [paid(chat) for chat in server.chats if chat.api == "openai" or chat.picture().size != (64, 64)]
    total_in, total_out = sum(t[0] for t in tokens), sum(t[1] for t in tokens)
    cost = cost_of((total_in, total_out))
    assert (
        f"tokens paid for: {total_in:,} input, {total_out:,} output; cost {captioner.money(cost)}"
        in result.err
    )
    by_width = {chat.picture().width: paid(chat) for chat in server.chats if chat.picture().size != (64, 64)}
    lines = jsonl_lines(tmp_path / "metadata.jsonl")
    assert len(lines) == 3
    for line in lines:
        expected = by_width[int(line["text"].split(",")[1].split("x")[0])]
        assert (line["prompt_tokens"], line["tokens"], line["reasoning_tokens"]) == (*expected, 0)
        assert line["cost"] == pytest.approx(cost_of(expected))


def test_without_price_tokens_are_reported_and_no_cost(tmp_path, server, caption):
    distinct_pictures(tmp_path, 2)

    result = caption(tmp_path, "--jsonl", tmp_path / "metadata.jsonl")

    assert result.code == 0, result.err
    assert "(estimated from words and punctuation); tokens paid for: " in result.err
    assert "cost" not in result.err
    assert all(
        "cost" not in line and line["prompt_tokens"] == PROMPT_TOKENS
        for line in jsonl_lines(tmp_path / "metadata.jsonl")
    )


def test_reasoning_tokens_are_counted_as_output_and_said_apart(tmp_path, make_server, caption):
    """OpenAI details the thinking tokens that completion_tokens includes (reasoning_tokens):
    billed as output, but no caption."""
    server = make_server(
        flavour="vllm", native=False, models={"qwen3-vl": THINKING_MODEL}, reasoning_details=True
    )
    picture(tmp_path / "a.png")

    result = caption(tmp_path, "--api", "openai", "--think", "--jsonl", tmp_path / "m.jsonl", host=server.url)

    assert result.code == 0, result.err
    chat = next(chat for chat in server.chats if chat.picture().size != (64, 64))
    assert chat.thinking_sent > 0
    (line,) = jsonl_lines(tmp_path / "m.jsonl")
    assert line["reasoning_tokens"] == chat.thinking_sent and line["tokens"] == chat.tokens_sent
    reasoning = sum(chat.thinking_sent for chat in server.chats)
    assert f"({reasoning:,} reasoning, no caption)" in result.err


def test_progress_shows_the_cost_so_far_and_the_estimated_total(tmp_path, server, caption):
    distinct_pictures(tmp_path, 2)

    result = caption(tmp_path, "--price", "1000/2000", "--jobs", "1")

    assert result.code == 0, result.err
    first, second = (cost_of(paid(chat)) for chat in server.chats)
    assert first == second  # so the estimate after the first answer is the total
    total = captioner.money(first + second)
    progress = [line for line in result.err.splitlines() if line.startswith("[")]
    assert len(progress) == 2
    # An answer is paid as it comes, perhaps before the image before it is written.
    assert progress[0].endswith(
        (f", {captioner.money(first)} so far of ~{total}", f", {total} so far of ~{total}")
    )
    assert progress[1].endswith(f", {total} so far of ~{total}")


def test_max_cost_stops_before_the_budget_and_the_rerun_finishes(tmp_path, make_server, caption):
    expected = distinct_pictures(tmp_path, 8)
    server = start(make_server, "vllm", slots=2)
    budget = 4.0

    first = caption(
        tmp_path,
        "--api",
        "openai",
        "--price",
        "1000/1000",
        "--max-cost",
        budget,
        "--jobs",
        2,
        host=server.url,
    )

    spent = sum((PROMPT_TOKENS + chat.tokens_sent) * 1000 / 1e6 for chat in server.chats)
    assert spent <= budget
    assert first.code == 1, first.err
    assert "--max-cost 4 would be passed" in first.err and "left for a rerun" in first.err
    written = [path for path in expected if path.exists()]
    assert 0 < len(written) < len(expected)
    sent_before = len(server.chats)

    second = caption(tmp_path, "--api", "openai", "--price", "1000/1000", "--max-cost", 100, host=server.url)

    assert second.code == 0, second.err
    assert {path: path.read_text() for path in expected} == expected
    captions_sent = [chat for chat in server.chats[sent_before:] if chat.picture().size != (64, 64)]
    assert len(captions_sent) == len(expected) - len(written)


def test_max_cost_needs_a_price(tmp_path, server, caption):
    picture(tmp_path / "a.png")

    result = caption(tmp_path, "--max-cost", "5")

    assert result.code == 2
    assert "--max-cost needs --price" in result.err
    assert not server.chats


@pytest.mark.parametrize("given", ["1", "a/b", "1/2/3", "-1/2", "inf/1"])
def test_a_price_is_two_numbers(given, tmp_path, server, caption):
    picture(tmp_path / "a.png")

    result = caption(tmp_path, f"--price={given}")

    assert result.code == 2
    assert "IN/OUT" in result.err


@pytest.mark.parametrize(
    ("size", "tokens"),
    # OpenAI's own examples (platform.openai.com/docs/guides/images-vision, "Calculating costs").
    [((1024, 1024), 765), ((2048, 4096), 1105), ((500, 500), 255), ((64, 64), 255), ((4096, 8192), 1105)],
)
def test_image_tokens_as_openai_counts_them(size, tokens):
    assert captioner.image_tokens(*size) == tokens


def test_dry_run_estimates_the_cost_without_a_request(tmp_path, server, caption):
    picture(tmp_path / "square.png", size=(1024, 1024))
    picture(tmp_path / "tall.png", size=(1000, 2000))  # sent at --max-size 1344: 672x1344
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    prompt = tmp_path.parent / f"{tmp_path.name}-prompt.txt"
    prompt.write_text("x" * 40)  # 10 tokens

    result = caption(tmp_path, prompt, "--dry-run", "--price", "1000/2000")

    assert result.code == 0, result.err
    assert not server.requests
    image = 765 + (85 + 170 * 2 * 3)
    prompt_tokens, output_tokens = image + 2 * 10, 2 * captioner.EXPECTED_CAPTION_TOKENS
    cost = captioner.money(cost_of((prompt_tokens, output_tokens)))
    assert f"estimated cost: {cost} at --price ({prompt_tokens:,} input tokens" in result.err
    assert f"{output_tokens:,} output tokens" in result.err
    assert "1 image could not be opened" in result.err


def test_a_content_filter_fails_the_image_at_once(tmp_path, make_server, caption):
    """finish_reason "content_filter": the provider refuses the picture, and would again, each
    try paid for."""
    withheld = Reply(text="", done_reason="content_filter")
    server = start(
        make_server, "vllm", answer=lambda chat: withheld if chat.picture().size != (64, 64) else "ok"
    )
    picture(tmp_path / "a.png", size=(80, 60))

    result = caption(tmp_path, "--api", "openai", "--price", "1000/1000", host=server.url)

    assert result.code == 1
    assert "content filter refused the image" in result.err
    assert len([chat for chat in server.chats if chat.picture().size != (64, 64)]) == 1
    assert not (tmp_path / "a.txt").exists()
    # The refusal was paid for: its prompt counts.
    assert f"tokens paid for: {2 * PROMPT_TOKENS:,} input" in result.err


def test_a_safety_system_400_fails_the_image_at_once(tmp_path, make_server, caption):
    """OpenAI's 400 code content_policy_violation: "Your request was rejected as a result of our
    safety system" is no request that a retry changes."""
    said = "Your request was rejected as a result of our safety system."
    picture(tmp_path / "a.png", size=(80, 60))
    server = start(
        make_server,
        "vllm",
        answer=lambda chat: Reply(status=400, error=said) if chat.picture().size != (64, 64) else "ok",
    )

    result = caption(tmp_path, "--api", "openai", host=server.url)

    assert result.code == 1
    assert "safety system" in result.err
    assert len([chat for chat in server.chats if chat.picture().size != (64, 64)]) == 1


def test_an_answer_unfit_to_train_on_is_paid_for_too(tmp_path, server, caption):
    """An empty answer is asked again, and both answers are billed."""
    server.answer = lambda chat: "" if len(server.chats) == 1 else "A red square"
    picture(tmp_path / "a.png")

    result = caption(tmp_path, "--price", "1000/2000")

    assert result.code == 0, result.err
    assert len(server.chats) == 2
    total_in, total_out = (sum(tokens) for tokens in zip(*(paid(chat) for chat in server.chats)))
    assert f"tokens paid for: {total_in:,} input, {total_out:,} output" in result.err


def test_an_answer_without_a_token_count_is_counted_at_an_estimate(
    tmp_path, make_server, caption, monkeypatch
):
    """A server that says no token count (the toy API, an OpenAI-compatible server without usage)
    is no free one: --max-cost still stops."""
    monkeypatch.setitem(captioner.APIS, ToyApi.name, ToyApi)
    server = make_server(flavour=TOY)
    expected = distinct_pictures(tmp_path, 5)

    result = caption(
        tmp_path, "--api", "toy", "--price", "1000/1000", "--max-cost", "1", "--jobs", "1", host=server.url
    )

    assert result.code == 1, result.err
    assert "(1 answer said no token count: estimated)" in result.err
    assert "--max-cost 1 would be passed" in result.err
    assert len([path for path in expected if path.exists()]) == 1


def test_max_cost_holds_when_a_picture_costs_far_more_than_its_estimate(tmp_path, make_server, caption):
    # Found by a red-team pass: with --jobs 8 every first request went out on the estimate (a
    # 64x64 probe's 300 tokens, or OpenAI's rule for the picture) while the server counted 20,000,
    # and the run spent three times its budget. Until an image's answer says, one goes at a time.
    distinct_pictures(tmp_path, 16)
    costly = 20_000

    def answer(chat):
        probe = chat.picture().size == (64, 64)
        return Reply(text="A red square on white.", prompt_tokens=300 if probe else costly)

    server = start(make_server, "vllm", slots=8, latency=0.05, answer=answer)

    run = caption(
        tmp_path, "--api", "openai", "--price", "1000/1000", "--max-cost", 50, "--jobs", 8, host=server.url
    )

    spent = (
        sum((300 if chat.picture().size == (64, 64) else costly) + chat.tokens_sent for chat in server.chats)
        * 1000
        / 1e6
    )
    assert run.code == 1, run.err
    assert spent <= 50 and "--max-cost 50 would be passed" in run.err
