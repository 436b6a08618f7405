"""Hosted APIs (OpenAI, Gemini's and OpenRouter's OpenAI-compatible endpoints): the stand-in
behaves as each is documented to, and the captioner sends each only what it takes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import captioner, distinct_pictures, picture, run_script, to_stand_in
from stand_in_ollama import VISION_MODEL, Reply, StandInOllama

REASONING = "gpt-5-mini"  # an OpenAI reasoning model: max_completion_tokens, temperature 1 only
PLAIN = "gpt-4.1-mini"  # one that does not reason
LATER = "gpt-5.1"  # a reasoning model that takes effort "none" and refuses "minimal"
# The 1x1 PNG every decoder takes.
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def body(model: str, **fields) -> dict:
    content = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture
def strict(make_server) -> StandInOllama:
    return make_server(flavour="openai", native=False, models={REASONING: VISION_MODEL, PLAIN: VISION_MODEL})


def post(stand_in: StandInOllama, request: dict) -> httpx.Response:
    return to_stand_in.post(f"{stand_in.url}/v1/chat/completions", json=request, timeout=10)


@pytest.mark.parametrize("argument", ["chat_template_kwargs", "top_k", "num_ctx"])
def test_strict_openai_refuses_an_argument_it_does_not_know(strict, argument):
    answer = post(strict, body(PLAIN, **{argument: 1}))
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "message": f"Unrecognized request argument supplied: {argument}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_strict_openai_refuses_max_tokens_and_temperature_of_a_reasoning_model(strict):
    error = post(strict, body(REASONING, max_tokens=10)).json()["error"]
    assert error["message"] == (
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    )
    assert (error["param"], error["code"]) == ("max_tokens", "unsupported_parameter")
    error = post(strict, body(REASONING, temperature=0.8)).json()["error"]
    assert error["message"] == (
        "Unsupported value: 'temperature' does not support 0.8 with this model. Only the default (1) value is supported."
    )
    assert (error["param"], error["code"]) == ("temperature", "unsupported_value")
    assert post(strict, body(PLAIN, max_tokens=10, temperature=0.8)).status_code == 200


def test_strict_openai_takes_reasoning_effort_only_from_a_reasoning_model(strict):
    assert post(strict, body(REASONING, reasoning_effort="minimal")).status_code == 200
    refused = post(strict, body(REASONING, reasoning_effort="none")).json()["error"]
    assert (
        refused["message"]
        == "Invalid value: 'none'. Supported values are: 'minimal', 'low', 'medium', and 'high'."
    )
    refused = post(strict, body(PLAIN, reasoning_effort="low")).json()["error"]
    assert refused["message"] == "Unrecognized request argument supplied: reasoning_effort"


def test_strict_openai_reports_reasoning_tokens_in_the_last_chunk(strict):
    request = body(REASONING, stream=True, stream_options={"include_usage": True}, reasoning_effort="low")
    with to_stand_in.stream("POST", f"{strict.url}/v1/chat/completions", json=request, timeout=10) as answer:
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = httpx.Response(200, content=events[-2]).json()["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 40}
    assert usage["completion_tokens"] > 40


def test_strict_openai_checks_the_image_detail(strict):
    request = body(PLAIN)
    request["messages"][0]["content"][1]["image_url"]["detail"] = "medium"
    error = post(strict, request).json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.detail"
    request["messages"][0]["content"][1]["image_url"]["detail"] = "low"
    assert post(strict, request).status_code == 200


# ---- the captioner against them ----

KEY = "sk-test-7f3a9c2e1b"  # a made-up key: it must appear in no output or file
HOSTED_MODELS = {
    **dict.fromkeys((REASONING, PLAIN, LATER), VISION_MODEL),
    "google/gemini-2.5-flash": VISION_MODEL,
}
# Each hosted flavour with a model of its own, and its thinking switched off in its own words.
THINKING_OFF = {
    ("openai", REASONING): {"reasoning_effort": "minimal"},
    ("openai", PLAIN): {},  # it refused reasoning_effort in the preflight: nothing to turn off
    ("gemini", "google/gemini-2.5-flash"): {"reasoning_effort": "none"},
    ("openrouter", "google/gemini-2.5-flash"): {"reasoning": {"effort": "none"}},
}
# What each sends the token limit as.
LIMIT_FIELD = {"openai": "max_completion_tokens", "gemini": "max_tokens", "openrouter": "max_tokens"}
KEY_ENV = {"openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY", "openrouter": "OPENROUTER_API_KEY"}
PROBE_WIDTH = 64  # the preflight's probe picture is 64x64; the tests' pictures are narrower


@pytest.fixture
def hosted(make_server, caption, monkeypatch):
    """A hosted flavour's stand-in, and a run of the captioner against it as --provider."""

    def start(flavour: str) -> StandInOllama:
        monkeypatch.setenv(KEY_ENV[flavour], KEY)
        return make_server(flavour=flavour, native=False, models=HOSTED_MODELS)

    def run(stand_in: StandInOllama, *args: object):
        return caption("--api", "openai", "--provider", stand_in.flavour, *args, host=stand_in.url)

    return start, run


