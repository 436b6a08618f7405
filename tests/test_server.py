"""Talking to Ollama: the preflight before any image, the request itself, and every way it can fail."""

from __future__ import annotations

import http.server
import threading

import pytest
from conftest import by_width, closed_port_url, leftovers, picture
from stand_in_ollama import BUSY, OLD_VISION_MODEL, RUNNER_CRASH, TEXT_MODEL, VISION_MODEL, Reply


def test_each_request_carries_the_prompt_one_image_and_constant_options(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "b.jpg")
    prompt = tmp_path / "prompt.md"
    prompt.write_text("Describe the picture.\n\nUse commas, {{like this}}.\n")

    run = caption(tmp_path, prompt, "--model", "llava:13b")

    assert run.code == 0
    assert [chat.prompt for chat in server.chats] == ["Describe the picture.\n\nUse commas, {like this}."] * 2
    assert all(len(chat.images) == 1 and chat.model == "llava:13b" for chat in server.chats)
    # A token limit always: a model that never stops must not hold a slot forever.
    assert server.chats[0].options == server.chats[1].options == {"num_ctx": 4096, "num_predict": 512}


def test_unreachable_server_stops_before_anything_with_exit_2(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    url = closed_port_url()
    run = caption(tmp_path, host=url)
    assert run.code == 2
    assert run.err.strip() == (
        f"error: cannot reach Ollama at {url}; start it with 'ollama serve' or point --host (or OLLAMA_HOST) at it"
    )
    assert not (tmp_path / "a.txt").exists()


def test_something_else_listening_is_not_taken_for_ollama(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, args=(0.05,), daemon=True).start()
    try:
        run = caption(tmp_path, host=f"http://127.0.0.1:{web.server_address[1]}")
    finally:
        web.shutdown()
        web.server_close()
    assert run.code == 2
    assert "does not answer like an Ollama server" in run.err


def test_missing_model_says_how_to_pull_it_and_sends_nothing(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--model", "llava:34b")
    assert run.code == 2
    assert f"model llava:34b is not on {server.url}; run 'ollama pull llava:34b' or add --pull" in run.err
    assert server.chats == []


def test_pull_fetches_a_missing_model_with_progress_and_goes_on(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.pullable["llava:7b"] = VISION_MODEL

    run = caption(tmp_path, "--model", "llava:7b", "--pull")

    assert run.code == 0, run.err
    assert "pulling llava:7b: pulling manifest" in run.err
    assert "pulling llava:7b: success" in run.err
    assert [chat.model for chat in server.chats] == ["llava:7b"]


def test_pull_of_an_unknown_model_fails_with_exit_2(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--model", "no-such-model", "--pull")
    assert run.code == 2
    assert (
        "could not pull no-such-model: Ollama failed mid-answer: pull model manifest: file does not exist"
        in run.err
    )


def test_a_model_that_cannot_see_is_refused_before_it_invents_captions(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.models["llama3:8b"] = TEXT_MODEL
    run = caption(tmp_path, "--model", "llama3:8b")
    assert run.code == 2
    assert f"model llama3:8b on {server.url} cannot see images" in run.err
    assert server.chats == []


def test_servers_too_old_to_list_capabilities_are_judged_by_the_clip_family(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.models["llava:7b"] = OLD_VISION_MODEL
    assert caption(tmp_path, "--model", "llava:7b").code == 0


@pytest.mark.parametrize(
    "reply, reason",
    [
        (Reply(status=500, error=RUNNER_CRASH), f"Ollama answered 500: {RUNNER_CRASH}"),
        (Reply(status=503, error=BUSY), f"Ollama answered 503: {BUSY}"),
        (
            Reply(text="A cat", error="an error was encountered while running the model"),
            "Ollama failed mid-answer: an error was encountered while running the model",
        ),
        (Reply(text="A cat sitting on", done=False), "the answer broke off before the model finished"),
        (Reply(text=" \n "), "the model answered with an empty caption"),
    ],
    ids=["runner-crash", "busy", "mid-stream-error", "no-done", "empty"],
)
def test_a_failed_answer_fails_that_image_only_and_writes_nothing(tmp_path, caption, server, reply, reason):
    for width, name in enumerate("abc", start=64):
        picture(tmp_path / f"{name}.jpg", size=(width, 48))
    server.answer = by_width({65: reply})

    run = caption(tmp_path, "--retries", 0)  # retrying is test_reliability.py's subject

    assert run.code == 1
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["a.txt", "c.txt"]
    assert f"FAILED b.jpg: {reason}" in run.err
    assert f"  failed b.jpg: {reason}" in run.err
    assert leftovers(tmp_path) == []


def test_an_answer_slower_than_the_timeout_fails_that_image(tmp_path, caption, server):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    server.answer = by_width({64: Reply(text="late", delay=2)}, default="on time")

    # One at a time: a request queued behind the slow one would wait past the timeout too.
    run = caption(tmp_path, "--timeout", 0.5, "--jobs", 1, "--retries", 0)

    assert run.code == 1
    assert "FAILED a.jpg: no answer within the timeout" in run.err
    assert (tmp_path / "b.txt").read_text() == "on time"


def test_a_server_that_goes_away_mid_run_stops_the_run_with_exit_1(tmp_path, caption, server):
    for name in "abcd":
        picture(tmp_path / f"{name}.jpg")
    server.answer = lambda chat: Reply(text="A red square", vanish=len(server.chats) == 2)

    run = caption(tmp_path, "--jobs", 1, "--wait-server", 1)  # one at a time: the second answer is the last

    assert run.code == 1
    assert len(list(tmp_path.glob("*.txt"))) == 2
    assert f"  {server.url} taken out of rotation: cannot reach the Ollama server for more than 1s" in run.err
    assert "stopped: no Ollama server left to ask; 2 images left for a rerun" in run.err
    assert "Traceback" not in run.err


def test_a_dropped_connection_is_retried(tmp_path, caption, server):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    dropped = []

    def drop_once(chat):
        if chat.picture().width == 65 and not dropped:
            dropped.append(chat)
            return Reply(drop=True)
        return "A red square"

    server.answer = drop_once

    run = caption(tmp_path)

    assert run.code == 0, run.err
    assert len(dropped) == 1 and len(server.chats) == 3
    assert (tmp_path / "b.txt").read_text() == "A red square"


def test_an_image_that_breaks_the_connection_every_time_fails_after_its_retries(tmp_path, caption, server):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    server.answer = by_width({65: Reply(drop=True)})

    run = caption(tmp_path, "--retries", 2)

    assert run.code == 1
    assert [chat.picture().width for chat in server.chats].count(65) == 3
    assert (
        "FAILED b.jpg: the connection to Ollama broke: Server disconnected without sending a response. "
        "(after 3 tries)"
    ) in run.err
    assert (tmp_path / "a.txt").exists()
    assert "taken out of rotation" not in run.err and "not answering" not in run.err


def test_ollama_host_is_the_default_host(tmp_path, server, monkeypatch, capsys):
    from conftest import captioner

    picture(tmp_path / "a.jpg")
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    assert captioner.main([str(tmp_path)]) == 0
    assert len(server.chats) == 1
