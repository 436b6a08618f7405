"""What concerns the server, against both APIs: Ollama's own (through the official client) and
the OpenAI-compatible one of vLLM, SGLang, llama-server, LM Studio and Ollama's /v1 (through the
captioner's httpx client). The same test runs against each; where the servers word things
differently, the test says what each says. The behaviours every API shares (requests, errors,
retries, the checks at the start) run against a third, toy API too (tests/toy_api.py), which
the script does not know: a new API is an addition."""

from __future__ import annotations

import threading

import pytest
from conftest import by_width, captioner, closed_port_url, distinct_pictures, picture
from stand_in_ollama import (
    BUSY,
    FLAVOURS,
    NO_MMPROJ,
    TEXT_MODEL,
    THINKING_MODEL,
    TOY,
    Reply,
)
from toy_api import ToyApi

# "ollama" is Ollama's native API; every other name is an OpenAI-compatible server's flavour
# ("ollama-v1": Ollama's own /v1). Where the servers differ (error bodies, thinking switches),
# a test runs against each; elsewhere against one of each API.
EVERY_SERVER = ["ollama", *(f"{flavour}-v1" if flavour == "ollama" else flavour for flavour in FLAVOURS)]
BOTH_APIS = ["ollama", "vllm"]
EVERY_API = [*BOTH_APIS, TOY]


@pytest.fixture
def run_against(make_server, caption, monkeypatch):
    """Start a stand-in of the given kind and run the captioner against it with the matching
    --api; returns (server, run)."""
    monkeypatch.setitem(captioner.APIS, ToyApi.name, ToyApi)

    def start(kind: str, **settings):
        if kind != "ollama":
            settings["flavour"] = kind.removesuffix("-v1")
            settings["native"] = kind == "ollama-v1"  # only Ollama answers its own API beside /v1
        return make_server(**settings)

    def run(kind: str, server, *args):
        return caption(*args, *api_args(kind), host=server.url)

    return start, run


def api_args(kind: str) -> list[str]:
    return {"ollama": [], TOY: ["--api", ToyApi.name]}.get(kind, ["--api", "openai"])


def captions_sent(server) -> list:
    """The chats that were captions, not the OpenAI preflight's probe picture."""
    return [chat for chat in server.chats if chat.picture().size != (64, 64)]


