"""Keeping servers busy: requests in flight, several servers, a server lost mid-run."""

from __future__ import annotations

import itertools
import re

import pytest
from conftest import distinct_pictures, picture
from stand_in_ollama import Reply


def assert_each_captioned_once_with_its_own_caption(expected: dict, chats: list) -> None:
    assert sorted(chat.picture().width for chat in chats) == list(range(40, 40 + len(expected)))
    assert {path: path.read_text() for path in expected} == expected


@pytest.mark.parametrize("slots, jobs", [(4, 4), (1, 3), (2, None)])
def test_jobs_requests_are_in_flight_at_once_whatever_the_servers_slots(
    tmp_path, make_server, caption, slots, jobs
):
    distinct_pictures(tmp_path, (jobs or 2) + 1)
    # The stand-in lowers its count before an answer's last line, as Ollama frees the slot
    # when generation ends, so a request sent the moment "done" is read never counts twice.
    server = make_server(slots=slots, latency=0.15)

    run = caption(tmp_path, *(["--jobs", jobs] if jobs else []), host=server.url)

    assert run.code == 0
    assert server.most_in_flight == (jobs or 2)  # 2 is the default


def test_every_image_is_captioned_exactly_once_under_concurrency(tmp_path, make_server, caption):
    expected = distinct_pictures(tmp_path, 40)
    server = make_server(slots=8, latency=0.05)

    run = caption(tmp_path, "--jobs", 8, host=server.url)

    assert run.code == 0
    assert_each_captioned_once_with_its_own_caption(expected, server.chats)


def test_two_servers_share_the_work(tmp_path, make_server, caption):
    expected = distinct_pictures(tmp_path, 20)
    first, second = make_server(latency=0.05), make_server(latency=0.05)

    run = caption(tmp_path, "--host", first.url, host=second.url)

    assert run.code == 0
    assert first.chats and second.chats
    assert_each_captioned_once_with_its_own_caption(expected, first.chats + second.chats)
    counts = {url: len(server.chats) for url, server in [(first.url, first), (second.url, second)]}
    for url, count in counts.items():
        assert f"  {url}: captioned {count}" in run.err


def test_a_server_that_dies_mid_run_hands_its_images_to_the_others(tmp_path, make_server, caption):
    expected = distinct_pictures(tmp_path, 24)
    steady = make_server(slots=2, latency=0.05)
    # Dies at its third answer, with more of our requests in flight or queued on it.
    dying = make_server(slots=1, latency=0.05)
    answers = itertools.count(1)
    dying.answer = lambda chat: Reply(text="A dying answer", vanish=next(answers) == 3)

    run = caption(tmp_path, "--jobs", 3, "--host", steady.url, host=dying.url)

    assert run.code == 0, run.err
    # The run ends long before --wait-server (5 minutes) would give up on it.
    assert f"  {dying.url} was not answering when the run ended: cannot reach the Ollama server" in run.err
    captions = {path: path.read_text() for path in expected}
    answered_by_dying = [path for path, text in captions.items() if text == "A dying answer"]
    assert len(answered_by_dying) == 3
    for path, caption_text in expected.items():
        if path not in answered_by_dying:
            assert captions[path] == caption_text
    assert len(steady.chats) == 24 - len(answered_by_dying)  # nothing captioned twice


def test_every_server_is_preflighted(tmp_path, make_server, caption):
    picture(tmp_path / "a.jpg")
    ready, bare = make_server(), make_server(models={})
    run = caption(tmp_path, "--host", ready.url, host=bare.url)
    assert run.code == 2
    assert f"model llava:13b is not on {bare.url}" in run.err
    assert ready.chats == []


@pytest.mark.parametrize("given, sent", [(None, "30m"), ("2h", "2h"), ("300", 300.0), ("-1", -1.0)])
def test_keep_alive_goes_with_every_request(tmp_path, caption, server, given, sent):
    distinct_pictures(tmp_path, 3)
    caption(tmp_path, *(["--keep-alive", given] if given else []))
    assert [chat.keep_alive for chat in server.chats] == [sent] * 3


def test_a_keep_alive_ollama_would_reject_is_refused_at_once(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--keep-alive", "5 minutes")
    assert run.code == 2
    assert re.search(r"--keep-alive: '5 minutes' is not a number of seconds or a duration", run.err)
    assert server.chats == []


def test_no_more_images_are_prepared_ahead_than_there_are_request_slots(
    tmp_path, make_server, caption, monkeypatch
):
    from conftest import captioner

    distinct_pictures(tmp_path, 12)
    server = make_server(slots=2, latency=0.05)
    prepared = []
    real_prepare = captioner.prepare_task
    monkeypatch.setattr(
        captioner, "prepare_task", lambda task, config: prepared.append(task) or real_prepare(task, config)
    )
    ahead = []
    server.answer = lambda chat: ahead.append(len(prepared) - len(server.chats)) or "A red square"

    run = caption(tmp_path, "--jobs", 2, host=server.url)

    assert run.code == 0 and len(prepared) == 12
    # Memory stays flat: at most one image per slot (2) is ready or being prepared, besides the
    # requests in flight that the server has not seen arrive yet (up to --jobs, 2).
    assert max(ahead) <= 4
