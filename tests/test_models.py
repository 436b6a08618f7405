"""Models people run now: thinking models, and models a server cannot run, in every era's wording."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import captioner, distinct_pictures, picture
from stand_in_ollama import (
    INLINE_THINKING_MODEL,
    THINKING_MODEL,
    THINKING_ONLY_MODEL,
    THOUGHT,
    VISION_MODEL,
    Reply,
    describe,
)

MODEL = "qwen3-vl:8b"


def with_model(server, entry) -> None:
    server.models[MODEL] = entry


def test_a_model_that_can_think_is_told_not_to_and_captions_without_thinking(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 3)
    with_model(server, THINKING_MODEL)

    run = caption(tmp_path, "--model", MODEL)

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == [False] * 3
    assert [chat.thinking_sent for chat in server.chats] == [0] * 3  # as fast as a model that cannot think
    assert {path: path.read_text() for path in expected} == expected
    assert "thinking included" not in run.err and "thinks although" not in run.err


def test_a_model_that_cannot_think_is_sent_no_think_at_all(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    assert caption(tmp_path).code == 0
    assert server.chats[0].think is None  # llava: "think" would be a 400 on v0.12.4 alone


def test_think_lets_it_think_with_a_larger_budget_and_never_writes_the_thinking(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 2)
    with_model(server, THINKING_MODEL)

    run = caption(tmp_path, "--model", MODEL, "--think")

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == [True, True]
    assert all(chat.thinking_sent > 50 for chat in server.chats)
    assert [chat.options["num_predict"] for chat in server.chats] == [2048, 2048]
    assert {path: path.read_text() for path in expected} == expected  # no thinking
    assert "tokens/s generated (thinking included)" in run.err


def test_think_with_a_model_that_cannot_think_stops_before_any_request(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--think")
    assert run.code == 2
    assert "model llava:13b on " in run.err and "cannot think; run without --think" in run.err
    assert server.chats == []


def test_a_thinking_only_model_is_named_once_and_its_captions_are_clean(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 3)
    with_model(server, THINKING_ONLY_MODEL)

    run = caption(tmp_path, "--model", MODEL)

    assert run.code == 0, run.err
    assert run.err.count("thinks although asked not to") == 1
    assert "such as an -instruct one" in run.err
    assert {path: path.read_text() for path in expected} == expected


@pytest.mark.parametrize(
    "model",
    # Inline, the thinking cut off by the limit is a <think> block that never closes.
    [THINKING_ONLY_MODEL, INLINE_THINKING_MODEL],
    ids=["thinking field", "inline"],
)
def test_thinking_that_spends_the_whole_budget_says_so(tmp_path, caption, server, model):
    picture(tmp_path / "a.jpg")
    with_model(server, model)

    run = caption(tmp_path, "--model", MODEL, "--max-tokens", 50, "--retries", 0)

    assert run.code == 1
    assert "FAILED a.jpg: the model spent its answer thinking (raise --max-tokens" in run.err
    assert "cut off at the token limit" not in run.err


def test_an_inline_thought_that_never_closes_never_reaches_a_caption(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: "<think>The user wants a caption, so I look at the colours first"

    run = caption(tmp_path, "--retries", 0)

    assert run.code == 1
    assert "FAILED a.jpg: " in run.err
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("raw", [False, True])
def test_inline_thinking_never_reaches_a_caption(tmp_path, caption, server, raw):
    expected = distinct_pictures(tmp_path, 2)
    with_model(server, INLINE_THINKING_MODEL)

    run = caption(tmp_path, "--model", MODEL, *(["--raw"] if raw else []))

    assert run.code == 0, run.err
    written = {path: path.read_text() for path in expected}
    assert {path: " ".join(text.split()) for path, text in written.items()} == expected
    assert not any(THOUGHT.split()[0] in text for text in written.values())


def test_the_stand_in_thinks_by_itself_when_think_is_left_out():
    # What the tests above rest on: since Ollama 0.12.4 a model that can think does so unless
    # the request says otherwise.
    import json
    import urllib.request

    from stand_in_ollama import StandInOllama

    server = StandInOllama(
        models={MODEL: THINKING_MODEL, "llava:13b": VISION_MODEL}, answer=lambda chat: "hi"
    ).start()
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        request = urllib.request.Request(f"{server.url}/api/chat", json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=10) as answer:
            lines = [json.loads(line) for line in answer.read().splitlines()]
    finally:
        server.stop()
    assert lines[0]["message"]["thinking"] and not lines[0]["message"]["content"]


@pytest.mark.parametrize(
    "reply, said",
    [
        (
            Reply(
                status=500,
                error="llama runner process has terminated: error loading model: unknown model architecture: 'mllama'",
            ),
            "this Ollama version cannot run the model (its architecture mllama is unknown to it",
        ),
        (
            Reply(
                status=400,
                error="request (4563 tokens) exceeds the available context size (4096 tokens), try increasing it",
            ),
            "image and prompt take 4563 tokens but the context holds 4096: raise --num-ctx to 5120",
        ),
        (
            Reply(text="a caption of a picture the model never saw", prompt_tokens=4096),
            (
                "the prompt filled the whole context (4096 tokens), so the model did not see all of the image: "
                "raise --num-ctx to 5120"
            ),
        ),
    ],
    ids=["architecture", "context", "silently-cut"],
)
def test_a_model_the_server_cannot_run_ends_the_run_after_the_first_answer_and_a_rerun_does_the_rest(
    tmp_path, caption, server, reply, said
):
    expected = distinct_pictures(tmp_path, 6)
    server.answer = lambda chat: reply if chat.options["num_ctx"] == 4096 else describe(chat)

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert len(server.chats) == 1  # not one request per image, not a retry
    assert f"taken out of rotation: {said}" in run.err
    assert "stopped: no Ollama server left to ask; 6 images left for a rerun" in run.err
    assert list(tmp_path.glob("*.txt")) == []

    server.chats.clear()
    rerun = caption(tmp_path, "--num-ctx", 8192)  # the fix; the stand-in now answers
    assert rerun.code == 0, rerun.err
    assert len(server.chats) == 6
    assert {path: path.read_text() for path in expected} == expected


@pytest.mark.parametrize("jobs, said", [(3, True), (1, False)])
def test_a_model_ollama_runs_one_request_at_a_time_is_named_when_jobs_would_only_queue(
    tmp_path, caption, server, jobs, said
):
    picture(tmp_path / "a.jpg")
    with_model(server, THINKING_MODEL)  # qwen3vl

    run = caption(tmp_path, "--model", MODEL, "--jobs", jobs)

    assert run.code == 0, run.err
    note = f"note: {MODEL} (qwen3vl) answers one request at a time on {server.url}"
    assert (note in run.err) is said
    assert (
        "llava:13b (llama) answers one request"
        in caption(tmp_path, "--existing", "overwrite", "--jobs", 3).err
    ) is False


def test_the_docs_model_table_is_the_scripts_table_of_models():
    """The table in docs/servers-and-models.md is read from the script's MODELS and ONE_AT_A_TIME, which
    the run reads: a fact changed in one place and not the other fails here."""
    page = (Path(captioner.__file__).parent / "docs" / "servers-and-models.md").read_text(encoding="utf-8")
    table = page.split("| model (tag) | thinks | one request at a time |", 1)[1].split("\n\n", 1)[0]
    rows = [
        tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        for line in table.splitlines()[2:]
        if line.startswith("|")
    ]
    assert rows == [
        (m.tags, m.thinks, "yes" if m.one_at_a_time else "no", m.num_ctx, m.notes, m.source)
        for m in captioner.MODELS
    ]
    said = re.search(r"Ollama runs (.+?) models one request at a time", page, re.DOTALL)[1]
    assert re.split(r",\s+|\s+and\s+", " ".join(said.split())) == list(captioner.ONE_AT_A_TIME)
