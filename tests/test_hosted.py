"""Hosted APIs (OpenAI, Gemini's and OpenRouter's OpenAI-compatible endpoints): the stand-in
behaves as each is documented to, and the captioner sends each only what it takes."""

from __future__ import annotations

import httpx
import pytest
from stand_in_ollama import VISION_MODEL, StandInOllama

REASONING = "gpt-5-mini"  # an OpenAI reasoning model: max_completion_tokens, temperature 1 only
PLAIN = "gpt-4.1-mini"  # one that does not reason
# The 1x1 PNG every decoder takes.
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def body(model: str, **fields) -> dict:
    content = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture
def strict(make_server) -> StandInOllama:
    return make_server(flavour="openai", native=False, models={REASONING: VISION_MODEL, PLAIN: VISION_MODEL})


def post(stand_in: StandInOllama, request: dict) -> httpx.Response:
    return httpx.post(f"{stand_in.url}/v1/chat/completions", json=request, timeout=10)


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
    with httpx.stream("POST", f"{strict.url}/v1/chat/completions", json=request, timeout=10) as answer:
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
