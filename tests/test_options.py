"""Model options and a system prompt (issue 20 items 4 and 5): the stand-in takes options as each
server does, and records a system message apart from the prompt."""

from __future__ import annotations

import httpx
import pytest


def chat_body(model: str = "llava:13b", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False, **fields}


# -- the stand-in takes options as the servers do --------------------------------------------


def test_the_stand_in_takes_ollamas_options_as_ollama_does(make_server):
    server = make_server(answer=lambda chat: "A caption.")
    # api/types.go, Options.FromMap: a known option is taken, an unknown one skipped (a log line),
    # one of the wrong type fails the request with a 500.
    options = {"repeat_penalty": 1.1, "top_k": 40, "mirostat": 2}
    answer = httpx.post(f"{server.url}/api/chat", json=chat_body(options=options), timeout=10)
    assert answer.status_code == 200
    assert server.chats[-1].options == options and server.chats[-1].ignored == ["mirostat"]

    for wrong, error in [
        ({"top_k": "40"}, 'option "top_k" must be of type integer'),
        ({"repeat_penalty": True}, 'option "repeat_penalty" must be of type float32'),
        ({"stop": "###"}, 'option "stop" must be of type array'),
    ]:
        answer = httpx.post(f"{server.url}/api/chat", json=chat_body(options=wrong), timeout=10)
        assert (answer.status_code, answer.json()) == (500, {"error": error})
    assert len(server.chats) == 1


def test_the_stand_in_takes_vllms_and_ollamas_v1_fields_as_they_do(make_server):
    vllm = make_server(flavour="vllm", native=False, answer=lambda chat: "A caption.")
    fields = {"repetition_penalty": 1.1, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}
    answer = httpx.post(f"{vllm.url}/v1/chat/completions", json=chat_body(**fields), timeout=10)
    assert answer.status_code == 200
    assert vllm.chats[-1].ignored == ["repeat_penalty"]  # vLLM spells it repetition_penalty
    answer = httpx.post(f"{vllm.url}/v1/chat/completions", json=chat_body(top_k="forty"), timeout=10)
    assert (
        answer.status_code == 400 and "Input should be a valid integer" in answer.json()["error"]["message"]
    )

    ollama_v1 = make_server(flavour="ollama", native=True, answer=lambda chat: "A caption.")
    answer = httpx.post(
        f"{ollama_v1.url}/v1/chat/completions", json=chat_body(top_k=40, top_p=0.9), timeout=10
    )
    assert answer.status_code == 200 and ollama_v1.chats[-1].ignored == ["top_k"]
    answer = httpx.post(f"{ollama_v1.url}/v1/chat/completions", json=chat_body(top_p="high"), timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "json: cannot unmarshal string into Go struct field ChatCompletionRequest.top_p of type float64"
    )


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_the_stand_in_records_a_system_message_apart_from_the_prompt(make_server, path):
    server = make_server(answer=lambda chat: "A caption.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    answer = httpx.post(f"{server.url}{path}", json=chat_body(messages=messages), timeout=10)
    assert answer.status_code == 200
    chat = server.chats[-1]
    assert (chat.system, chat.prompt, chat.roles) == ("Be brief.", "hi", ["system", "user"])