def images_sent(stand_in: StandInOllama) -> list:
    return [chat for chat in stand_in.chats if chat.picture().width != PROBE_WIDTH]


@pytest.mark.parametrize(("flavour", "model"), list(THINKING_OFF))
def test_a_hosted_provider_is_sent_only_what_it_takes(flavour, model, tmp_path, hosted):
    """Every image captioned; each field the server refused is refused once, on the probe
    picture; no image request carries chat_template_kwargs, and thinking is off in the
    provider's own words."""
    start, run = hosted
    expected = distinct_pictures(tmp_path, 3)
    stand_in = start(flavour)

    result = run(stand_in, tmp_path, "--model", model, "--seed", 7)

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected
    refused = [error["param"] or error["message"].rsplit(" ", 1)[-1] for _, error in stand_in.refusals]
    assert len(refused) == len(set(refused))  # at most one 400 per field
    assert all(
        body["max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"] == 1
        for body, _ in stand_in.refusals
    )
    sent = images_sent(stand_in)
    assert len(sent) == 3
    for chat in sent:
        assert "chat_template_kwargs" not in chat.body
        assert LIMIT_FIELD[flavour] in chat.body
        assert {key: chat.body[key] for key in ("reasoning_effort", "reasoning") if key in chat.body} == (
            THINKING_OFF[flavour, model]
        )
    assert KEY not in result.out + result.err
    assert all(
        KEY not in path.read_text() for path in tmp_path.iterdir() if path.is_file() and path.suffix == ".txt"
    )


def test_a_reasoning_model_is_adapted_to_in_the_preflight_once(tmp_path, hosted):
    """OpenAI's reasoning model refuses temperature 0.8 (the captioner's default) on the probe
    picture; from then on no request carries it, and every image is captioned."""
    start, run = hosted
    distinct_pictures(tmp_path, 4)
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", REASONING, "--jobs", 2)

    assert result.code == 0, result.err
    assert [error["param"] for _, error in stand_in.refusals] == ["temperature"]
    assert "does not take temperature for this model: left out for the rest of the run" in result.err
    assert all("temperature" not in chat.body for chat in stand_in.chats)
    assert len(images_sent(stand_in)) == 4


def test_a_plain_openai_model_sheds_reasoning_effort_once(tmp_path, hosted):
    start, run = hosted
    distinct_pictures(tmp_path, 2)
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", PLAIN)

    assert result.code == 0, result.err
    assert [error["message"] for _, error in stand_in.refusals] == [
        "Unrecognized request argument supplied: reasoning_effort"
    ]
    assert all(chat.body.get("temperature") == 0.8 for chat in images_sent(stand_in))


