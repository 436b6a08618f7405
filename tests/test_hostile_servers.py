"""Servers and networks that work against the captioner (issue 17): a server or proxy that echoes
the API key back, answers without end, lines without end, proxies set in the environment, a
model listing that fails at once, https:// to a plain port, and a server restarting as a run
starts. Each runs against both APIs where the behaviour is shared, as tests/test_apis.py does."""

from __future__ import annotations

import importlib.util
import io
import os

import pytest
from conftest import by_width, captioner, closed_port_url, distinct_pictures, picture, run_script, wait_until
from stand_in_ollama import Reply

BOTH_APIS = ["ollama", "vllm"]
KEY = "sk-test-4f1c9e27b8d34a6f9e0c51d2a7b3e8f6"


@pytest.fixture(autouse=True)
def no_proxy_of_the_machine(monkeypatch):
    """The proxy variables are the tests' own: none from the machine that runs them."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def run_against(make_server, caption):
    """Start a stand-in of the given kind and run the captioner against it with the matching
    --api; returns (start, run)."""

    def start(kind: str, **settings):
        if kind != "ollama":
            settings.update(flavour=kind, native=False)
        return make_server(**settings)

    def run(kind: str, host: str, *args):
        return caption(*args, *api_args(kind), host=host)

    return start, run


def api_args(kind: str) -> list:
    return [] if kind == "ollama" else ["--api", "openai"]


def captions_sent(server) -> list:
    """The chats that were captions, not the OpenAI preflight's probe picture."""
    return [chat for chat in server.chats if chat.picture().size != (64, 64)]


def key_variable(kind: str) -> str:
    # The official ollama client sends OLLAMA_API_KEY as a bearer token (ollama/_client.py,
    # BaseClient.__init__); the OpenAI-compatible API sends the key in OPENAI_API_KEY.
    return "OLLAMA_API_KEY" if kind == "ollama" else "OPENAI_API_KEY"


# ---- item 10: a key the server echoes reaches no output ----

ECHOED = {
    "400": Reply(status=400, error="bad request"),
    "401": Reply(status=401, error="unauthorized"),
    "500": Reply(status=500, error="internal error"),
    "mid-stream": Reply(text="A red", error="CUDA error: out of memory"),
    "answer": "A red square",
}


def every_output(tmp_path, result) -> str:
    """Everything the run printed or wrote: stderr, stdout, the review page, the JSONL, the failed
    list and every caption."""
    written = [path.read_text() for path in tmp_path.rglob("*") if path.is_file() and path.suffix != ".png"]
    return "\n".join([result.err, result.out, *written])


@pytest.mark.parametrize("where", ECHOED)
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_key_the_server_echoes_reaches_no_output(kind, where, tmp_path, run_against, monkeypatch):
    start, run = run_against
    monkeypatch.setenv(key_variable(kind), KEY)
    images = tmp_path / "images"
    picture(images / "a.png", size=(40, 32))
    server = start(kind, echo_authorization=True)
    server.answer = by_width({40: ECHOED[where]}, default="probe")
    page = tmp_path / "review.html"

    result = run(
        kind,
        server.url,
        images,
        "--retries",
        0,
        "--review",
        page,
        "--jsonl",
        images / "metadata.jsonl",
        "--failed-list",
        tmp_path / "failed.txt",
    )

    assert {chat.authorization for chat in captions_sent(server)} == {f"Bearer {KEY}"}  # it was sent
    assert result.code == 1
    assert page.exists() and "a.png" in page.read_text()
    assert KEY not in every_output(tmp_path, result)
    assert not (images / "a.txt").exists()
    if where in ("400", "500"):
        assert f"answered {where}: " in result.err
    if where == "answer":
        assert "FAILED a.png: " in result.err and "API key" in result.err


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_answer_that_echoes_the_key_is_not_asked_again(kind, tmp_path, run_against, monkeypatch):
    """The model never sees the key: an answer holding it is the server's echo of the request,
    which every try would repeat, each paid for on a hosted API."""
    start, run = run_against
    monkeypatch.setenv(key_variable(kind), KEY)
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind, echo_authorization=True)
    server.answer = by_width({40: ECHOED["answer"]}, default="probe")

    result = run(kind, server.url, tmp_path, "--retries", 3)

    assert result.code == 1
    assert len(captions_sent(server)) == 1
    assert "FAILED a.png: " in result.err and KEY not in result.err


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_key_echoed_before_the_run_starts_is_not_shown(kind, tmp_path, run_against, monkeypatch):
    start, run = run_against
    monkeypatch.setenv(key_variable(kind), KEY)
    picture(tmp_path / "a.png")
    server = start(kind, echo_authorization=True, models_reply=Reply(status=401, error="unauthorized"))

    result = run(kind, server.url, tmp_path)

    assert result.code == 2
    assert "401" in result.err and "unauthorized" in result.err
    assert KEY not in result.err


