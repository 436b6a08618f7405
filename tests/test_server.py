"""Talking to Ollama: the preflight before any image, the request itself, and every way it can fail."""

from __future__ import annotations

import http.server
import itertools
import socket
import threading

import pytest
from conftest import (
    by_width,
    captioner,
    closed_port_url,
    distinct_pictures,
    leftovers,
    picture,
    run_script,
    wait_until,
)
from stand_in_ollama import OLD_VISION_MODEL, RUNNER_CRASH, TEXT_MODEL, VISION_MODEL, Reply


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
    run = caption(tmp_path, "--wait-server", 0, host=url)  # the wait: tests/test_hostile_servers.py
    assert run.code == 2
    assert run.err.splitlines() == [
        f"error: cannot reach Ollama at {url}; start it with 'ollama serve' or point --host (or OLLAMA_HOST) at it",
    ]
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
        (
            Reply(text="A cat", error="an error was encountered while running the model"),
            "Ollama failed mid-answer: an error was encountered while running the model",
        ),
        (Reply(text="A cat sitting on", done=False), "the answer broke off before the model finished"),
        (Reply(text=" \n "), "the model answered with an empty caption"),
    ],
    ids=["runner-crash", "mid-stream-error", "no-done", "empty"],
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


@pytest.mark.parametrize("names, left", [("abcd", "2 images"), ("abc", "1 image")])
def test_a_server_that_goes_away_mid_run_stops_the_run_with_exit_1(tmp_path, caption, server, names, left):
    for name in names:
        picture(tmp_path / f"{name}.jpg")
    server.answer = lambda chat: Reply(text="A red square", vanish=len(server.chats) == 2)

    run = caption(tmp_path, "--jobs", 1, "--wait-server", 1)  # one at a time: the second answer is the last

    assert run.code == 1
    assert len(list(tmp_path.glob("*.txt"))) == 2
    assert f"  {server.url} taken out of rotation: cannot reach the Ollama server for more than 1s" in run.err
    assert f"stopped: no Ollama server left to ask; {left} left for a rerun" in run.err
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
    picture(tmp_path / "a.jpg")
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    assert captioner.main([str(tmp_path)]) == 0
    assert len(server.chats) == 1


