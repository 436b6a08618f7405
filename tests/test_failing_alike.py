"""A server whose answers all fail the same way from the start is taken out, naming the cause and
the most likely fix, within seconds rather than image by image (issue 20); one unlucky image, or a
server that has answered well, is not. And the errors recognised by their words since Ollama 0.40:
the MLX engine's context overflow, Qwen 3.8's "no user query", llama-server's JSON inside Ollama's."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import captioner, distinct_pictures
from stand_in_ollama import (
    GEMMA4_MODEL,
    NO_USER_QUERY,
    THINKING_MODEL,
    Reply,
    describe,
    llama_server_error,
)

Fault = captioner.Fault
TryFailed = captioner.TryFailed


def unrendered(chat) -> Reply:
    """A 500 nobody listed, its words different for each picture (a position in the template)."""
    return Reply(status=500, error=f"template: caption:{chat.picture().width}:7: unexpected EOF")


def taken_out(err: str) -> list[str]:
    return [line for line in err.splitlines() if "taken out of rotation" in line]


# -- what counts as failing alike (no server) -----------------------------------------------


def failed(reason: str, fault=Fault.SERVER_STRUGGLING, status: int = 500) -> TryFailed:
    return TryFailed(fault, reason, status=status)


def test_failures_alike_are_told_apart_from_their_images_names_numbers_and_the_models_words():
    key = captioner.alike_key
    first = key(
        failed("Ollama answered 500: template: 40:7: unexpected EOF in img000.png"), Path("img000.png")
    )
    other = key(failed("Ollama answered 500: template: 41:12: unexpected EOF in b.png"), Path("b.png"))
    assert first == other
    empty = Fault.UNFIT_ANSWER
    assert key(failed("the answer repeats itself: 'a cat, a cat…'", empty, 0), Path("a.png")) == key(
        failed("the answer repeats itself: \"a dog's, a dog's…\"", empty, 0), Path("b.png")
    )
    assert first != key(failed("Ollama answered 500: model runner has unexpectedly stopped"), Path("a.png"))
    assert first != key(failed("Ollama answered 500: template: 40:7: unexpected EOF", status=502), Path("a"))


@pytest.mark.parametrize(
    "one, other",
    [
        ("couldn't decode 'jouknv' for request", "couldn't decode 'qzrtw' for request"),
        ("can't render `ab` here", "can't render `xyz` here"),
        ("no template for \u00abab\u00bb", "no template for \u00abxyz\u00bb"),
    ],
    ids=["after-a-contraction", "backticks", "guillemets"],
)
def test_what_a_reason_quotes_is_left_out_however_it_is_quoted(one, other):
    assert captioner.alike_key(failed(one), Path("a.png")) == captioner.alike_key(
        failed(other), Path("b.png")
    )


def test_a_server_is_watched_until_two_images_fail_for_good_alike():
    watch = captioner.FailureWatch()
    eof = failed("Ollama answered 500: template: unexpected EOF")
    assert watch.fails_alike(eof, Path("a.png")) is False  # one image alone: maybe the image's doing
    assert watch.fails_alike(eof, Path("b.png")) is True


def test_a_different_failure_starts_the_count_again_and_what_the_server_did_not_say_is_not_counted():
    watch = captioner.FailureWatch()
    eof = failed("Ollama answered 500: template: unexpected EOF")
    watch.fails_alike(eof, Path("a"))
    assert watch.fails_alike(failed("Ollama answered 500: out of memory"), Path("d")) is False
    for uncounted in [
        failed("no answer within the timeout (raise --timeout if the server is only busy)", status=0),
        failed("the answer broke off before the model finished", status=0),
        failed("the model refused: 'I cannot describe people.'", Fault.UNFIT_ANSWER, 0),
        failed("the answer repeats itself: 'a car, a car, a car…'", Fault.UNFIT_ANSWER, 0),
        failed("the answer was cut off at the token limit (raise --max-tokens)", Fault.UNFIT_ANSWER, 0),
        failed("Ollama answered 400: Failed to load image or audio file", Fault.REQUEST_REFUSED, 400),
        failed("cannot reach the Ollama server", Fault.SERVER_DOWN, 0),
        failed("Ollama answered 503: server busy", Fault.SERVER_BUSY, 503),
    ]:
        assert watch.fails_alike(uncounted, Path("e")) is False
    assert watch.images == [Path("d")]


def test_once_a_server_has_answered_well_it_is_never_taken_out_for_failing_alike():
    watch = captioner.FailureWatch()
    watch.answered_well()
    eof = failed("Ollama answered 500: template: unexpected EOF")
    assert not any(watch.fails_alike(eof, Path(f"{n}.png")) for n in range(10))


@pytest.mark.parametrize(
    "values, fix",
    [
        ((), "run with --think (thinking on)"),
        ((True, False), "run with --think (thinking on)"),
        (("low", "medium", "high", False), "try --think-level low"),
    ],
)
def test_the_fix_for_a_model_silent_without_thinking_is_its_least_thinking(values, fix):
    said = captioner.silence_fix(SimpleNamespace(thinking_values=values))
    assert said.startswith("the model returns nothing with thinking off (a known bug of Ollama's MLX engine")
    assert said.endswith(fix)


# -- errors in the words of Ollama 0.40 (no server) -----------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        NO_USER_QUERY,
        llama_server_error(500, NO_USER_QUERY),
        {"code": 500, "message": NO_USER_QUERY, "type": "server_error"},  # mid-answer: decoded twice
    ],
    ids=["plain", "json-string", "decoded"],
)
def test_an_error_inside_llama_servers_json_is_read_by_its_message(error):
    captioner.import_run_libraries()
    assert captioner.inner_message(error) == NO_USER_QUERY
    failure = captioner.classified(captioner.ServerSaid(500, error), captioner.OllamaApi)
    assert failure.fault is Fault.MODEL_UNUSABLE
    assert str(failure).endswith(f"(Ollama said: {NO_USER_QUERY})")
    assert "update Ollama" in str(failure) and "{" not in str(failure)


def test_an_unknown_error_inside_llama_servers_json_is_shown_without_it():
    captioner.import_run_libraries()
    failure = captioner.classified(
        captioner.ServerSaid(500, llama_server_error(500, "template: unexpected EOF")), captioner.OllamaApi
    )
    assert (failure.fault, str(failure)) == (
        Fault.SERVER_STRUGGLING,
        "Ollama answered 500: template: unexpected EOF",
    )


def test_the_mlx_overflow_asks_for_a_context_on_ollama_and_of_the_server_on_openai():
    said = "input length (4563 tokens) exceeds the model's maximum context length"
    assert captioner.status_fault(500, said) is Fault.MODEL_UNUSABLE
    fix = captioner.unusable_model_fix(said, captioner.OllamaApi)
    assert "raise --num-ctx to 5120" in fix and "soft limit" in fix
    assert captioner.unusable_model_fix(said, captioner.OpenAiApi) == captioner.OpenAiApi.context_fix
    # Not a context to compute: the fix stays whole on either API.
    assert "update Ollama" in captioner.unusable_model_fix(NO_USER_QUERY, captioner.OpenAiApi)


# -- runs against the stand-in --------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        unrendered,
        lambda chat: Reply(status=500, error=llama_server_error(500, unrendered(chat).error)),
        lambda chat: Reply(text="A red", error=unrendered(chat).error),  # mid-answer
    ],
    ids=["500", "llama-server-json", "mid-answer"],
)
def test_an_error_nobody_listed_on_every_answer_ends_the_run_within_seconds_naming_it(
    tmp_path, caption, server, answer
):
    distinct_pictures(tmp_path, 8)
    server.answer = answer
    captioner.import_run_libraries()  # a worker's first import takes seconds on a loaded machine

    started = time.monotonic()
    run = caption(tmp_path, "--jobs", 1)

    assert time.monotonic() - started < 10
    assert run.code == 1
    assert len(server.chats) < 4 * 8  # not 4 tries of every image
    [line] = taken_out(run.err)
    assert "its first 2 images failed alike, after all their tries, and none has succeeded: " in line
    assert "unexpected EOF" in line
    assert "its log says why; update it, or choose another model" in line
    assert '{"error"' not in run.err
    assert "images left for a rerun" in run.err
    assert list(tmp_path.glob("*.txt")) == []


def test_empty_answers_from_the_start_end_the_run_after_a_second_image(tmp_path, caption, server):
    distinct_pictures(tmp_path, 6)
    server.answer = lambda chat: ""

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert len(server.chats) == 8  # an empty answer is asked again at once: two images' 4 tries
    [line] = taken_out(run.err)
    assert "its first 2 images failed alike" in line
    assert "the model answered with an empty caption; " in line and "try another prompt or model" in line
    assert "4 images left for a rerun" in run.err


@pytest.mark.parametrize(
    "answer",
    [
        Reply(text="A red fox sitting in deep snow under a", done_reason="length"),
        Reply(text="a red car, " * 40),
    ],
    ids=["cut-off", "loop"],
)
def test_answers_that_depend_on_the_picture_never_take_the_server_out(tmp_path, caption, server, answer):
    # Two hard pictures first in a folder (and alone in every rerun after) must not stop the run.
    expected = distinct_pictures(tmp_path, 4)
    hard = {40, 41}
    server.answer = lambda chat: answer if chat.picture().width in hard else describe(chat)

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert taken_out(run.err) == []
    assert run.err.count("(after 4 tries)") == 2 * 2  # as each fails, and in the summary
    rerun = caption(tmp_path, "--jobs", 1)
    assert taken_out(rerun.err) == [] and rerun.err.count("(after 4 tries)") == 2 * 2
    assert [path.exists() for path in expected] == [False, False, True, True]


def test_a_thinking_model_that_answers_nothing_with_thinking_off_is_told_to_think(tmp_path, caption, server):
    distinct_pictures(tmp_path, 6)
    server.models["qwen3-vl:8b"] = THINKING_MODEL
    server.answer = lambda chat: ""

    run = caption(tmp_path, "--model", "qwen3-vl:8b", "--jobs", 1)

    assert run.code == 1
    assert len(server.chats) == 8 and {chat.think for chat in server.chats} == {False}
    [line] = taken_out(run.err)
    assert "the model returns nothing with thinking off" in line and line.endswith(
        "run with --think (thinking on)"
    )


def test_one_image_that_fails_every_try_fails_alone_and_the_run_goes_on(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path, 4)
    del expected[tmp_path / "img000.txt"]
    # The first image sent; an unfit answer is asked again at once, so its 4 tries come in a row.
    server.answer = lambda chat: "" if chat.picture().width == 40 else describe(chat)

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert taken_out(run.err) == []
    assert "FAILED img000.png: the model answered with an empty caption (after 4 tries)" in run.err
    assert {path: path.read_text() for path in expected} == expected


def test_a_server_that_answered_well_first_fails_its_images_one_by_one(tmp_path, caption, server):
    distinct_pictures(tmp_path, 4)
    server.answer = lambda chat: describe(chat) if chat.picture().width == 40 else unrendered(chat)

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert taken_out(run.err) == []
    assert (tmp_path / "img000.txt").exists()
    assert run.err.count("unexpected EOF (after 4 tries)") == 2 * 3  # as each fails, and in the summary


def test_of_several_servers_only_the_one_failing_alike_is_taken_out_and_the_others_do_the_work(
    tmp_path, caption, make_server
):
    # --retries 0: each failed try is an image failed for good, so the failing server's first two
    # images are what it costs (with retries, an image's tries may go to either server).
    expected = distinct_pictures(tmp_path, 8)
    failing, good = make_server(answer=unrendered), make_server()

    run = caption(tmp_path, "--jobs", 1, "--retries", 0, "--host", failing.url, host=good.url)

    assert run.code == 1
    assert [line.strip().split(" taken out")[0] for line in taken_out(run.err)] == [failing.url]
    assert len(failing.chats) == 2 and run.err.count("unexpected EOF") == 2 * 2 + 1
    written = {path: path.read_text() for path in expected if path.exists()}
    assert len(written) == 6 and all(expected[path] == text for path, text in written.items())


def test_gemma4_answering_nothing_after_a_good_answer_is_asked_again(tmp_path, caption, server):
    # ollama/ollama#17823 is every answer on MLX: after a good one, an empty one is only unfit.
    expected = distinct_pictures(tmp_path, 3)
    server.models["gemma4:e4b"] = GEMMA4_MODEL
    empty_once = [Reply(text="")]
    server.answer = lambda chat: (
        empty_once.pop() if empty_once and chat.picture().width == 41 else describe(chat)
    )

    run = caption(tmp_path, "--model", "gemma4:e4b", "--jobs", 1)

    assert run.code == 0, run.err
    assert len(server.chats) == 4
    assert {path: path.read_text() for path in expected} == expected