# ---- item 11: every answer, line and request has a bound ----


@pytest.mark.timeout(10)  # on a client without a bound it never ends
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_answer_that_never_ends_and_never_repeats_takes_its_server_out(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    server.answer = by_width({40: Reply(runaway=True)}, default="probe")

    result = run(kind, server.url, tmp_path, "--max-tokens", 16)

    assert result.code == 1
    assert f"{server.url} taken out of rotation: " in result.err
    assert "longer than --max-tokens 16 allows" in result.err
    assert "left for a rerun" in result.err
    wait_until(lambda: captions_sent(server)[0].hung_up)  # noted as the stand-in next writes


@pytest.mark.timeout(10)  # on a client without a bound it never ends
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_line_that_never_ends_takes_its_server_out(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    server.answer = by_width({40: Reply(endless_line=True)}, default="probe")

    result = run(kind, server.url, tmp_path)

    assert result.code == 1
    assert f"{server.url} taken out of rotation: " in result.err
    assert "a line longer than" in result.err
    wait_until(lambda: captions_sent(server)[0].hung_up)  # noted as the stand-in next writes


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_answer_compressed_although_asked_not_to_takes_its_server_out(kind, tmp_path, run_against):
    # Compressed, an answer could grow a thousandfold past what the line bound sees.
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    server = start(kind)
    server.answer = by_width({40: Reply(text="A red square", compressed=True)}, default="probe")

    result = run(kind, server.url, tmp_path)

    assert result.code == 1
    assert (
        f"{server.url} taken out of rotation: it compressed its answer (gzip) although asked not to"
        in result.err
    )
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.timeout(10)  # on a client without a bound it never ends
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_answer_past_its_deadline_fails_its_image(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png", size=(40, 32))
    picture(tmp_path / "b.png", size=(41, 32))
    # A token every 20 ms: never silent for --timeout, never past --max-tokens, never ending.
    # Two slots: b.png is not queued behind it.
    server = start(kind, token_latency=0.02, slots=2)
    server.answer = by_width({40: Reply(runaway=True)}, default="probe")

    result = run(kind, server.url, tmp_path, "--timeout", 0.5, "--max-tokens", 100000, "--retries", 0)

    assert result.code == 1
    assert "FAILED a.png: " in result.err and "no whole answer within 1s" in result.err
    assert (tmp_path / "b.txt").exists()


# ---- item 12: proxies, as the clients take them from the environment ----


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_no_proxy_sees_the_name_the_server_was_given(kind, tmp_path, run_against, monkeypatch):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    monkeypatch.setenv("HTTP_PROXY", closed_port_url())  # a dead proxy: it must not be used
    monkeypatch.setenv("NO_PROXY", "localhost")

    result = run(kind, f"http://localhost:{server.httpd.server_address[1]}", tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_dead_proxy_is_named_with_its_variable_and_without_its_password(
    kind, tmp_path, run_against, monkeypatch
):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    proxy = closed_port_url()
    monkeypatch.setenv("HTTP_PROXY", proxy.replace("http://", "http://captioner:pr0xy-passw0rd@"))

    result = run(kind, server.url, tmp_path, "--wait-server", 0)

    assert result.code == 2
    assert f"cannot reach the proxy {proxy} (HTTP_PROXY)" in result.err
    assert "ollama serve" not in result.err
    assert "pr0xy-passw0rd" not in result.err
    assert server.requests == []


def test_a_malformed_proxy_variable_at_import_is_one_line_and_exit_2(tmp_path, server):
    """The ollama package builds a client as it is imported, which reads the proxy variables: a
    process of its own shows what the import does with them."""
    picture(tmp_path / "a.png")

    result = run_script(tmp_path, "--host", server.url, env={"HTTPS_PROXY": "::::"})

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "HTTPS_PROXY" in result.stderr and "Traceback" not in result.stderr
    assert server.requests == []


@pytest.mark.parametrize(
    "variable, value",
    [("HTTP_PROXY", "http://127.0.0.1:99999"), ("ALL_PROXY", "ftp://x"), ("https_proxy", "::::")],
)
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_malformed_proxy_variable_is_one_line_naming_it_and_exit_2(
    kind, variable, value, tmp_path, run_against, monkeypatch
):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    monkeypatch.setenv(variable, value)

    result = run(kind, server.url, tmp_path)

    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith(f"error: {variable} is not a proxy address (")
    assert server.requests == []


SOCKS_SUPPORT = importlib.util.find_spec("socksio") is not None


@pytest.mark.skipif(SOCKS_SUPPORT, reason="httpx's SOCKS support is installed here")
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_socks_proxy_names_the_extra_that_adds_it(kind, tmp_path, run_against, monkeypatch):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")

    result = run(kind, server.url, tmp_path)

    assert result.code == 2
    assert len(result.err.splitlines()) == 1, result.err
    assert "ALL_PROXY" in result.err and 'pip install "httpx[socks]"' in result.err
    assert server.requests == []


def test_a_socks_proxy_the_server_is_left_out_of_does_not_stop_the_run(tmp_path, server):
    picture(tmp_path / "a.png")

    result = run_script(
        tmp_path, "--host", server.url, env={"ALL_PROXY": "socks5://127.0.0.1:1", "NO_PROXY": "127.0.0.1"}
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.txt").exists()


# ---- item 14: what the server said at the start ----


@pytest.mark.parametrize("status", [500, 301])
@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_model_listing_that_fails_at_once_is_reported_with_what_the_server_said(
    kind, status, tmp_path, run_against
):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    moved = server.url.replace("http://", "https://")
    server.models_reply = (
        Reply(status=301, location=f"{moved}/api/tags")
        if status == 301
        else Reply(status=500, error="open /root/.ollama/models/manifests: permission denied")
    )

    result = run(kind, server.url, tmp_path)

    assert result.code == 2
    assert "sent no answer" not in result.err
    assert f"answered {status}: " in result.err
    if status == 500:
        assert "manifests: permission denied" in result.err
    else:
        assert "Moved Permanently" in result.err


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_https_to_a_plain_http_port_keeps_the_tls_reason(kind, tmp_path, run_against):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind)
    plain = server.url.replace("http://", "https://")

    result = run(kind, plain, tmp_path, "--wait-server", 0)

    assert result.code == 2
    assert "TLS" in result.err and "plain HTTP? use http://" in result.err
    assert "ollama serve" not in result.err


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_an_https_server_whose_certificate_nobody_vouches_for_is_refused(
    kind, tmp_path, run_against, certificate
):
    start, run = run_against
    picture(tmp_path / "a.png")
    server = start(kind, certificate=certificate)

    result = run(kind, server.url, tmp_path, "--wait-server", 0)

    assert result.code == 2 and "its TLS certificate is not trusted" in result.err
    assert not (tmp_path / "a.txt").exists()


def test_an_https_server_is_trusted_through_the_certificates_the_environment_names(
    tmp_path, make_server, certificate
):
    """Each run reads the certificates to trust once, where a server is https: SSL_CERT_FILE,
    SSL_CERT_DIR, else certifi's. A process of its own: this one reads them as it starts."""
    expected = distinct_pictures(tmp_path, 2)
    server = make_server(certificate=certificate)

    result = run_script(tmp_path, "--host", server.url, env={"SSL_CERT_FILE": certificate[0]})

    assert result.returncode == 0, result.stderr
    for path, text in expected.items():
        assert path.read_text(encoding="utf-8") == text


# ---- item 15: a server restarting as the run starts ----


class Watched(io.StringIO):
    """The run's stderr, which starts the server the moment the run says it waits for it."""

    def __init__(self, start) -> None:
        super().__init__()
        self.start = start

    def write(self, text: str) -> int:
        if "waiting up to" in text and self.start:
            self.start, start = None, self.start
            start()
        return super().write(text)


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_a_server_that_listens_a_moment_after_the_run_starts_is_waited_for(kind, tmp_path, run_against):
    start, _ = run_against
    picture(tmp_path / "a.png")
    url = closed_port_url()
    stderr = Watched(lambda: start(kind, port=int(url.rsplit(":", 1)[1])))
    args = captioner.build_parser().parse_intermixed_args([str(tmp_path), "--host", url, *api_args(kind)])

    summary = captioner.caption_folders(captioner.config_from_args(args), captioner.Reporter(stream=stderr))

    assert summary.exit_code == 0, stderr.getvalue()
    assert (tmp_path / "a.txt").exists()
    assert f"{url} refuses connections; waiting up to " in stderr.getvalue()
    assert f"{url} answers\n" in stderr.getvalue()


@pytest.mark.parametrize("kind", BOTH_APIS)
def test_with_no_server_the_run_waits_briefly_then_exits_2_with_the_message(kind, tmp_path, run_against):
    _, run = run_against
    picture(tmp_path / "a.png")
    url = closed_port_url()

    result = run(kind, url, tmp_path)

    assert result.code == 2
    waited, error = result.err.splitlines()
    assert waited.startswith(f"{url} refuses connections; waiting up to ")
    reached = "Ollama at" if kind == "ollama" else "a server at"
    assert error.startswith(f"error: cannot reach {reached} {url}; start it")