def test_a_port_that_accepts_but_never_answers_is_named_in_seconds(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    with socket.socket() as silent:  # listens, so connections complete, but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run = caption(tmp_path, "--timeout", 600, host=url)  # --timeout is for answers, not this
    assert run.code == 2
    assert f"error: {url} accepts connections but sent no answer in " in run.err
    assert not (tmp_path / "a.txt").exists()


def test_a_dead_server_among_several_is_named_and_the_others_caption(tmp_path, make_server, caption):
    expected = distinct_pictures(tmp_path, 4)
    alive, dead = make_server(), closed_port_url()

    run = caption(tmp_path, "--host", dead, host=alive.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert run.err.startswith(f"warning: {dead} did not answer at the start: cannot reach Ollama at {dead}")
    assert f"  {dead} did not answer at the start: cannot reach Ollama" in run.err  # and in the summary


def test_when_no_server_answers_the_run_cannot_start(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    first, second = closed_port_url(), closed_port_url()
    run = caption(tmp_path, "--host", first, "--wait-server", 0, host=second)
    assert run.code == 2
    assert run.err.splitlines()[-1].startswith("error: no server answers: cannot reach Ollama at ")


def test_the_same_server_written_two_ways_is_one_server(tmp_path, make_server, caption):
    distinct_pictures(tmp_path, 6)
    server = make_server(slots=4, latency=0.2)
    port = server.httpd.server_address[1]

    run = caption(tmp_path, "--jobs", 2, "--host", f"http://localhost:{port}/", host=f"127.0.0.1:{port}")

    assert run.code == 0, run.err
    assert server.most_in_flight == 2  # one server's --jobs, not two servers' worth
    assert ": captioned 6" not in run.err  # no per-server lines: there is one server


@pytest.mark.parametrize("host", ["127.0.0.1:99999", "127.0.0.1:port", "ftp://127.0.0.1:21"])
def test_a_malformed_host_is_one_line_and_exit_2(tmp_path, caption, host):
    picture(tmp_path / "a.jpg")
    given = caption(tmp_path, host=host)
    # A process of its own: the ollama package reads OLLAMA_HOST as it is first imported.
    from_the_environment = run_script(tmp_path, env={"OLLAMA_HOST": host})
    for code, err in (
        (given.code, given.err),
        (from_the_environment.returncode, from_the_environment.stderr),
    ):
        assert code == 2
        assert len(err.splitlines()) == 1 and "is not a server address" in err


def test_ollama_host_with_a_trailing_space_still_works(tmp_path, server):
    picture(tmp_path / "a.jpg")
    result = run_script(tmp_path, env={"OLLAMA_HOST": server.url + " "})
    assert result.returncode == 0, result.stderr
    assert len(server.chats) == 1


def test_llava_on_ollama_0_6_4_to_0_6_7_is_a_vision_model(tmp_path, caption, server):
    # Those versions list capabilities but give llava only "completion" (PR #10509 fixed it).
    picture(tmp_path / "a.jpg")
    server.models["llava:13b"] = {"capabilities": ["completion"], "families": ["llama", "clip"]}
    run = caption(tmp_path)
    assert run.code == 0, run.err
    assert len(server.chats) == 1


@pytest.mark.parametrize(
    "status, advice",
    [(401, "wants credentials"), (403, "refuses this client")],
)
def test_a_server_that_refuses_us_stops_the_run_with_the_fix(tmp_path, caption, server, status, advice):
    distinct_pictures(tmp_path, 5)
    server.answer = lambda chat: Reply(status=status, error="unauthorized")

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert len(server.chats) == 1  # not one request per image, not a retry
    assert f"stopped: {server.url}: Ollama answered {status}: unauthorized; " in run.err
    assert advice in run.err and "5 images left for a rerun" in run.err
    assert list(tmp_path.glob("*.txt")) == []


@pytest.mark.parametrize(
    "status, error, said",
    [
        (413, "request entity too large", "the image is too large for this server: lower --max-size"),
        (422, "unprocessable entity", "Ollama answered 422: unprocessable entity"),
    ],
)
def test_a_request_the_server_will_never_take_fails_that_image_at_once(
    tmp_path, caption, server, status, error, said
):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    server.answer = by_width({65: Reply(status=status, error=error)})

    run = caption(tmp_path)

    assert run.code == 1
    assert [chat.picture().width for chat in server.chats].count(65) == 1
    assert "FAILED b.jpg: " in run.err and said in run.err
    assert (tmp_path / "a.txt").exists()


def test_a_proxy_saying_its_server_is_down_is_waited_for_without_using_tries(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 3)
    answers = itertools.count(1)

    def answer(chat):
        if next(answers) == 1:  # the proxy's Ollama goes down after the first answer, for 6 probes
            server.down = True  # (the pauses before them double from 0.025 s to 0.4 s at the tests' scale)
            threading.Thread(target=up_after_probes, args=(len(probes()) + 6,), daemon=True).start()
        return f"A PNG picture, {chat.picture().width}x32 pixels."

    def probes() -> list[float]:
        return [at for at, method, path in list(server.requests) if path == "/api/tags"]

    def up_after_probes(count: int) -> None:
        wait_until(lambda: len(probes()) >= count)
        server.down = False

    server.answer = answer

    run = caption(tmp_path, "--retries", 0, "--jobs", 1)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    # One line for the outage, with nginx's page reduced to its title; and one when it is over.
    assert (
        f"{server.url} stopped answering (Ollama answered 502: 502 Bad Gateway); waiting up to 5m" in run.err
    )
    assert f"{server.url} answers again" in run.err
    assert "<html>" not in run.err and "<center>" not in run.err
    after_preflight = probes()[1:]
    gaps = [later - earlier for earlier, later in zip(after_preflight, after_preflight[1:])]
    assert len(gaps) >= 5
    # Asked more and more slowly: each pause twice the one before it (test_policy.py checks them
    # exactly; here each gap also holds a request's own time, which a loaded machine stretches).
    assert all(gap >= captioner.PROBE_FIRST * 2**index for index, gap in enumerate(gaps)), gaps


def test_a_runaway_answer_is_cut_short_as_it_loops_and_asked_again(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    answers = iter([Reply(text="a cat on a mat, ", endless=True), "a cat on a mat"])
    server.answer = lambda chat: next(answers)

    run = caption(tmp_path, "--seed", 1)

    assert run.code == 0, run.err
    assert (tmp_path / "a.txt").read_text() == "a cat on a mat"
    runaway = server.chats[0]
    assert runaway.hung_up and runaway.tokens_sent < 200  # closed as soon as the loop showed
    assert [chat.options["seed"] for chat in server.chats] == [1, 2]


def test_answers_on_their_way_when_the_last_server_is_lost_are_still_written(tmp_path, make_server, caption):
    distinct_pictures(tmp_path, 4)
    server = make_server(slots=2)
    answers = itertools.count()

    def answer(chat):
        if next(answers) == 0:  # the model is gone, said once a second image is on its way
            wait_until(lambda: len(server.chats) >= 2)
            return Reply(status=404, error="model 'llava:13b' not found")
        return Reply(text="a slow but good caption", delay=0.5)

    server.answer = answer

    run = caption(tmp_path, "--jobs", 2, host=server.url)

    assert run.code == 1
    written = list(tmp_path.glob("*.txt"))
    assert len(written) == 1 and written[0].read_text() == "a slow but good caption"
    assert "stopped: no Ollama server left to ask; 3 images left for a rerun" in run.err