def test_strict_openai_refuses_minimal_effort_from_gpt_5_1_and_later(strict_later):
    refused = post(strict_later, body(LATER, reasoning_effort="minimal")).json()["error"]
    assert refused["message"] == (
        "Unsupported value: 'minimal' is not supported with the 'gpt-5.1' model. "
        "Supported values are: 'none', 'low', 'medium', and 'high'."
    )
    assert (refused["param"], refused["code"]) == ("reasoning_effort", "unsupported_value")
    assert post(strict_later, body(LATER, reasoning_effort="none")).status_code == 200


@pytest.fixture
def strict_later(make_server) -> StandInOllama:
    return make_server(flavour="openai", native=False, models={LATER: VISION_MODEL})


def test_a_model_that_refuses_the_least_effort_gets_its_own_least_once(tmp_path, hosted):
    """GPT-5.1 and later refuse "minimal", the captioner's way of turning thinking down for
    OpenAI: the probe picture meets the refusal once and every image is sent "none", the least
    this model says it takes, so no image is refused and none spends reasoning."""
    start, run = hosted
    distinct_pictures(tmp_path, 3)
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", LATER, "--jsonl", tmp_path / "run.jsonl")

    assert result.code == 0, result.err
    assert sorted(error["param"] for _, error in stand_in.refusals) == ["reasoning_effort", "temperature"]
    assert "takes another reasoning_effort for this model: none (its least)" in result.err
    assert [chat.body.get("reasoning_effort") for chat in images_sent(stand_in)] == ["none"] * 3
    rows = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [row.get("reasoning_tokens", 0) for row in rows] == [0, 0, 0]


