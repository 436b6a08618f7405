"""Issue 20: the servers and models of December 2026 (Ollama up to v0.40.2): gemma4 and Qwen 3.8,
thinking values and levels in /api/show, Ollama's MLX engine, and errors in their newer wordings.
The stand-in answers as upstream does (plain tests); what the captioner must make of it is
marked xfail where it does not do it yet."""

from __future__ import annotations

import http.server
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import captioner, distinct_pictures, picture, to_stand_in
from stand_in_ollama import (
    GEMMA4_MODEL,
    NO_USER_QUERY,
    QWEN38_MODEL,
    Reply,
    describe,
    llama_server_error,
)

GEMMA4 = "gemma4:e4b"
QWEN38 = "qwen3.8:9b"


def chat(server, model: str, **fields) -> list:
    """One streamed /api/chat request straight to the stand-in: its lines, or the error body."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    answer = to_stand_in.post(f"{server.url}/api/chat", json=body, timeout=10)
    if answer.status_code != 200:
        return [answer.status_code, answer.json()]
    return [json.loads(line) for line in answer.text.splitlines()]


# -- the stand-in answers as upstream does --------------------------------------------------


def test_the_stand_in_shows_how_each_model_takes_think(make_server):
    server = make_server(models={GEMMA4: GEMMA4_MODEL, QWEN38: QWEN38_MODEL}, answer=lambda c: "hi")
    shown = {
        name: to_stand_in.post(f"{server.url}/api/show", json={"model": name}, timeout=10).json()
        for name in (GEMMA4, QWEN38)
    }
    assert shown[GEMMA4]["thinking"] == {"values": [True, False], "default": True}
    assert shown[QWEN38]["thinking"] == {"values": ["low", "medium", "high", "max"], "default": "high"}
    assert shown[GEMMA4]["model_info"]["general.architecture"] == "gemma4"
    assert shown[QWEN38]["model_info"]["general.architecture"] == "qwen35"

    assert chat(server, GEMMA4)[0]["message"]["thinking"]  # gemma4 thinks by default
    assert not any(line["message"].get("thinking") for line in chat(server, GEMMA4, think=False))
    assert chat(server, QWEN38, think="low")[0]["message"]["thinking"]
    assert chat(server, QWEN38, think=False)[0]["message"]["thinking"]  # no false: its default
    assert chat(server, QWEN38, think="banana") == [
        400,
        {"error": 'invalid think value: "banana" (must be "high", "medium", "low", "max", true, or false)'},
    ]


def test_the_stand_in_before_pr_18473_shows_no_thinking_values_though_its_models_take_them(make_server):
    server = make_server(models={QWEN38: QWEN38_MODEL}, answer=lambda c: "hi", shows_thinking=False)
    shown = to_stand_in.post(f"{server.url}/api/show", json={"model": QWEN38}, timeout=10).json()
    assert "thinking" not in shown
    assert "thinking" in shown["capabilities"]
    assert chat(server, QWEN38, think=False)[0]["message"]["thinking"]  # no false: its default, as before


def test_the_stand_in_on_mlx_answers_gemma4_without_thinking_with_nothing_and_overflows_in_its_words(
    make_server,
):
    server = make_server(models={GEMMA4: GEMMA4_MODEL}, engine="mlx", answer=lambda c: "A red square.")
    lines = chat(server, GEMMA4, think=False)
    assert "".join(line["message"]["content"] for line in lines) == ""
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert "".join(line["message"]["content"] for line in chat(server, GEMMA4)) == "A red square."

    server.answer = lambda c: Reply(text="A red square.", prompt_tokens=4563)
    assert chat(server, GEMMA4, think=True) == [
        500,
        {"error": "input length (4563 tokens) exceeds the model's maximum context length"},
    ]
    assert chat(server, GEMMA4, think=True, options={"num_ctx": 8192})[-1]["done"] is True


def test_the_stand_in_on_mlx_answers_one_request_at_a_time_whatever_its_slots(tmp_path, caption, make_server):
    # x/mlxrunner/sample.go:519: batch size 1, whatever OLLAMA_NUM_PARALLEL says.
    expected = distinct_pictures(tmp_path, 4)
    mlx = make_server(engine="mlx", slots=4, latency=0.1)

    run = caption(tmp_path, "--jobs", 4, host=mlx.url)

    assert run.code == 0, run.err
    assert mlx.most_in_flight >= 2 and len(mlx.chats) == 4  # sent together, answered one at a time:
    answered = sorted(chat.answered_at for chat in mlx.chats)  # 0.1 s apart (4 slots: all at once)
    assert all(later - earlier >= 0.05 for earlier, later in zip(answered, answered[1:]))
    assert {path: path.read_text() for path in expected} == expected


def test_the_stand_in_passes_on_llama_servers_error_as_a_json_string(server):
    server.answer = lambda c: Reply(status=500, error=llama_server_error(500, NO_USER_QUERY))
    status, body = chat(server, "llava:13b")
    assert status == 500
    assert json.loads(body["error"]) == {
        "error": {"code": 500, "message": "no user query found in messages", "type": "server_error"}
    }


# -- what the captioner does with them ------------------------------------------------------


def test_gemma4_on_ollamas_llama_engine_is_told_not_to_think_and_captions(tmp_path, caption, server):
    # Its thinking values list false: false is what it is sent.
    expected = distinct_pictures(tmp_path, 3)
    server.models[GEMMA4] = GEMMA4_MODEL

    run = caption(tmp_path, "--model", GEMMA4)

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == [False] * 3
    assert [chat.thinking_sent for chat in server.chats] == [0] * 3
    assert {path: path.read_text() for path in expected} == expected


def test_gemma4_on_mlx_ends_within_seconds_naming_the_cause_and_a_fix(tmp_path, caption, make_server):
    distinct_pictures(tmp_path, 6)
    mlx = make_server(models={GEMMA4: GEMMA4_MODEL}, engine="mlx")

    started = time.monotonic()
    run = caption(tmp_path, "--model", GEMMA4, "--jobs", 1, host=mlx.url)

    assert time.monotonic() - started < 10
    assert run.code == 1
    assert len(mlx.chats) == 1  # not one empty answer per image and its retries
    assert "empty" in run.err and "MLX" in run.err and "--think" in run.err
    assert list(tmp_path.glob("*.txt")) == []


def test_a_model_whose_thinking_values_lack_false_is_sent_its_lowest_level(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 2)
    server.models[QWEN38] = QWEN38_MODEL

    run = caption(tmp_path, "--model", QWEN38)

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == ["low", "low"]
    assert {path: path.read_text() for path in expected} == expected
    assert "thinks although asked not to" not in run.err


def test_the_mlx_context_overflow_takes_the_server_out_with_a_fix_and_a_rerun_does_the_rest(
    tmp_path, caption, make_server
):
    expected = distinct_pictures(tmp_path, 6)
    mlx = make_server(engine="mlx", answer=lambda chat: Reply(text=describe(chat), prompt_tokens=4563))

    run = caption(tmp_path, "--jobs", 1, host=mlx.url)

    assert run.code == 1
    assert len(mlx.chats) == 1
    assert "taken out of rotation: " in run.err and "raise --num-ctx to 5120" in run.err
    assert list(tmp_path.glob("*.txt")) == []

    rerun = caption(tmp_path, "--num-ctx", 8192, host=mlx.url)
    assert rerun.code == 0, rerun.err
    assert {path: path.read_text() for path in expected} == expected


@pytest.mark.parametrize(
    "error", [NO_USER_QUERY, llama_server_error(500, NO_USER_QUERY)], ids=["ollama", "llama-server-era"]
)
def test_no_user_query_found_is_a_run_level_error_with_a_fix(tmp_path, caption, server, error):
    distinct_pictures(tmp_path, 6)
    server.models[QWEN38] = QWEN38_MODEL
    server.answer = lambda chat: Reply(status=500, error=error)

    run = caption(tmp_path, "--model", QWEN38, "--jobs", 1)

    assert run.code == 1
    assert len(server.chats) == 1
    assert run.err.count("no user query found in messages") == 1
    assert '{"error"' not in run.err  # the message, not llama-server's JSON around it
    assert "update Ollama" in run.err


@pytest.mark.parametrize("engine, slots", [("llama", 1), ("mlx", 4)], ids=["num-parallel-fell-back", "mlx"])
def test_a_server_answering_one_at_a_time_behind_jobs_5_is_named_once(
    tmp_path, caption, make_server, engine, slots
):
    # ollama#17556: OLLAMA_NUM_PARALLEL falls back to 1 slot when VRAM is short and /api/ps does
    # not say so; the stand-in's slots=1 is that server (its /api/ps lists nothing either).
    expected = distinct_pictures(tmp_path, 10)
    one = make_server(engine=engine, slots=slots, latency=0.4)  # see test_one_at_a_time.py on 0.15 s

    run = caption(tmp_path, "--jobs", 5, host=one.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert run.err.count("answers one request at a time") == 1
    assert "--jobs 1" in run.err


# -- thinking by what /api/show says ----------------------------------------------------------
# Since PR #18473 Ollama's /api/show says which values "think" takes; the official client drops
# them, so the captioner reads that one answer raw.

# A model that takes three levels and no false, as gpt-oss does (ollama/ollama#11752).
LEVELS_ONLY_MODEL = {
    "capabilities": ["completion", "vision", "thinking"],
    "families": ["gptoss"],
    "architecture": "gptoss",
    "thinking": {"values": ["low", "medium", "high"], "default": "medium"},
}


def preflight_requests(server) -> list:
    """What the run asked the server before its first caption request."""
    paths = [(method, path) for _, method, path in server.requests]
    return paths[: paths.index(("POST", "/api/chat"))] if ("POST", "/api/chat") in paths else paths


def test_the_thinking_values_cost_no_request_of_their_own(tmp_path, caption, server):
    distinct_pictures(tmp_path, 2)
    server.models[QWEN38] = QWEN38_MODEL

    run = caption(tmp_path, "--model", QWEN38)

    assert run.code == 0, run.err
    assert preflight_requests(server) == [("GET", "/api/tags"), ("POST", "/api/show")]
    assert [chat.think for chat in server.chats] == ["low", "low"]
    assert run.err.count(f"note: {QWEN38} cannot turn thinking off on {server.url}") == 1
    assert "it thinks at its lowest level, low" in run.err


def test_a_pulled_model_is_shown_again_and_sent_its_lowest_level(tmp_path, caption, server):
    distinct_pictures(tmp_path, 1)
    server.pullable[QWEN38] = QWEN38_MODEL

    run = caption(tmp_path, "--model", QWEN38, "--pull")

    assert run.code == 0, run.err
    assert preflight_requests(server) == [
        ("GET", "/api/tags"),
        ("POST", "/api/show"),  # 404: not there yet
        ("POST", "/api/pull"),
        ("POST", "/api/show"),
    ]
    assert [chat.think for chat in server.chats] == ["low"]


@pytest.mark.parametrize(
    "args, sent",
    [
        (["--think-level", "medium"], "medium"),
        (["--think-level", "max"], "max"),  # the ollama client 0.6.3 sends any string
        (["--think"], "high"),  # its own default
        (["--think", "--think-level", "low"], "low"),
    ],
    ids=["medium", "max", "think-is-its-default", "think-and-a-level"],
)
def test_think_level_sends_the_level_asked_for_with_thinkings_budget(tmp_path, caption, server, args, sent):
    expected = distinct_pictures(tmp_path, 2)
    server.models[QWEN38] = QWEN38_MODEL

    run = caption(tmp_path, "--model", QWEN38, *args)

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == [sent, sent]
    assert [chat.options["num_predict"] for chat in server.chats] == [2048, 2048]
    assert all(chat.thinking_sent > 50 for chat in server.chats)
    assert {path: path.read_text() for path in expected} == expected  # no thinking
    assert "cannot turn thinking off" not in run.err and "thinks although" not in run.err


def test_think_sends_true_to_a_model_whose_default_is_true(tmp_path, caption, server):
    distinct_pictures(tmp_path, 1)
    server.models[GEMMA4] = GEMMA4_MODEL

    run = caption(tmp_path, "--model", GEMMA4, "--think")

    assert run.code == 0, run.err
    assert [chat.think for chat in server.chats] == [True]


@pytest.mark.parametrize(
    "model, entry, level, said",
    [
        (
            "gpt-levels:20b",
            LEVELS_ONLY_MODEL,
            "max",
            "takes no thinking level max: it takes low, medium, high",
        ),
        (
            GEMMA4,
            GEMMA4_MODEL,
            "low",
            "takes no thinking level low: it thinks or not, at no level; run with --think",
        ),
        ("llava:13b", None, "low", "cannot think; run without --think-level"),
    ],
    ids=["a-level-it-does-not-list", "a-model-without-levels", "a-model-that-cannot-think"],
)
def test_a_level_the_model_does_not_take_is_refused_naming_those_it_takes(
    tmp_path, caption, server, model, entry, level, said
):
    picture(tmp_path / "a.png")
    if entry:
        server.models[model] = entry

    run = caption(tmp_path, "--model", model, "--think-level", level)

    assert run.code == 2
    assert f"error: model {model} on {server.url} {said}" in run.err
    assert len(run.err.strip().splitlines()) == 1
    assert server.chats == []


@pytest.mark.parametrize(
    "args, sent",
    [([], False), (["--think"], True)],
    ids=["thinking-off-as-before", "think-as-before"],
)
def test_an_ollama_that_shows_no_thinking_values_is_sent_what_it_was_sent_before(
    tmp_path, caption, make_server, args, sent
):
    expected = distinct_pictures(tmp_path, 2)
    older = make_server(models={QWEN38: QWEN38_MODEL}, shows_thinking=False)

    run = caption(tmp_path, "--model", QWEN38, *args, host=older.url)

    assert run.code == 0, run.err
    assert [chat.think for chat in older.chats] == [sent, sent]
    assert {path: path.read_text() for path in expected} == expected
    assert "cannot turn thinking off" not in run.err


def test_think_level_on_an_ollama_that_shows_no_thinking_values_is_refused(tmp_path, caption, make_server):
    picture(tmp_path / "a.png")
    older = make_server(models={QWEN38: QWEN38_MODEL}, shows_thinking=False)

    run = caption(tmp_path, "--model", QWEN38, "--think-level", "low", host=older.url)

    assert run.code == 2
    assert f"{older.url} does not say which thinking levels {QWEN38} takes" in run.err
    assert "update Ollama, or run with --think instead" in run.err
    assert older.chats == []


def test_think_level_is_refused_with_api_openai_with_the_reason(tmp_path, caption, server):
    picture(tmp_path / "a.png")

    run = caption(tmp_path, "--api", "openai", "--think-level", "low")

    assert run.code == 2
    assert (
        "--think-level is Ollama's: an OpenAI-compatible server does not say which thinking levels" in run.err
    )
    assert "--think lets it think as it does by default" in run.err
    assert server.requests == []


def test_think_level_enters_the_pass_identity_only_when_given():
    # The digests of version 7cd8973, before --think-level: a pass it left unfinished is the same
    # pass after the upgrade.
    plain = captioner.Config(folders=[Path(".")], prompt=captioner.Template("Describe it."))
    assert plain.settings_digest() == "e1d2ddaf4ceb72d5"
    assert plain.pass_identity("overwrite", QWEN38) == "2ed1723596e2a2b0"
    thinking = replace(plain, think=True, max_tokens=2048)
    assert thinking.settings_digest() == "4b9925fa1e97adb7"
    assert replace(thinking, think_level="medium").settings_digest() != thinking.settings_digest()


def test_a_pass_at_one_level_is_finished_once_and_another_level_is_another_pass(tmp_path, caption, server):
    distinct_pictures(tmp_path, 2)
    server.models[QWEN38] = QWEN38_MODEL
    overwrite = ["--model", QWEN38, "--existing", "overwrite"]

    assert caption(tmp_path, *overwrite, "--think-level", "medium", "--limit", 1).code == 0
    assert caption(tmp_path, *overwrite, "--think-level", "medium").code == 0
    assert [chat.think for chat in server.chats] == ["medium", "medium"]  # the pass finished, nothing twice

    assert caption(tmp_path, *overwrite, "--think-level", "high").code == 0
    assert [chat.think for chat in server.chats][2:] == ["high", "high"]


@pytest.mark.parametrize(
    "status, body, content_type",
    [
        (404, json.dumps({"error": "model 'm' not found"}), "application/json"),
        (401, "unauthorized", "text/plain"),
        (
            500,
            json.dumps({"error": llama_server_error(500, "no user query found in messages")}),
            "application/json",
        ),
        (502, "<html><head><title>502 Bad Gateway</title></head></html>", "text/html"),
        (200, "not JSON", "application/json"),
        (200, json.dumps({"details": {}}), "application/json"),  # no model_info: the client's own check
    ],
    ids=["404", "401", "500-json-string", "502-html", "200-not-json", "200-invalid"],
)
def test_a_failed_show_is_the_same_fault_as_through_the_client(status, body, content_type):
    captioner.import_run_libraries()
    with answering_show(status, body, content_type) as url:
        api = captioner.OllamaApi(url, 5)
        try:
            ours, theirs = failure(api, lambda: api.show("m")), failure(api, lambda: api.quick.show("m"))
        finally:
            api.close()
    assert (ours.fault, str(ours), ours.status) == (theirs.fault, str(theirs), theirs.status)


def failure(api, call):
    try:
        with api.errors():
            call()
    except captioner.TryFailed as failed:
        return failed
    raise AssertionError("no failure")


@contextmanager
def answering_show(status: int, body: str, content_type: str):
    """A server whose every /api/show answers this."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
