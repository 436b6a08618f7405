"""A third API, defined only here: the stand-in's toy API (tests/stand_in_ollama.py, TOY),
spoken by a subclass of the captioner's Api and registered in its APIS for one test. It proves
that a new server API is an addition: the shared tests of server behaviour (tests/test_apis.py)
caption through it with no change to the script.

Not streamed and with no thinking: the smallest API a caption server can have."""

from __future__ import annotations

import base64

from conftest import captioner


class ToyApi(captioner.Api):
    name = "toy"
    server_kind = "toy server"
    said_by = "the toy server"
    reached_as = "a toy server at"
    start_advice = "start the toy server"
    answers_like = "a toy server"
    answer_format = "the toy API's JSON"
    key_advice = "no key"
    refused_advice = ""

    @classmethod
    def settings(cls, args) -> dict:
        return {
            "hosts": captioner.server_urls(args.hosts or [], "--host", ollama_port=False),
            "model": args.model or captioner.DEFAULT_MODEL,
            "num_ctx": 0,
        }

    def models(self) -> list[dict]:
        response = self.quick.get("/toy/models")
        if response.status_code != 200:
            raise captioner.ServerSaid(
                response.status_code, problem(response), captioner.retry_after(response)
            )
        return [{"name": name, "owner": ""} for name in response.json()["models"]]

    def preflight(self, server, config, reporter, stop) -> str:
        def listing() -> list[dict]:
            return captioner.patiently(self.models, server, config, reporter, stop)

        served, trouble = self.first_contact(server, listing)
        if trouble:
            return trouble
        names = [model["name"] for model in served]
        if config.model not in names:
            raise captioner.CannotStart(
                f"{self.url} does not serve {config.model}; it serves: {', '.join(names)}"
            )
        server.model = config.model
        return ""

    def request(self, server, config, task, seed) -> captioner.Answer:
        picture = base64.b64encode(task.payload).decode("ascii")
        with self.errors():
            response = self.client.post(
                "/toy/caption", json={"model": server.model, "prompt": task.prompt, "image": picture}
            )
            if response.status_code != 200:
                raise captioner.ServerSaid(
                    response.status_code, problem(response), captioner.retry_after(response)
                )
            return captioner.Answer(response.json()["caption"], "stop", 0, 0)


def problem(response) -> str:
    try:
        return str(response.json().get("problem", ""))
    except ValueError:
        return response.text