@pytest.mark.timeout(60)
def test_two_addresses_of_one_provider_are_paced_as_one_account(tmp_path, hosted, make_server):
    """One key, one account's limits: --rpm holds for the requests to both addresses together
    (a gateway on this machine and the API, say), not for each."""
    start, run = hosted
    distinct_pictures(tmp_path, 10)
    first, second = start("openai"), start("openai")

    result = run(first, tmp_path, "--model", PLAIN, "--rpm", 300, "--jobs", 2, "--host", second.url)

    assert result.code == 0, result.err
    # The images' requests (each address's probe picture goes before the run, one each).
    times = sorted(chat.received_at for chat in images_sent(first) + images_sent(second))
    assert len(times) == 10
    rate, burst, slack = 5.0, 1, 0.25  # a second; slack as in test_pacing.py
    for begin in range(len(times)):
        for end in range(begin, len(times)):
            assert end - begin + 1 <= burst + rate * (times[end] - times[begin] + slack), (begin, end)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--temperature", 0.5), "Unsupported value: 'temperature' does not support 0.5 with this model"),
        (("--option", "top_k=40"), "Unrecognized request argument supplied: top_k"),
    ],
)
def test_what_the_user_asked_for_is_refused_in_the_providers_words_not_dropped(args, said, tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", REASONING, *args)

    assert result.code == 2
    assert said in result.err
    assert not images_sent(stand_in) and not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize(
    ("flavour", "level", "sent"),
    [
        ("openai", "high", {"reasoning_effort": "high"}),
        ("gemini", "low", {"reasoning_effort": "low"}),
        ("openrouter", "max", {"reasoning": {"effort": "xhigh"}}),
    ],
)
def test_a_think_level_is_sent_in_the_providers_reasoning_words(flavour, level, sent, tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start(flavour)
    model = REASONING if flavour == "openai" else "google/gemini-2.5-flash"

    result = run(stand_in, tmp_path, "--model", model, "--think-level", level)

    assert result.code == 0, result.err
    (chat,) = images_sent(stand_in)
    assert {key: chat.body[key] for key in ("reasoning_effort", "reasoning") if key in chat.body} == sent


@pytest.mark.parametrize(
    ("model", "level", "said"),
    [
        # A level the provider has no word for, refused before anything is sent.
        (
            REASONING,
            "max",
            "--think-level max: OpenAI's reasoning_effort has no such level; it takes low, medium, high",
        ),
        # A model that does not reason, refused in OpenAI's words on the probe picture.
        (
            PLAIN,
            "low",
            "refuses reasoning_effort (--think-level) for gpt-4.1-mini: Unrecognized request argument",
        ),
    ],
)
def test_a_think_level_the_provider_or_model_lacks_is_refused(model, level, said, tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", model, "--think-level", level)

    assert result.code == 2
    assert said in result.err


def test_reasoning_tokens_are_counted_apart_from_the_captions(tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start("openai")
    jsonl = tmp_path / "metadata.jsonl"

    result = run(stand_in, tmp_path, "--model", REASONING, "--think-level", "low", "--jsonl", jsonl)

    assert result.code == 0, result.err
    (chat,) = images_sent(stand_in)
    (line,) = jsonl.read_text().splitlines()
    # The stand-in spent 40 reasoning tokens at "low" and streamed only the caption's: "tokens"
    # is the output billed (reasoning included), "reasoning_tokens" the part that is no caption.
    entry = json.loads(line)
    assert entry["tokens"] - entry["reasoning_tokens"] == chat.tokens_sent
    assert entry["reasoning_tokens"] == 40


def test_detail_is_sent_to_openai(tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start("openai")

    result = run(stand_in, tmp_path, "--model", PLAIN, "--detail", "low")

    assert result.code == 0, result.err
    for chat in stand_in.chats:
        assert chat.body["messages"][-1]["content"][1]["image_url"]["detail"] == "low"


@pytest.mark.parametrize("flavour", ["gemini", "vllm"])
def test_detail_is_refused_where_the_server_is_not_known_to_take_it(
    flavour, tmp_path, make_server, caption, monkeypatch
):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = make_server(flavour=flavour, native=False, models=HOSTED_MODELS)
    provider = ["--provider", "gemini"] if flavour == "gemini" else []

    result = caption(
        "--api", "openai", *provider, tmp_path, "--model", PLAIN, "--detail", "low", host=stand_in.url
    )

    assert result.code == 2
    assert "--detail is OpenAI's image_url.detail" in result.err
    assert not stand_in.chats


@pytest.mark.parametrize(
    "host",
    [
        "http://api.openai.com",
        "http://generativelanguage.googleapis.com/v1beta/openai",
        "http://openrouter.ai/api/v1",
        "http://api.openai.com./v1",  # a fully qualified name is the same host (red-team finding)
    ],
)
def test_a_hosted_provider_is_reached_over_https_only(host, tmp_path, caption, monkeypatch):
    for name in KEY_ENV.values():
        monkeypatch.setenv(name, KEY)
    picture(tmp_path / "a.png", size=(40, 32))

    result = caption("--api", "openai", tmp_path, "--model", PLAIN, host=host)

    assert result.code == 2
    assert "is reached over https only" in result.err and "--host https://" in result.err


def test_a_hosted_provider_needs_its_key_named_by_its_variable(tmp_path, caption, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    picture(tmp_path / "a.png", size=(40, 32))

    result = caption(
        "--api", "openai", tmp_path, host="https://generativelanguage.googleapis.com/v1beta/openai/"
    )

    assert result.code == 2
    assert "Gemini needs an API key: set GEMINI_API_KEY" in result.err


def test_a_server_of_ones_own_keeps_todays_request(tmp_path, make_server, caption):
    """vLLM (and every server no provider's host names) is sent today's body: max_tokens, the
    default temperature, thinking off in its chat template's words, no image detail."""
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = make_server(native=False)

    result = caption("--api", "openai", tmp_path, host=stand_in.url)

    assert result.code == 0, result.err
    for chat in stand_in.chats:
        assert set(chat.body) == {
            "model",
            "messages",
            "stream",
            "stream_options",
            "max_tokens",
            "temperature",
            "chat_template_kwargs",
        }
        assert chat.body["chat_template_kwargs"] == {"enable_thinking": False}
        assert set(chat.body["messages"][-1]["content"][1]["image_url"]) == {"url"}


def test_a_refusal_of_max_tokens_renames_it_for_the_rest_of_the_run():
    """Only OpenAI's reasoning models are known to refuse max_tokens, and OpenAI is sent
    max_completion_tokens from the start: the rename, for a provider sent max_tokens whose model
    refuses it (a gateway in front of OpenAI), is the preflight's reading of the 400 and the body
    every request is sent afterwards."""
    said = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    assert captioner.refused_field(said) == ("max_tokens", "max_completion_tokens")
    api = captioner.OpenAiApi("http://127.0.0.1:9", 5)
    try:
        api.provider = captioner.PROVIDERS["openrouter"]
        api.adapted = {"max_tokens": "max_completion_tokens", "temperature": None}
        sent = api.hosted_body({"model": "m", "max_tokens": 300, "temperature": 0.8})
    finally:
        api.close()
    assert sent == {"model": "m", "max_completion_tokens": 300}


def test_provider_and_detail_are_refused_with_ollamas_api(tmp_path, caption):
    picture(tmp_path / "a.png", size=(40, 32))
    for args in (("--provider", "openai"), ("--detail", "low")):
        result = caption(tmp_path, *args)
        assert result.code == 2 and f"{args[0]} is for --api openai" in result.err


# ---- behaviours every OpenAI-compatible server shares, strict (OpenAI) and lenient (vLLM) ----

RATE_LIMITED = "Rate limit reached for gpt-4.1-mini on requests per min (RPM): Limit 3, Used 3, Requested 1."


@pytest.fixture(params=["openai", "vllm"])
def either(request, make_server, caption, monkeypatch):
    """A strict (OpenAI's) or lenient (vLLM's) stand-in, and a run against it."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    stand_in = make_server(flavour=request.param, native=False, models={PLAIN: VISION_MODEL})
    provider = ["--provider", "openai"] if request.param == "openai" else []

    def run(*args: object):
        return caption("--api", "openai", *provider, "--model", PLAIN, *args, host=stand_in.url)

    return stand_in, run


@pytest.mark.parametrize(
    "trouble", [Reply(status=429, error=RATE_LIMITED, retry_after=0.2), Reply(drop=True)]
)
def test_a_rate_limit_or_a_dropped_connection_is_asked_again_on_either(trouble, tmp_path, either):
    stand_in, run = either
    picture(tmp_path / "a.png", size=(40, 32))
    replies = iter([trouble])
    stand_in.answer = lambda chat: next(replies, "A red square") if chat.picture().width == 40 else "probe"

    result = run(tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").read_text() == "A red square"
    assert len(images_sent(stand_in)) == 2


def test_a_refusal_met_by_an_image_is_no_adaptation(tmp_path, either):
    """Only the probe picture adapts: a 400 an image meets fails that image with the server's
    words, and the next image is sent as before."""
    stand_in, run = either
    picture(tmp_path / "a.png", size=(40, 32))
    picture(tmp_path / "b.png", size=(41, 32))
    said = "Unrecognized request argument supplied: temperature"
    stand_in.answer = lambda chat: (
        Reply(status=400, error=said) if chat.picture().width == 40 else "A red square"
    )

    result = run(tmp_path, "--retries", 0)

    assert result.code == 1
    assert f"failed a.png: The server answered 400: {said}" in result.err
    assert not (tmp_path / "a.txt").exists() and (tmp_path / "b.txt").read_text() == "A red square"
    assert all("temperature" in chat.body for chat in stand_in.chats)


def test_geminis_error_in_a_list_is_told_by_its_message(tmp_path, hosted):
    start, run = hosted
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = start("gemini")
    said = "Request contains an invalid argument."
    stand_in.answer = lambda chat: Reply(status=400, error=said) if chat.picture().width == 40 else "probe"

    result = run(stand_in, tmp_path, "--model", "google/gemini-2.5-flash", "--retries", 0)

    assert result.code == 1
    assert f"failed a.png: The server answered 400: {said}\n" in result.err


def test_the_docs_table_holds_each_providers_base_url_and_key():
    """docs/servers-and-models.md's table of hosted APIs says what PROVIDERS says."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "servers-and-models.md").read_text(
        encoding="utf-8"
    )
    rows = [line for line in page.splitlines() if line.startswith("| ") and "_API_KEY" in line]
    assert len(rows) == len(captioner.PROVIDERS)
    for provider, row in zip(captioner.PROVIDERS.values(), rows):
        assert row.startswith(f"| {provider.title} | `https://{provider.host}{provider.path}")
        assert f"`{provider.key_env}`" in row and "--api openai --host https://" in row


def test_a_refusal_of_what_the_user_asked_names_the_served_model(tmp_path, make_server, caption, monkeypatch):
    """Without --model, the server's one model is named."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    picture(tmp_path / "a.png", size=(40, 32))
    stand_in = make_server(flavour="openai", native=False, models={REASONING: VISION_MODEL})

    result = caption(
        "--api", "openai", "--provider", "openai", tmp_path, "--temperature", 0.5, host=stand_in.url
    )

    assert result.code == 2
    assert f"refuses temperature (--temperature) for {REASONING}: Unsupported value" in result.err


def test_a_provider_is_reached_at_its_documented_base_url_over_https(tmp_path, make_server, certificate):
    """Gemini's base URL as its docs give it (with /v1beta/openai/) is where /models and
    /chat/completions are asked; the key goes in its own variable."""
    expected = distinct_pictures(tmp_path, 2)
    stand_in = make_server(flavour="gemini", native=False, models=HOSTED_MODELS, certificate=certificate)

    result = run_script(
        tmp_path,
        *("--api", "openai", "--provider", "gemini", "--model", "google/gemini-2.5-flash"),
        *("--host", f"{stand_in.url}/v1beta/openai/"),
        env={"SSL_CERT_FILE": certificate[0], "GEMINI_API_KEY": KEY},
    )

    assert result.returncode == 0, result.stderr
    assert {path: path.read_text() for path in expected} == expected
    assert {chat.authorization for chat in stand_in.chats} == {f"Bearer {KEY}"}
    assert KEY not in result.stdout + result.stderr


def test_the_https_address_a_refusal_suggests_keeps_the_port(tmp_path, caption, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    picture(tmp_path / "a.png", size=(40, 32))

    result = caption("--api", "openai", "--provider", "openai", tmp_path, host="http://10.0.0.5:8080/v1")

    assert result.code == 2
    assert "--host https://10.0.0.5:8080/v1" in result.err


@pytest.mark.parametrize("quota", [False, True], ids=["rate-limited", "quota-spent"])
def test_a_probe_refused_for_the_rate_or_the_quota_is_not_blamed_on_the_model(
    quota, tmp_path, make_server, caption, monkeypatch
):
    # Found by a red-team pass: both said "model ... cannot take a picture".
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    picture(tmp_path / "a.png", size=(40, 32))
    settings = {"quota_spent": True} if quota else {"rate_limit": (0, 10**9), "rate_window": 0.3}
    stand_in = make_server(flavour="openai", native=False, models=HOSTED_MODELS, **settings)

    result = caption(
        "--api",
        "openai",
        "--provider",
        "openai",
        tmp_path,
        "--model",
        PLAIN,
        "--wait-server",
        1,
        host=stand_in.url,
    )

    assert result.code == 2
    assert "cannot take a picture" not in result.err
    said = "the quota is spent" if quota else "stayed busy or rate-limited for longer than --wait-server 1s"
    assert said in result.err