@pytest.mark.parametrize("kind", EVERY_API)
def test_each_image_is_captioned_through_the_api(kind, tmp_path, run_against):
    start, run = run_against
    expected = distinct_pictures(tmp_path, 3)
    server = start(kind)

    result = run(kind, server, tmp_path, "--seed", 7)

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected
    sent = captions_sent(server)
    assert len(sent) == 3
    if kind != TOY:  # which streams nothing: the smallest API
        assert all(chat.stream for chat in sent)
    if kind == "vllm":
        assert {chat.api for chat in sent} == {"openai"}
        assert sent[0].body["max_tokens"] == 512 and sent[0].body["seed"] == 7
        assert sent[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", EVERY_API)
def test_requests_are_in_flight_at_once(kind, tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 6)
    server = start(kind, slots=3, latency=0.2)
    result = run(kind, server, tmp_path, "--jobs", 3)
    assert result.code == 0, result.err
    assert server.most_in_flight == 3


@pytest.mark.parametrize("kind", [*EVERY_API, "lmstudio"])
def test_a_busy_server_is_asked_again(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    replies = iter([Reply(status=503, error=BUSY, retry_after=0.3)])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"
    first, second = captions_sent(server)
    if kind != "ollama":  # the OpenAI-compatible servers' Retry-After is waited for
        assert second.received_at - first.answered_at >= 0.3


@pytest.mark.parametrize("kind", EVERY_SERVER)
def test_an_error_in_the_middle_of_an_answer_is_retried(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    replies = iter([Reply(text="A red", error="CUDA error: out of memory")])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"
    assert len(captions_sent(server)) == 2


@pytest.mark.parametrize("kind", EVERY_API)
def test_a_dropped_connection_is_retried(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    replies = iter([Reply(drop=True)])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"


@pytest.mark.parametrize("kind", [*EVERY_SERVER, TOY])
def test_a_refused_request_fails_its_image_once_and_names_the_servers_reason(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    picture(tmp_path / "b.png", size=(41, 32))
    server = start(kind)
    server.answer = by_width({40: Reply(status=400, error="image too strange")})

    result = run(kind, server, tmp_path)

    assert result.code == 1
    assert "FAILED a.png: " in result.err and "answered 400: image too strange" in result.err
    assert [chat.picture().width for chat in captions_sent(server)].count(40) == 1  # not retried
    assert (tmp_path / "b.txt").exists()


@pytest.mark.parametrize(
    "kind, said",
    [
        ("ollama", "request (5120 tokens) exceeds the available context size (4096 tokens)"),
        ("vllm", "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens."),
        ("llama-server", "request (5120 tokens) exceeds the available context size (4096 tokens)"),
    ],
)
def test_a_context_too_small_is_never_retried_and_the_fix_is_named(kind, said, tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 3)
    server = start(kind)
    server.answer = lambda chat: Reply(status=400, error=said) if chat.picture().width != 64 else "probe"

    result = run(kind, server, tmp_path, "--jobs", 1)

    assert result.code == 1
    assert len(captions_sent(server)) == 1  # the server is taken out at the first
    fix = "raise --num-ctx to" if kind == "ollama" else "--max-model-len"
    assert fix in result.err and "images left for a rerun" in result.err


@pytest.mark.parametrize("kind", EVERY_API)
def test_a_model_the_server_lacks_stops_the_run_before_any_image(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind, models={"qwen2.5vl:7b": THINKING_MODEL, "gemma3:4b": THINKING_MODEL})

    result = run(kind, server, tmp_path, "--model", "llava:13b")

    assert result.code == 2
    assert "llava:13b" in result.err
    if kind != "ollama":
        assert "it serves: qwen2.5vl:7b, gemma3:4b" in result.err
    assert server.chats == []


def test_without_model_the_one_model_the_server_serves_is_used_and_two_are_named(tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png")
    one = start("vllm", models={"Qwen/Qwen2.5-VL-7B-Instruct": THINKING_MODEL})
    assert run("vllm", one, tmp_path).code == 0
    assert {chat.body["model"] for chat in one.chats} == {"Qwen/Qwen2.5-VL-7B-Instruct"}

    two = start("vllm", models={"a/vision": THINKING_MODEL, "b/vision": THINKING_MODEL})
    result = run("vllm", two, tmp_path, "--existing", "overwrite")
    assert result.code == 2
    assert "serves 2 models (a/vision, b/vision): choose one with --model" in result.err


@pytest.mark.parametrize("kind", ["ollama", "llama-server", "ollama-v1"])
def test_a_model_that_cannot_see_stops_the_run_before_any_image_with_the_fix(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind, models={"llava:13b": TEXT_MODEL})

    result = run(kind, server, tmp_path, "--model", "llava:13b")

    assert result.code == 2
    if kind != "llama-server":  # Ollama says so in /api/show; its /v1 would caption blind
        assert "cannot see images" in result.err
    else:  # only the probe picture was sent
        assert (
            "cannot take a picture: the server was started without the model's vision projector" in result.err
        )
        assert NO_MMPROJ in result.err
    assert captions_sent(server) == []


@pytest.mark.parametrize("kind", EVERY_API)
def test_credentials_refused_stop_the_run(kind, tmp_path, run_against):
    start, run = run_against
    distinct_pictures(tmp_path, 3)
    server = start(kind)
    server.answer = lambda chat: (
        Reply(status=401, error="unauthorized") if chat.picture().width != 64 else "x"
    )

    result = run(kind, server, tmp_path, "--jobs", 1)

    assert result.code == 1
    assert "wants credentials" in result.err and "stopped: " in result.err
    assert len(captions_sent(server)) == 1


@pytest.mark.parametrize("kind", EVERY_API)
def test_credentials_refused_at_the_start_end_the_run_before_any_image(kind, tmp_path, run_against):
    """No other server would let us in either: a 401 to the model listing ends the run, as a 401
    to a caption request does (found while making the servers adapters: Ollama's API left such a
    server out and went on with the others)."""
    start, run = run_against
    picture(tmp_path / "a.png")
    refusing = start(kind, models_reply=Reply(status=401, error="unauthorized"))
    answering = start(kind)

    result = run(kind, refusing, tmp_path, "--host", answering.url)

    assert result.code == 2
    assert result.err.startswith(f"error: {refusing.url}: ") and "wants credentials" in result.err
    assert captions_sent(answering) == [] and not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("kind", EVERY_API)
def test_nothing_listening_stops_the_run_with_the_address(kind, tmp_path, caption, run_against):
    picture(tmp_path / "a.png")
    url = closed_port_url()
    result = caption(
        tmp_path, *api_args(kind), "--wait-server", 0, host=url
    )  # the wait: test_hostile_servers.py
    assert result.code == 2
    reached = {"ollama": "Ollama at", TOY: "a toy server at"}.get(kind, "a server at")
    assert f"cannot reach {reached} {url}" in result.err


@pytest.mark.parametrize("kind", EVERY_SERVER)
def test_a_thinking_model_is_asked_not_to_think_and_thinking_never_reaches_a_caption(
    kind, tmp_path, run_against
):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind, models={"qwen3-vl:8b": THINKING_MODEL})

    result = run(kind, server, tmp_path, "--model", "qwen3-vl:8b")

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A PNG picture, 40x32 pixels."
    assert sum(chat.thinking_sent for chat in server.chats) == 0


@pytest.mark.parametrize("kind", ["vllm", "llama-server"])
def test_thinking_that_comes_anyway_is_left_out_of_the_caption(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind, models={"qwen3-vl:8b": {**THINKING_MODEL, "thinking_only": True}})

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A PNG picture, 40x32 pixels."
    assert "thinks although asked not to" in result.err


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_runaway_answer_is_cut_off_as_it_loops_and_asked_again(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    replies = iter([Reply(text="a red car, ", endless=True)])
    server.answer = lambda chat: next(replies, "A red car") if chat.picture().width == 40 else "probe"

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red car"
    runaway = captions_sent(server)[0]
    threading.Event().wait(0.2)  # the stand-in notes the hang-up as it next writes
    assert runaway.hung_up and runaway.tokens_sent < 200


def test_lm_studio_answering_an_error_with_200_is_an_error_and_retried(tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start("lmstudio")
    replies = iter([Reply(error="Model unloaded", error_in_200=True)])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run("lmstudio", server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"


def test_the_openai_server_comes_from_openai_base_url_never_ollama_host_and_gets_the_key(
    tmp_path, make_server, monkeypatch, capsys
):
    picture(tmp_path / "a.png")
    server = make_server(flavour="vllm")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
    monkeypatch.setenv("OLLAMA_HOST", closed_port_url())
    monkeypatch.setenv("MY_KEY", "s3cret")

    code = captioner.main([str(tmp_path), "--api", "openai", "--api-key-env", "MY_KEY"])

    err = capsys.readouterr().err
    assert code == 0, err
    assert {chat.authorization for chat in server.chats} == {"Bearer s3cret"}
    assert "s3cret" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-ctx", "8192"], "--num-ctx is Ollama's"),
        (["--keep-alive", "1h"], "--keep-alive is Ollama's"),
        (["--pull"], "--pull is Ollama's"),
        (["--api-key-env", "NOPE_NOT_SET"], "NOPE_NOT_SET is not set"),
    ],
)
def test_what_means_nothing_to_an_openai_server_is_refused_with_the_reason(
    tmp_path, args, message, caption, server
):
    picture(tmp_path / "a.png")
    result = caption(tmp_path, "--api", "openai", *args)
    assert result.code == 2
    assert message in result.err
    assert server.requests == []


def test_an_openai_server_given_without_its_port_is_refused(tmp_path, caption):
    picture(tmp_path / "a.png")
    result = caption(tmp_path, "--api", "openai", host="gpu1")
    assert result.code == 2
    assert "needs its port, such as http://gpu1:8000" in result.err


@pytest.mark.parametrize(
    "kind, status, said",
    [
        ("llama-server", 503, "Loading model"),
        ("vllm", 429, "Rate limit exceeded"),  # a rate-limiting proxy in front of the server
    ],
)
def test_a_server_busy_or_still_loading_its_model_is_waited_for_before_the_run(
    kind, status, said, tmp_path, run_against
):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    loading = iter([Reply(status=status, error=said, retry_after=0.2)])
    server.answer = lambda chat: (
        next(loading, "A red square") if chat.picture().width == 64 else "A red square"
    )

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert f"is busy or loading (The server answered {status}: {said}); waiting up to 5m00s" in result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_answer_cut_off_at_the_token_limit_fails_its_image_and_is_never_written(
    kind, tmp_path, run_against
):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    server.answer = lambda chat: "A red square on a white table in the light of a late afternoon"

    result = run(kind, server, tmp_path, "--max-tokens", 5, "--retries", 0)

    assert result.code == 1
    assert "FAILED a.png: the answer was cut off at the token limit (raise --max-tokens" in result.err
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("kind", [*BOTH_APIS, "llama-server"])
def test_an_answer_that_ends_before_the_model_finished_is_not_written_and_asked_again(
    kind, tmp_path, run_against
):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    # No final line, no finish reason: a connection cut cleanly mid-answer, by a proxy say.
    replies = iter([Reply(text="A red", done=False)])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run(kind, server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"
    assert len(captions_sent(server)) == 2


def test_events_without_a_space_after_data_are_read(tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start("vllm")
    server.answer = lambda chat: Reply(text="A red square", unspaced_events=True)

    result = run("vllm", server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"


def test_a_retry_after_of_days_is_waited_for_no_longer_than_the_cap(tmp_path, run_against, monkeypatch):
    # The cap, 300 s, is not one of the pauses LLAVA_CAPTION_PAUSE_SCALE shrinks: lowered here
    # so that a run bounded by it ends at once, and one that takes the server at its word
    # (28 hours) outlasts the test's time limit.
    monkeypatch.setattr(captioner, "RETRY_AFTER_LONGEST", 0.2)
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start("vllm")
    replies = iter([Reply(status=429, error="Rate limit exceeded", retry_after=100_000)])
    server.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run("vllm", server, tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"
    assert len(captions_sent(server)) == 2
