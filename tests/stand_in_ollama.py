"""A stand-in Ollama server on 127.0.0.1 for the tests and the benchmark.

It speaks the parts of Ollama's HTTP API the captioner uses, with the shapes, status codes
and error strings of Ollama's server/routes.go and api/types.go: GET/HEAD /, /api/version,
/api/tags, /api/ps, POST /api/show, /api/pull (NDJSON progress) and /api/chat (NDJSON by
default, one JSON object with "stream": false). Like llava's stb_image decoder it accepts
only JPEG, PNG, BMP and GIF. It records every chat request, counts requests in flight,
and can be scripted to answer each image differently: an error status, an error line
mid-stream, a stream that ends without "done", silence, a dropped connection.

The same server also speaks the OpenAI-compatible API that vLLM, SGLang, llama.cpp's
llama-server, LM Studio and Ollama itself serve under /v1: GET /v1/models and POST
/v1/chat/completions (server-sent events with "stream": true, one chat.completion object
otherwise), images as data URIs. `flavour` picks whose error bodies, reasoning field and
final chunk it imitates; the same `answer` script and Reply fields drive both APIs.

It can also be hostile, as no upstream server is but a broken one or a proxy in front of one
can be: echo the request's Authorization header into what it says, stream an answer that never
ends and never repeats (ignoring the token limit), or a line that never ends.

Options are taken as each server takes them: Ollama's native `options` by its api/types.go (an
option it does not know is skipped with only a log line, a value of the wrong type fails the
request), vLLM's and Ollama's /v1 top-level fields by theirs (a field they do not know is passed
over); what a server passed over is in the chat's `ignored`. A system message is recorded apart
from the prompt, with the order of the messages' roles.

`engine="mlx"` imitates Ollama's MLX engine (the default on Apple Silicon since v0.40.0): one
request at a time, its own context overflow message, gemma4's empty answers without thinking.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import math
import re
import secrets
import select
import selectors
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

from PIL import Image

LLAVA_DECODABLE = {"JPEG", "PNG", "BMP", "GIF"}
VISION_MODEL = {"capabilities": ["completion", "vision"], "families": ["llama", "clip"]}
TEXT_MODEL = {"capabilities": ["completion"], "families": ["llama"]}
# Servers before 0.6.4 list no capabilities; a projector model shows the "clip" family.
OLD_VISION_MODEL = {"capabilities": None, "families": ["llama", "clip"]}
# A model that can think (qwen3-vl, qwen3.5): since Ollama 0.12.4 it thinks unless the request
# says think:false (server/routes.go, ChatHandler).
THINKING_MODEL = {
    "capabilities": ["completion", "vision", "thinking"],
    "families": ["qwen3vl"],
    "architecture": "qwen3vl",
}
# A thinking-only tag ignores think:false (ollama/ollama#14798).
THINKING_ONLY_MODEL = {**THINKING_MODEL, "thinking_only": True}
# A custom-imported model (or a server of 0.9-0.12.3) thinks inline, <think>...</think> in content.
INLINE_THINKING_MODEL = {
    "capabilities": ["completion", "vision"],
    "families": ["qwen3vl"],
    "inline_thinking": True,
}
# Since PR #18473 (merged 2026-09-15) /api/show says how a model takes "think": "values" are
# booleans and/or level names, "default" what it does when "think" is left out
# (types/model Thinking; server's legacyThinking lists e.g. {Values: [false, true], Default: true}).
# A value the model does not list is taken and resolves to the default ("Other names may still be
# accepted by the endpoint and resolve to the default", Thinking.Supports).
# gemma4 thinks by default on /api/chat (ollama/ollama#15268).
GEMMA4_MODEL = {
    "capabilities": ["completion", "vision", "thinking"],
    "families": ["gemma4"],
    "architecture": "gemma4",
    "thinking": {"values": [True, False], "default": True},
}
# Qwen 3.6/3.8 (architecture qwen35) see and think at levels (ollama PR #15787); 3.8 lists no
# false and thinks at "high" when "think" is left out (issue 20's brief; Ollama's
# thinkingForLocalRenderer as stored here sets "medium" for qwen3.8: one of the two is stale).
QWEN38_MODEL = {
    "capabilities": ["completion", "vision", "thinking"],
    "families": ["qwen35"],
    "architecture": "qwen35",
    "thinking": {"values": ["low", "medium", "high", "max"], "default": "high"},
}
# The level names Ollama takes as "think"; any other string is a 400 (server's
# validateLegacyThinking).
THINK_LEVELS = ("low", "medium", "high", "max")
# Qwen 3.8's template refusing a conversation it finds no user turn in, a 500 (ollama#17778, #17812).
NO_USER_QUERY = "no user query found in messages"
ENGINES = ("llama", "mlx")
THOUGHT = " ".join(  # 105 tokens of what a model thinks
    f"Step {step}: the user wants a caption, so I look at part {step} of the picture and note what I see."
    for step in range(1, 6)
)
# OpenAI's words for a key whose quota is spent (429, code insufficient_quota).
QUOTA_SPENT = "You exceeded your current quota, please check your plan and billing details."
# The prompt's tokens a rate-limited stand-in counts for each request, on top of its max tokens.
RATE_PROMPT_TOKENS = 100
BUSY = "server busy, please try again.  maximum pending requests exceeded"
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# llama-server's words for an image sent to a model loaded without its projector.
NO_MMPROJ = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"
# Whose OpenAI-compatible server the /v1 routes imitate. vLLM nests its error object since
# 0.10.1 ("vllm"); before, it was flat ("vllm-old").
FLAVOURS = ("vllm", "vllm-old", "llama-server", "lmstudio", "ollama")
# The hosted services' endpoints: OpenAI's own (strict), Gemini's and OpenRouter's
# OpenAI-compatible ones, with native=False (none of them speaks Ollama's API).
HOSTED = ("openai", "gemini", "openrouter")
# OpenAI's Chat Completions request (platform.openai.com/docs/api-reference/chat/create, read
# 2026-12-06): any other argument is a 400 "Unrecognized request argument supplied: X" with
# param and code null (seen for chat_template_kwargs, top_k, reasoning_effort on a model that
# does not reason: TutteInstitute/toponymy#148, Tencent/WeKnora#495, open-webui#14520).
OPENAI_FIELDS = frozenset(
    (
        *("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens"),
        *("temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias"),
        *("logprobs", "top_logprobs", "user", "seed", "response_format", "tools", "tool_choice"),
        *("parallel_tool_calls", "reasoning_effort", "service_tier", "store", "metadata", "modalities"),
        *("prediction", "audio", "verbosity", "web_search_options", "prompt_cache_key", "safety_identifier"),
    )
)
# OpenAI's reasoning models (o-series, GPT-5.x) take reasoning_effort at these levels, refuse
# max_tokens for max_completion_tokens and any temperature but the default 1 (koosoli/
# ESPHomeDesigner#379, dsp05/overleaf-copilot#43); their reasoning is billed as output
# (usage.completion_tokens_details.reasoning_tokens) and never streamed on Chat Completions.
OPENAI_REASONING = re.compile(r"(o\d|gpt-5)")
OPENAI_EFFORTS = ("minimal", "low", "medium", "high")
# GPT-5.1 and later take "none" and no longer "minimal": a 400 "Unsupported value: 'minimal' is
# not supported with the 'gpt-5.1' model. Supported values are: 'none', 'low', 'medium', and
# 'high'." (code unsupported_value; anomalyco/opencode#4451, November 2025).
OPENAI_EFFORTS_SINCE_5_1 = ("none", "low", "medium", "high")
OPENAI_SINCE_5_1 = re.compile(r"gpt-5\.[1-9]")
# The reasoning tokens the stand-in's reasoning model spends at each effort (medium by default).
REASONING_SPENT = {"none": 0, "minimal": 0, "low": 40, "medium": 160, "high": 640}
# Gemini's OpenAI-compatible endpoint maps reasoning_effort to a thinking budget, "none" turning
# thinking off (ai.google.dev/gemini-api/docs/openai, read 2026-12-06).
GEMINI_EFFORTS = ("none", "minimal", "low", "medium", "high")
# OpenRouter normalises reasoning as reasoning: {effort}, "none" turning it off
# (openrouter.ai/docs/use-cases/reasoning-tokens, read 2026-12-06).
OPENROUTER_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
IMAGE_DETAILS = ("low", "high", "auto")  # OpenAI's image_url.detail
# Where each hosted service's OpenAI-compatible API lives: its documented base URL's path
# (platform.openai.com/docs/api-reference, ai.google.dev/gemini-api/docs/openai,
# openrouter.ai/docs/quickstart; read 2026-12-06).
HOSTED_PATHS = {"openai": "/v1", "gemini": "/v1beta/openai", "openrouter": "/api/v1"}
# A toy API of no real server, for the tests' own third adapter (tests/toy_api.py): GET
# /toy/models answers {"models": [names]}; POST /toy/caption takes {"model", "prompt", "image"
# (base64)} and answers {"caption": text}, or {"problem": message} with an error status.
TOY = "toy"
VLLM = ("vllm", "vllm-old")
# Ollama's /v1 takes only these data URI types (openai/openai.go, decodeImageURL); "" is data:;base64,
OLLAMA_IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", ""}
DATA_URI = re.compile(r"data:([^;,]*)(;base64)?,(.*)", re.DOTALL)
MODELS_CREATED = 1746405464  # the models' modified_at below, in Unix seconds


def openai_values(values: tuple) -> str:
    """OpenAI's list of supported values: 'low', 'high', and 'auto'."""
    quoted = [f"'{value}'" for value in values]
    return f"{', '.join(quoted[:-1])}, and {quoted[-1]}"


def gemini_error(status: int, message: str) -> list:
    """Google's error body, which its OpenAI-compatible endpoint sends as a list of one
    (google-gemini/gemini-cli#4635, #13665: `[{"error": {"code": 400, ..., "status":
    "INVALID_ARGUMENT"}}]`)."""
    statuses = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
    statuses.update({429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"})
    return [{"error": {"code": status, "message": message, "status": statuses.get(status, "UNKNOWN")}}]


def mlx_overflow(tokens: int) -> str:
    """The MLX runner's words for a prompt longer than the context (x/mlxrunner/client.go)."""
    return f"input length ({tokens} tokens) exceeds the model's maximum context length"


def llama_server_error(status: int, message: str) -> str:
    """An error as Ollama's llama-server era passes it on: llama-server's JSON error body as the
    string inside Ollama's {"error": ...} (llm/llama_server.go, statusErrorMessage)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"code": status, "message": message, "type": kind}}, separators=(",", ":"))


RUNNER_CRASH = (
    "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details"
)

# Ollama's options and the type each takes (api/types.go, Options and Runner, v0.33): FromMap
# skips an option it does not know with a log line only ("invalid option provided"), takes any
# JSON number for an integer (cutting 1.5 to 1) or a float, and fails the request on another
# type: `option "top_k" must be of type integer`, a 500 (handleScheduleError's default branch),
# before any model is loaded. typical_p is deprecated since Ollama 0.35 (its release notes);
# what a server does with it since is not known here: the stand-in still takes it.
OLLAMA_OPTIONS = {
    **dict.fromkeys(
        ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu"),
        "integer",
    ),
    **dict.fromkeys(("main_gpu", "num_thread", "draft_num_predict"), "integer"),
    **dict.fromkeys(
        (
            "top_p",
            "min_p",
            "typical_p",
            "temperature",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ),
        "float32",
    ),
    "use_mmap": "boolean",
    "stop": "array",
}
# The top-level fields of a /v1/chat/completions request each flavour reads, with the type of
# those an option may set. vLLM's ChatCompletionRequest (vllm/entrypoints/openai/protocol.py)
# takes any other field and logs it ("The following fields were present in the request but
# ignored", OpenAIBaseModel.__log_extra_fields__), a subset of its fields here; Ollama's /v1
# decodes into its ChatCompletionRequest (openai/openai.go) with Go's encoding/json, which
# passes over a field it does not know without a word and refuses a value of the wrong type.
VLLM_FIELDS = {
    **dict.fromkeys(("model", "messages", "stream", "stream_options", "chat_template_kwargs"), None),
    **dict.fromkeys(
        ("n", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "user"), None
    ),
    **dict.fromkeys(("max_tokens", "max_completion_tokens", "seed", "top_k", "min_tokens"), int),
    **dict.fromkeys(
        ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"),
        float,
    ),
    "stop": None,
}
OLLAMA_V1_FIELDS = {
    **dict.fromkeys(("model", "messages", "stream", "stream_options", "stop", "response_format"), None),
    **dict.fromkeys(("tools", "reasoning", "reasoning_effort", "_debug_render_only"), None),
    **dict.fromkeys(("max_tokens", "seed"), int),
    **dict.fromkeys(("temperature", "frequency_penalty", "presence_penalty", "top_p"), float),
}


@dataclass
class Chat:
    """One chat request (/api/chat or /v1/chat/completions) as the server received it."""

    model: str
    prompt: str
    images: list  # decoded bytes of each image
    options: dict
    keep_alive: Any
    stream: bool
    received_at: float = 0.0  # time.monotonic() when the request arrived
    answered_at: float = 0.0  # and when its answer was sent in full
    tokens_sent: int = 0
    hung_up: bool = False  # the client went away before the answer ended
    think: Any = None  # the request's "think", as sent; on /v1 False when it turned thinking off
    thinking_sent: int = 0  # tokens streamed in message.thinking (on /v1: the reasoning field)
    api: str = "ollama"  # "openai": it came to /v1/chat/completions
    body: dict = field(default_factory=dict)  # a /v1 request's JSON as sent (options stays {})
    authorization: str = ""  # the request's Authorization header, if any
    system: str = ""  # the system messages' text (not part of the prompt)
    roles: list = field(default_factory=list)  # each message's role, in the order sent
    # Options (native) or top-level fields (/v1) the server passed over without applying them.
    ignored: list = field(default_factory=list)

    def picture(self, index: int = 0) -> Image.Image:
        return Image.open(io.BytesIO(self.images[index]))


@dataclass
class Reply:
    """How to answer one chat request; the default is a caption naming what was seen."""

    text: str | None = None
    status: int = 200
    error: str | None = None  # with status 200 and streaming: an error line mid-stream
    done: bool = True  # False: the stream ends without its final "done" line
    delay: float = 0.0  # seconds of silence before the first byte
    drop: bool = False  # close the connection without answering
    vanish: bool = False  # the server dies before this answer's last line, which it still sends
    done_reason: str = "stop"
    endless: bool = False  # repeat text token by token until the client hangs up (a runaway)
    body: str | None = None  # with an error status: this raw text/html body instead of JSON
    prompt_tokens: int = 612  # prompt_eval_count: the prompt's tokens, image included
    # With an error status: a Retry-After header of this many seconds, as a busy server or
    # proxy sends with 429 or 503.
    retry_after: float | None = None
    # /v1 with error and status 200: the error body as a 200 JSON answer, as LM Studio sends
    # some failures (lmstudio-ai/lms#362), streaming asked for or not.
    error_in_200: bool = False
    # With a 3xx status: where it points, as a reverse proxy that sends http:// to https:// does.
    location: str | None = None
    # Never ends and never repeats: new words (`word1 word2 ...`), past the token limit, until
    # the client hangs up, as from a server that ignores max_tokens with a model no loop check
    # catches.
    runaway: bool = False
    # After the start of the first line, bytes without a newline until the client hangs up, as
    # from a broken server or proxy (64 KB a millisecond: a real one sends some 200 MB/s, but
    # a client without a bound must not take the tests' machine down with it).
    endless_line: bool = False
    # Streamed gzip-compressed (Content-Encoding: gzip) whatever the request's Accept-Encoding
    # says, as a proxy set to compress every answer does.
    compressed: bool = False
    # /v1 streamed: each event as `data:{...}`, without the space after the colon, which the
    # server-sent events format leaves optional: a client must read both forms.
    unspaced_events: bool = False


Answer = Callable[[Chat], Union[Reply, str]]


def describe(chat: Chat) -> str:
    """Default answer: llava-like (leading space, a newline) and naming what arrived."""
    picture = chat.picture()
    return f" A {picture.format} picture,\n{picture.width}x{picture.height} pixels. "


class Listening(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose loop sleeps until a client connects or stop_serving() wakes
    it: serve_forever() wakes each poll interval to look for shutdown(), and at the 5 ms that
    lets a test's server stop at once, each idle stand-in cost 7 ms of CPU a second (measured)."""

    daemon_threads = True

    def __init__(self, address: tuple, handler: type) -> None:
        super().__init__(address, handler)
        self.stopping = False
        self.wake, self.waker = socket.socketpair()

    def serve_until_stopped(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self.wake, selectors.EVENT_READ)
            while not self.stopping:
                ready = [key.fileobj for key, _ in selector.select()]
                if self.socket in ready and not self.stopping:
                    self._handle_request_noblock()

    def stop_serving(self) -> None:
        self.stopping = True
        self.waker.send(b"!")

    def server_close(self) -> None:
        super().server_close()
        self.wake.close()
        self.waker.close()


@dataclass
class StandInOllama:
    models: dict = field(default_factory=lambda: {"llava:13b": VISION_MODEL})
    pullable: dict = field(default_factory=dict)  # models /api/pull can fetch
    answer: Answer = describe
    latency: float = 0.0  # seconds each answer takes once it has a slot
    token_latency: float = 0.0  # and each token streamed (thinking too), as a GPU generates
    slots: int = 1  # like OLLAMA_NUM_PARALLEL: more requests wait without a byte
    version: str = "0.12.6"
    port: int = 0  # 0: any free port; a stopped server's port: the same server restarted
    flavour: str = "vllm"  # whose /v1 API to imitate: one of FLAVOURS
    # Ollama's own API (/, /api/...) answers too, as on Ollama; False: only /v1, as on vLLM,
    # SGLang, llama-server and LM Studio, which answer it 404.
    native: bool = True
    # Ollama's inference engine: "llama" (llama.cpp's) or "mlx", the default on Apple Silicon since
    # v0.40.0. MLX answers one request at a time whatever `slots` says (its sampler takes batch
    # size 1, x/mlxrunner/sample.go:519); gemma4 with think:false answers an empty content, done
    # (ollama/ollama#17823, open); on /api/chat a prompt (Reply.prompt_tokens) over the context is
    # a 500 with mlx_overflow's words instead of an answer. Which context MLX holds it to is not
    # confirmed: the stand-in takes the request's num_ctx, else 4096, as on the llama engine.
    engine: str = "llama"
    # False: an Ollama from before PR #18473 (merged 2026-09-15), whose /api/show says nothing of
    # how a model takes "think" (no "thinking"), though its models take the same values.
    shows_thinking: bool = True

    # Every endpoint answers 502 with nginx's page, as a reverse proxy does while its Ollama
    # restarts.
    down: bool = False
    # How GET /api/tags and GET /v1/models answer instead of listing the models: an error status
    # (Ollama's ListHandler answers 500 {"error": ...} when it cannot read its manifests), or a
    # redirect (Reply.location).
    models_reply: Reply | None = None
    # Every error message, mid-stream error and answer repeats the request's Authorization
    # header, as a debugging proxy or a careless server's error page may.
    echo_authorization: bool = False
    # (certificate file, key file): speak HTTPS with them, as a server behind a TLS proxy does.
    certificate: tuple[str, str] | None = None
    # /v1's usage details the thinking tokens, of the completion_tokens that include them, in
    # completion_tokens_details.reasoning_tokens, as OpenAI's does (platform.openai.com/docs/
    # api-reference/chat/object, "usage"; read 2026-12-06); the servers people run send none.
    reasoning_details: bool = False
    # A hosted provider's rate limit on POST /v1/chat/completions, any flavour: (requests, tokens)
    # per `rate_window` seconds (OpenAI's are per minute; the tests use a second or so). As
    # OpenAI's rate-limits guide says (platform.openai.com/docs/guides/rate-limits, as stored on
    # 2026-06-26): every answer carries x-ratelimit-limit-, -remaining- and -reset-requests and
    # -tokens, a reset as a duration ("1s", "6m0s", "20ms"); a request past the budget is a 429
    # with Retry-After and an error of type "requests" (or "tokens"), code rate_limit_exceeded.
    # A request's tokens are counted as OpenAI counts them against the limit, its max tokens
    # (max_completion_tokens or max_tokens) and an estimate of its prompt: here RATE_PROMPT_TOKENS.
    # The budget is a fixed window from its first request; a refused request spends none of it.
    rate_limit: tuple[int, int] | None = None
    rate_window: float = 60.0
    # Every chat request is a 429 insufficient_quota, as OpenAI answers a key whose credit is
    # spent (its error-codes guide, platform.openai.com/docs/guides/error-codes).
    quota_spent: bool = False

    def __post_init__(self) -> None:
        if self.flavour not in (*FLAVOURS, *HOSTED, TOY):
            raise ValueError(f"flavour must be one of {(*FLAVOURS, *HOSTED, TOY)}, not {self.flavour!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        self.chats: list = []
        self.refusals: list = []  # (body, error object) of each request a hosted flavour refused
        self.requests: list = []  # (time.monotonic(), method, path) of every request
        self.connections: set = set()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.rate_used = [0, 0]  # requests and tokens of the rate window that runs
        self.rate_since = 0.0  # when it began (0: none yet)
        self.refused_for_rate: list = []  # time.monotonic() of each 429 for the rate limit
        self.slot_gate = self.gate()
        handler = type("Handler", (Handler,), {"stand_in": self})
        self.httpd = Listening(("127.0.0.1", self.port), handler)
        if self.certificate:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(*self.certificate)
            # The handshake happens in the request's own thread: a client that gives up on it
            # must not hold up the server's loop.
            self.httpd.socket = tls.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.thread = threading.Thread(target=self.httpd.serve_until_stopped, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def gate(self) -> threading.Semaphore:
        return threading.Semaphore(1 if self.engine == "mlx" else self.slots)

    def start(self) -> StandInOllama:
        self.thread.start()
        return self

    @contextmanager
    def changed(self, **settings: Any) -> Iterator[StandInOllama]:
        """The server as these settings (its fields) make it until the block ends, then as it was:
        one server shared by several tests (a Ray node's own) answers each as it asks. Between
        requests only, as a request gives its slot back to the gate it took it from."""
        before = {name: getattr(self, name) for name in settings}
        with self.lock:
            assert self.in_flight == 0, "a request in flight holds a slot of the gate it was given"
            for name, value in settings.items():
                setattr(self, name, value)
            self.slot_gate, self.most_in_flight = self.gate(), 0
        try:
            yield self
        finally:
            with self.lock:
                for name, value in before.items():
                    setattr(self, name, value)
                self.slot_gate = self.gate()

    def stop(self, spare: socket.socket | None = None) -> None:
        """Die as a killed server does: stop listening and cut every open connection."""
        if self.thread.is_alive():
            self.httpd.stop_serving()
            self.thread.join()
            self.httpd.server_close()
        with self.lock:
            doomed = [connection for connection in self.connections if connection is not spare]
        for connection in doomed:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


def normalized(name: str) -> str:
    return name if ":" in name else name + ":latest"


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Handler(BaseHTTPRequestHandler):
    stand_in: StandInOllama
    protocol_version = "HTTP/1.1"  # keep-alive and chunked NDJSON, as Go's server
    event_field = b"data: "  # how the answer being streamed starts each event's data
    # Go's net/http sets TCP_NODELAY on every connection: without it, a reply written as headers
    # then body waits for the client's delayed ACK, 40 ms a request (measured) that Ollama never takes.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.rate_headers: dict = {}  # sent with every status line of the request being answered
        with self.stand_in.lock:
            self.stand_in.connections.add(self.connection)

    def finish(self) -> None:
        with self.stand_in.lock:
            self.stand_in.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the connection was cut by stop()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass  # the connection was cut by stop(), as when a server dies

    # -- plumbing ---------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        for name, value in self.rate_headers.items():
            self.send_header(name, value)

    def send_json(self, status: int, body: dict | list, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": self.said(message)})

    def said(self, text: str) -> str:
        """What the server says, with the request's Authorization header repeated in it when
        the stand-in echoes it."""
        authorization = self.headers.get("Authorization")
        if not (self.stand_in.echo_authorization and authorization):
            return text
        return f"{text} (you sent Authorization: {authorization})"

    def start_stream(
        self, last: bool = False, content_type: str = "application/x-ndjson", compressed: bool = False
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.gzip = zlib.compressobj(wbits=31) if compressed else None  # 31: the gzip format
        if compressed:
            self.send_header("Content-Encoding", "gzip")
        if last:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def stream_chunk(self, data: bytes) -> None:
        if self.gzip:  # each piece flushed, so that the client can read it as it comes
            data = self.gzip.compress(data) + self.gzip.flush(zlib.Z_SYNC_FLUSH)
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream_line(self, body: dict) -> None:
        self.stream_chunk(json.dumps(body).encode() + b"\n")

    def stream_event(self, body: dict | str) -> None:
        """One server-sent event, as the /v1 servers frame each chunk (and the final [DONE])."""
        data = body if isinstance(body, str) else json.dumps(body)
        self.stream_chunk(b"%s%s\n\n" % (self.event_field, data.encode()))

    def end_stream(self) -> None:
        if self.gzip:
            ending = self.gzip.flush()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(ending), ending))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def read_body(self, refuse: Callable[[int, str], None] | None = None) -> dict | None:
        refuse = refuse or self.send_error_json
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            refuse(400, "missing request body")
            return None
        try:
            return json.loads(self.rfile.read(length))
        except json.JSONDecodeError as exc:
            refuse(400, str(exc))
            return None

    # -- routes -----------------------------------------------------------

    def proxy_says_down(self) -> bool:
        self.rate_headers = {}  # a kept-alive connection's earlier answer had its own
        with self.stand_in.lock:
            self.stand_in.requests.append((time.monotonic(), self.command, self.path))
        if not self.stand_in.down:
            return False
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_text(502, NGINX_502, "text/html")
        return True

    def send_text(
        self,
        status: int,
        text: str,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict | None = None,
    ) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.do_GET()

    def hosted_route(self) -> None:
        """A hosted service's API under its own path (Gemini's /v1beta/openai/...) is served as
        /v1/...; anything else it answers 404."""
        base = HOSTED_PATHS.get(self.stand_in.flavour)
        if base and base != "/v1":
            rest = self.path[len(base) :] if self.path.startswith(f"{base}/") else None
            self.path = "/not-here" if rest is None else f"/v1{rest}"

    def do_GET(self) -> None:
        stand_in = self.stand_in
        self.hosted_route()
        if self.proxy_says_down():
            return
        if stand_in.flavour == TOY:
            self.toy_models()
            return
        if not stand_in.native and not self.path.startswith("/v1/"):
            self.not_found()
            return
        if self.path == "/":
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        elif self.path == "/api/version":
            self.send_json(200, {"version": stand_in.version})
        elif self.path in ("/api/tags", "/v1/models") and stand_in.models_reply:
            self.send_listing_failure(stand_in.models_reply)
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [self.model_entry(name) for name in stand_in.models]})
        elif self.path == "/api/ps":
            self.send_json(200, {"models": []})
        elif self.path == "/v1/models":
            self.send_json(200, self.model_list())
        else:
            self.not_found()

    def do_POST(self) -> None:
        routes = {
            "/api/show": self.show,
            "/api/pull": self.pull,
            "/api/chat": self.chat,
            "/v1/chat/completions": self.openai_chat,
        }
        self.hosted_route()
        route = routes.get(self.path)
        if self.proxy_says_down():
            return
        if self.stand_in.flavour == TOY:
            self.toy_caption()
            return
        if route is None or (not self.stand_in.native and not self.path.startswith("/v1/")):
            self.not_found()
            return
        body = self.read_body(self.send_openai_error if self.path.startswith("/v1/") else None)
        if body is not None:
            route(body)

    def send_listing_failure(self, reply: Reply) -> None:
        """A model listing that fails: a redirect with nginx's page, an HTML page, or the API's
        error body."""
        if reply.location is not None:
            phrase = HTTPStatus(reply.status).phrase
            page = f"<html>\r\n<head><title>{reply.status} {phrase}</title></head>\r\n</html>\r\n"
            self.send_text(reply.status, self.said(page), "text/html", {"Location": reply.location})
        elif reply.body is not None:
            self.send_text(reply.status, self.said(reply.body), "text/html", retry_after(reply))
        elif self.path.startswith("/v1/"):
            self.send_openai_error(reply.status, reply.error or "", retry_after(reply))
        else:
            self.send_json(reply.status, {"error": self.said(reply.error or "")}, retry_after(reply))

    def not_found(self) -> None:
        if self.stand_in.flavour == "lmstudio":
            # LM Studio answers a route it does not know with 200 and an error body, as when a
            # client leaves /v1 out of its base URL (lmstudio-ai/lmstudio-bug-tracker#618).
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_json(200, {"error": f"Unexpected endpoint or method. ({self.command} {self.path})"})
            return
        data = b"404 page not found"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def model_entry(self, name: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 8011256494,
            "digest": "0" * 64,
            "details": self.details(name),
        }

    def details(self, name: str) -> dict:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": self.stand_in.models[name]["families"],
            "parameter_size": "13B",
            "quantization_level": "Q4_0",
        }

    def show(self, body: dict) -> None:
        name = normalized(body.get("model") or body.get("name") or "")
        if name == ":latest":
            self.send_error_json(400, "model is required")
            return
        if name not in self.stand_in.models:
            self.send_error_json(404, f"model '{body.get('model')}' not found")
            return
        answer = {
            "modelfile": '# Modelfile generated by "ollama show"\n',
            "parameters": 'stop "USER:"\nstop "ASSISTANT:"',
            "template": "{{ .Prompt }}",
            "details": self.details(name),
            "model_info": {
                "general.architecture": self.stand_in.models[name].get("architecture", "llama"),
                "llama.context_length": 4096,
            },
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        }
        capabilities = self.stand_in.models[name]["capabilities"]
        if capabilities is not None:
            answer["capabilities"] = capabilities
        if self.stand_in.shows_thinking and "thinking" in self.stand_in.models[name]:
            answer["thinking"] = self.stand_in.models[name]["thinking"]
        self.send_json(200, answer)

    def pull(self, body: dict) -> None:
        name = normalized(body.get("model") or "")
        known = name in self.stand_in.pullable
        if not body.get("stream", True):
            if known:
                self.stand_in.models[name] = self.stand_in.pullable[name]
                self.send_json(200, {"status": "success"})
            else:
                self.send_error_json(500, "pull model manifest: file does not exist")
            return
        self.start_stream()
        self.stream_line({"status": "pulling manifest"})
        if not known:
            self.stream_line({"error": "pull model manifest: file does not exist"})
            self.end_stream()
            return
        digest = "sha256:0b8c8265e78b" + "0" * 52
        for completed in (0, 2_000_000_000, 4_000_000_000, 7_870_000_000):
            line = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 7_870_000_000}
            if completed:
                line["completed"] = completed
            self.stream_line(line)
        for status in ("verifying sha256 digest", "writing manifest", "removing unused layers"):
            self.stream_line({"status": status})
        self.stand_in.models[name] = self.stand_in.pullable[name]
        self.stream_line({"status": "success"})
        self.end_stream()

    def chat(self, body: dict) -> None:
        stand_in = self.stand_in
        model = body.get("model") or ""
        if normalized(model) not in stand_in.models:
            self.send_error_json(404, f"model '{model}' not found")
            return
        messages = body.get("messages") or []
        images = []
        for message in messages:
            for encoded in message.get("images") or []:
                decoded = strict_base64(encoded)
                if isinstance(decoded, str):
                    self.send_error_json(400, decoded)
                    return
                images.append(decoded)
        if not all(decodable_by_llava(image) for image in images):
            self.send_error_json(400, "Failed to load image or audio file")
            return
        entry = stand_in.models[normalized(model)]
        if body.get("think") and "thinking" not in (entry.get("capabilities") or []):
            self.send_error_json(400, f'"{model}" does not support thinking')
            return
        think = body.get("think")
        if isinstance(think, str) and think not in THINK_LEVELS:
            self.send_error_json(
                400,
                f'invalid think value: "{think}" (must be "high", "medium", "low", "max", true, or false)',
            )
            return
        options = body.get("options") or {}
        wrong = ollama_option_error(options)
        if wrong:
            self.send_error_json(500, wrong)
            return
        chat = Chat(
            model=model,
            prompt="".join(m.get("content") or "" for m in messages if m.get("role") != "system"),
            images=images,
            options=options,
            keep_alive=body.get("keep_alive"),
            stream=body.get("stream", True),
            received_at=time.monotonic(),
            think=body.get("think"),
            authorization=self.headers.get("Authorization") or "",
            system="".join(m.get("content") or "" for m in messages if m.get("role") == "system"),
            roles=[m.get("role") for m in messages],
            ignored=sorted(key for key in options if key not in OLLAMA_OPTIONS),  # "invalid option provided"
        )
        self.serve(chat, lambda reply: self.send_reply(model, reply, chat))

    def serve(self, chat: Chat, send: Callable[[Reply], None]) -> None:
        """Record the chat, wait for a slot, ask the script how to answer and send that, unless
        the client hangs up first. Both APIs share it: one model, one queue of slots."""
        stand_in = self.stand_in
        with stand_in.lock:
            stand_in.chats.append(chat)
            stand_in.in_flight += 1
            stand_in.most_in_flight = max(stand_in.most_in_flight, stand_in.in_flight)
        self.slot_held = False
        try:
            stand_in.slot_gate.acquire()
            self.slot_held = True
            reply = stand_in.answer(chat)
            reply = reply if isinstance(reply, Reply) else Reply(text=reply)
            if self.client_stays(stand_in.latency + reply.delay):
                send(reply)
                chat.answered_at = time.monotonic()
            else:
                chat.hung_up = True
        finally:
            self.request_done()

    def entry(self, name: str, api: str = "ollama") -> dict | None:
        """The model's entry in `models`. Ollama, on either API, completes a bare name with
        ":latest"; vLLM, llama-server and LM Studio match the name as sent."""
        if api == "openai" and self.stand_in.flavour != "ollama":
            return self.stand_in.models.get(name)
        return self.stand_in.models.get(normalized(name))

    def thought(self, chat: Chat) -> str:
        """What the model thinks before it answers, as Ollama 0.12.4+ decides it."""
        entry = self.entry(chat.model, chat.api) or {}
        can_think = "thinking" in (entry.get("capabilities") or []) or entry.get("inline_thinking")
        if not can_think:
            return ""
        think = chat.think
        levels = entry.get("thinking")
        if levels and think not in levels["values"]:  # left out or not listed: the default
            think = levels["default"]
        elif think is None:
            think = True
        return THOUGHT if think or entry.get("thinking_only") else ""

    def pieces(self, chat: Chat, reply: Reply, limit: int) -> tuple[str, list, str]:
        """The answer as the model generates it: the whole text (inline thinking included), its
        tokens as (kind, token) pairs with the thinking first, and why generation ended. A token
        limit cuts thinking and answer alike, as thinking spends num_predict and max_tokens."""
        text = self.said(reply.text or "") if reply.text else ""
        thought = self.thought(chat)
        entry = self.entry(chat.model, chat.api) or {}
        if self.stand_in.engine == "mlx" and entry.get("architecture") == "gemma4" and chat.think is False:
            text = ""  # ollama/ollama#17823
        if thought and entry.get("inline_thinking"):
            text, thought = f"<think>{thought}</think>{text}", ""
        pieces = [("thinking", token) for token in re.findall(r"\S+\s*", thought)]
        pieces += [("content", token) for token in re.findall(r"\S+\s*|\s+", text)]
        done_reason = reply.done_reason
        if 0 < limit < len(pieces) and not reply.endless:
            pieces, done_reason = pieces[:limit], "length"
        return text, pieces, done_reason

    def request_done(self) -> None:
        """The model has finished with this request: its slot is free and it is no longer in
        flight. Called before the last line goes out, as Ollama frees the slot when generation
        ends: a client that sends its next request the moment it reads "done" must find the
        count already lowered."""
        if self.slot_held:
            self.slot_held = False
            with self.stand_in.lock:
                self.stand_in.in_flight -= 1
            self.stand_in.slot_gate.release()

    def client_stays(self, seconds: float) -> bool:
        """Wait, but give the slot up when the client hangs up, as Ollama cancels the request."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            # Asleep until the client sends or hangs up: a waiting request costs no CPU (the
            # suite holds hundreds of them).
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                self.close_connection = True
                return False
            if readable:  # bytes, not a hang-up: look again a little later
                time.sleep(min(left, 0.01))

    def drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(2)

    def sent_failure(self, reply: Reply, send_error: Callable[[int, str, dict | None], None]) -> bool:
        """Drop the connection or answer with an error status, as the reply asks; whether it did."""
        if reply.drop:
            self.drop()
            return True
        if reply.status == 200:
            return False
        self.request_done()
        if reply.body is not None:
            self.send_text(reply.status, self.said(reply.body), "text/html", retry_after(reply))
        else:
            send_error(reply.status, reply.error or "", retry_after(reply))
        return True

    def send_reply(self, model: str, reply: Reply, chat: Chat) -> None:
        stream = chat.stream
        context = chat.options.get("num_ctx") or 4096
        if self.stand_in.engine == "mlx" and reply.status == 200 and reply.prompt_tokens > context:
            reply = Reply(status=500, error=mlx_overflow(reply.prompt_tokens))
        if self.sent_failure(
            reply, lambda status, error, headers: self.send_json(status, {"error": self.said(error)}, headers)
        ):
            return
        text, pieces, done_reason = self.pieces(chat, reply, chat.options.get("num_predict") or -1)
        final = {
            "model": model,
            "created_at": now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": done_reason,
            "total_duration": 2104512300,
            "load_duration": 21045000,
            "prompt_eval_count": reply.prompt_tokens,
            "prompt_eval_duration": 402113000,
            "eval_count": max(1, len(pieces)),
            "eval_duration": 1602331000,
        }
        if not stream:
            self.request_done()
            if reply.error:
                self.send_error_json(500, reply.error)
                return
            final["message"]["content"] = text
            self.send_json(200, final)
            return
        self.start_stream(last=reply.vanish, compressed=reply.compressed)
        if reply.endless_line:
            self.send_endless_line(
                chat, b'{"model":"%s","message":{"role":"assistant","content":"' % model.encode()
            )
            return
        try:
            for kind, token in self.generated(reply, pieces):
                piece = {"role": "assistant", "content": "", kind: token}
                self.stream_line({"model": model, "created_at": now(), "message": piece, "done": False})
                chat.tokens_sent += 1
                chat.thinking_sent += kind == "thinking"
                self.generation_pause(reply)
        except OSError:  # the client hung up: Ollama cancels the request and stops generating
            chat.hung_up = True
            self.close_connection = True
            return
        self.request_done()
        if reply.vanish:
            self.stand_in.stop(spare=self.connection)
        if reply.error:
            self.stream_line({"error": self.said(reply.error)})
        elif reply.done:
            self.stream_line(final)
        self.end_stream()

    def generation_pause(self, reply: Reply) -> None:
        """The time a GPU takes for a token; a runaway's loop yields so a hang-up is noticed."""
        if self.stand_in.token_latency:
            time.sleep(self.stand_in.token_latency)
        if reply.endless or reply.runaway:
            time.sleep(0.001)

    def generated(self, reply: Reply, pieces: list) -> Iterable[tuple[str, str]]:
        """The tokens as the model streams them: the answer's, its text said over and over (a
        loop), or new words without end (a runaway)."""
        if reply.runaway:
            return (("content", f"word{number} ") for number in itertools.count(1))
        return itertools.cycle(pieces) if reply.endless else pieces

    def send_endless_line(self, chat: Chat, start: bytes) -> None:
        """The start of a line, then bytes without a newline until the client hangs up."""
        filler = b"a" * 65536
        try:
            self.stream_chunk(start)
            while True:
                self.stream_chunk(filler)
                time.sleep(0.001)
        except OSError:  # the client hung up
            chat.hung_up = True
            self.close_connection = True

    # -- the OpenAI-compatible API (/v1) --------------------------------------

    def model_list(self) -> dict:
        flavour = self.stand_in.flavour
        owner = {"llama-server": "llamacpp", "lmstudio": "organization_owner", "ollama": "library"}
        owner.update(openai="system", gemini="google", openrouter="openrouter")
        models = []
        for name in self.stand_in.models:
            card = {"id": name, "object": "model", "created": MODELS_CREATED}
            card["owned_by"] = owner.get(flavour, "vllm")
            if flavour in VLLM:  # vLLM's ModelCard also names the context it was started with
                card.update(root=name, parent=None, max_model_len=4096)
            models.append(card)
        return {"object": "list", "data": models}

    def openai_error(self, status: int, message: str) -> dict | list:
        """The error body of this flavour's server."""
        flavour = self.stand_in.flavour
        message = self.said(message)
        if flavour == "gemini":  # Google's error, in a list (google-gemini/gemini-cli#4635)
            return gemini_error(status, message)
        if flavour == "lmstudio":
            return {"error": message}
        if flavour in VLLM:
            names = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
            error = {"message": message, "type": names.get(status) or error_name(status)}
            error.update(param=None, code=status)
            return {"object": "error", **error} if flavour == "vllm-old" else {"error": error}
        if flavour == "llama-server":  # server-common.cpp, format_error_response
            names = {
                400: "invalid_request_error",
                401: "authentication_error",
                403: "permission_error",
                404: "not_found_error",
                501: "not_supported_error",
                503: "unavailable_error",
            }
            fallback = "server_error" if status >= 500 else "invalid_request_error"
            return {"error": {"code": status, "message": message, "type": names.get(status, fallback)}}
        # Ollama's openai.NewError
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def send_openai_error(self, status: int, message: str, headers: dict | None = None) -> None:
        self.send_json(status, self.openai_error(status, message), headers)

    # -- the toy API ------------------------------------------------------

    def toy_models(self) -> None:
        if self.path != "/toy/models":
            self.send_json(404, {"problem": f"no route {self.path}"})
        elif self.stand_in.models_reply:
            reply = self.stand_in.models_reply
            self.send_json(reply.status, {"problem": self.said(reply.error or "")}, retry_after(reply))
        else:
            self.send_json(200, {"models": list(self.stand_in.models)})

    def toy_caption(self) -> None:
        body = self.read_body(lambda status, problem: self.send_json(status, {"problem": problem}))
        if body is None:
            return
        if self.path != "/toy/caption":
            self.send_json(404, {"problem": f"no route {self.path}"})
            return
        if body.get("model") not in self.stand_in.models:
            self.send_json(404, {"problem": f"no model {body.get('model')}"})
            return
        chat = Chat(
            model=body["model"],
            prompt=body.get("prompt") or "",
            images=[base64.b64decode(body.get("image") or "")],
            options={},
            keep_alive=None,
            stream=False,
            received_at=time.monotonic(),
            api=TOY,
            body=body,
            authorization=self.headers.get("Authorization") or "",
        )

        def refused(status: int, problem: str, headers: dict | None) -> None:
            self.send_json(status, {"problem": self.said(problem)}, headers)

        def send(reply: Reply) -> None:
            if not self.sent_failure(reply, refused):
                self.request_done()
                self.send_json(200, {"caption": self.said(reply.text or "")})

        self.serve(chat, send)

    def rate_limited(self, body: dict) -> bool:
        """Count the request against the rate limit, if there is one, and set the headers its
        answer carries; or answer the 429 of a spent quota or budget. Whether it answered."""
        stand_in = self.stand_in
        if stand_in.quota_spent:
            error = {"message": QUOTA_SPENT, "type": "insufficient_quota", "param": None}
            self.send_json(429, {"error": {**error, "code": "insufficient_quota"}})
            return True
        if not stand_in.rate_limit:
            return False
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        tokens = RATE_PROMPT_TOKENS + (limit if isinstance(limit, int) else 0)
        with stand_in.lock:
            now = time.monotonic()
            if not stand_in.rate_since or now - stand_in.rate_since >= stand_in.rate_window:
                stand_in.rate_since, stand_in.rate_used = now, [0, 0]
            reset = stand_in.rate_since + stand_in.rate_window - now
            (requests, most_tokens), (used, tokens_used) = stand_in.rate_limit, stand_in.rate_used
            over = (
                "requests" if used + 1 > requests else "tokens" if tokens_used + tokens > most_tokens else ""
            )
            if not over:
                stand_in.rate_used = [used + 1, tokens_used + tokens]
            else:
                stand_in.refused_for_rate.append(now)
            used, tokens_used = stand_in.rate_used
        self.rate_headers = {
            "x-ratelimit-limit-requests": str(requests),
            "x-ratelimit-limit-tokens": str(most_tokens),
            "x-ratelimit-remaining-requests": str(requests - used),
            "x-ratelimit-remaining-tokens": str(most_tokens - tokens_used),
            "x-ratelimit-reset-requests": go_duration(reset),
            "x-ratelimit-reset-tokens": go_duration(reset),
        }
        if over:
            said = (requests, used, 1) if over == "requests" else (most_tokens, tokens_used, tokens)
            unit = "requests per min (RPM)" if over == "requests" else "tokens per min (TPM)"
            message = (
                f"Rate limit reached for {body.get('model')} in organization org-standin on {unit}: "
                f"Limit {said[0]}, Used {said[1]}, Requested {said[2]}. Please try again in "
                f"{go_duration(reset)}. Visit https://platform.openai.com/account/rate-limits to learn more."
            )
            error = {"message": message, "type": over, "param": None, "code": "rate_limit_exceeded"}
            self.send_json(429, {"error": error}, {"Retry-After": str(math.ceil(reset))})
        return bool(over)

    def openai_chat(self, body: dict) -> None:
        flavour = self.stand_in.flavour
        if self.rate_limited(body):
            return
        known = self.fields_read()
        wrong = field_type_error(body, known, flavour) if known else ""
        if wrong:  # the request is refused as it is read, before its model is looked for
            self.send_openai_error(400, wrong)
            return
        refusal = self.hosted_refusal(body) if flavour in HOSTED else None
        if refusal:
            with self.stand_in.lock:
                self.stand_in.refusals.append((body, refusal))
            self.send_json(
                400, gemini_error(400, refusal["message"]) if flavour == "gemini" else {"error": refusal}
            )
            return
        model = body.get("model") or ""
        entry = self.entry(model, "openai")
        if entry is None:
            if flavour == "ollama":
                self.send_openai_error(404, f"model '{model}' not found")
            else:
                self.send_openai_error(404, f"The model `{model}` does not exist.")
            return
        messages = body.get("messages") or []
        if not messages:
            self.send_openai_error(400, "[] is too short - 'messages'")
            return
        try:
            prompt, images = self.openai_content(messages, entry)
        except Refused as refusal:
            self.send_openai_error(refusal.status, str(refusal))
            return
        chat = Chat(
            model=model,
            prompt=prompt,
            images=images,
            options={},
            keep_alive=None,
            stream=bool(body.get("stream")),  # OpenAI's default is one object, not a stream
            received_at=time.monotonic(),
            think=False if self.thinking_off(body) else None,
            api="openai",
            body=body,
            authorization=self.headers.get("Authorization") or "",
            system="".join(text_of(m) for m in messages if m.get("role") == "system"),
            roles=[message.get("role") for message in messages],
            ignored=sorted(name for name in body if known and name not in known),
        )
        self.completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.serve(chat, lambda reply: self.send_openai_reply(reply, chat))

    def hosted_refusal(self, body: dict) -> dict | None:
        """The error object a hosted service answers this request with (400), or None.
        OpenAI is strict: an unknown argument, max_tokens or a temperature other than 1 for a
        reasoning model, an effort it does not take, an image detail it does not know; Gemini and
        OpenRouter check only their reasoning words here (they pass other fields on or over)."""
        flavour = self.stand_in.flavour
        reasoning = bool(OPENAI_REASONING.match(str(body.get("model") or "")))

        def refused(message: str, param: str | None = None, code: str | None = None) -> dict:
            return {"message": message, "type": "invalid_request_error", "param": param, "code": code}

        if flavour == "gemini":
            effort = body.get("reasoning_effort")
            if effort is not None and effort not in GEMINI_EFFORTS:
                return refused(f"Invalid reasoning_effort: {effort}")
            return None
        if flavour == "openrouter":
            effort = (body.get("reasoning") or {}).get("effort")
            if effort is not None and effort not in OPENROUTER_EFFORTS:
                return refused(f"Invalid reasoning effort: {effort}")
            return None
        for name in body:
            if name not in OPENAI_FIELDS or (name == "reasoning_effort" and not reasoning):
                return refused(f"Unrecognized request argument supplied: {name}")
        if reasoning and "max_tokens" in body:
            return refused(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "max_tokens",
                "unsupported_parameter",
            )
        temperature = body.get("temperature")
        if reasoning and temperature is not None and temperature != 1:
            return refused(
                f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                "Only the default (1) value is supported.",
                "temperature",
                "unsupported_value",
            )
        effort = body.get("reasoning_effort")
        model = str(body.get("model"))
        if effort is not None and OPENAI_SINCE_5_1.match(model) and effort not in OPENAI_EFFORTS_SINCE_5_1:
            return refused(
                f"Unsupported value: '{effort}' is not supported with the '{model}' model. "
                f"Supported values are: {openai_values(OPENAI_EFFORTS_SINCE_5_1)}.",
                "reasoning_effort",
                "unsupported_value",
            )
        if effort is not None and not OPENAI_SINCE_5_1.match(model) and effort not in OPENAI_EFFORTS:
            return refused(
                f"Invalid value: '{effort}'. Supported values are: {openai_values(OPENAI_EFFORTS)}.",
                "reasoning_effort",
                "invalid_value",
            )
        for index, message in enumerate(body.get("messages") or []):
            content = message.get("content") if isinstance(message, dict) else None
            for part_index, part in enumerate(content if isinstance(content, list) else []):
                image_url = part.get("image_url") if isinstance(part, dict) else None
                detail = image_url.get("detail") if isinstance(image_url, dict) else None
                if detail is not None and detail not in IMAGE_DETAILS:
                    return refused(
                        f"Invalid value: '{detail}'. Supported values are: {openai_values(IMAGE_DETAILS)}.",
                        f"messages[{index}].content[{part_index}].image_url.detail",
                        "invalid_value",
                    )
        return None

    def reasoning_spent(self, chat: Chat) -> int:
        """The reasoning tokens an OpenAI reasoning model spent (billed, never streamed)."""
        if self.stand_in.flavour != "openai" or not OPENAI_REASONING.match(chat.model):
            return 0
        return REASONING_SPENT[chat.body.get("reasoning_effort") or "medium"]

    def fields_read(self) -> dict:
        """The top-level fields this flavour's server reads, where the stand-in knows them
        (vLLM's, Ollama's /v1); {} for the others, which take every field here."""
        return {"ollama": OLLAMA_V1_FIELDS, **dict.fromkeys(VLLM, VLLM_FIELDS)}.get(self.stand_in.flavour, {})

    def openai_content(self, messages: list, entry: dict) -> tuple[str, list]:
        """The prompt (every text part) and the decoded images of the messages but the system's."""
        texts, images = [], []
        for message in messages:
            if message.get("role") == "system":
                continue
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                if part.get("type") == "text":
                    texts.append(part.get("text") or "")
                elif part.get("type") == "image_url":
                    if not sees(entry):
                        # llama-server throws a runtime_error here, which it answers as a 500
                        # server_error, not a 400 (oaicompat_chat_params_parse).
                        raise Refused(500 if self.stand_in.flavour == "llama-server" else 400, NO_MMPROJ)
                    images.append(self.image_from(part.get("image_url")))
        return "".join(texts), images

    def image_from(self, image_url: Any) -> bytes:
        """The bytes of a data URI image, or the flavour's refusal."""
        flavour = self.stand_in.flavour
        if isinstance(image_url, str) and flavour == "ollama":  # Ollama also takes a bare string
            url = image_url
        elif isinstance(image_url, dict):
            url = image_url.get("url") or ""
        else:
            raise Refused(400, "image_url must be an object with a url")
        if url.startswith(("http://", "https://")):  # vLLM and llama-server would fetch it
            raise Refused(
                400,
                "image URLs are not currently supported, please use base64 encoded data instead"
                if flavour == "ollama"
                else "the stand-in fetches no image URLs: send a data URI",
            )
        match = DATA_URI.fullmatch(url)
        if flavour == "ollama" and not (match and match[2] and match[1] in OLLAMA_IMAGE_TYPES):
            raise Refused(400, "invalid image input")
        data = strict_base64(match[3]) if match and match[2] else "not a base64 data URI"
        picture = image_format(data) if isinstance(data, bytes) else None
        # llama-server decodes with stb_image; the others take what Pillow-like decoders take.
        if flavour == "llama-server" and picture not in LLAVA_DECODABLE:
            raise Refused(400, "Failed to load image or audio file")
        if picture is None:
            reason = data if isinstance(data, str) else "cannot identify image file"
            raise Refused(400, "invalid image input" if flavour == "ollama" else f"Invalid image: {reason}")
        return data

    def thinking_off(self, body: dict) -> bool:
        """Whether the request turns thinking off in a way this flavour's server reads: Ollama
        maps reasoning_effort "none" to think:false, vLLM hands chat_template_kwargs to the
        template, llama-server reads both."""
        by_template = (body.get("chat_template_kwargs") or {}).get("enable_thinking") is False
        by_effort = body.get("reasoning_effort") == "none"
        flavour = self.stand_in.flavour
        if flavour == "ollama":
            return by_effort
        if flavour in VLLM:
            return by_template
        if flavour == "openai":  # the lowest effort there is
            return body.get("reasoning_effort") == "minimal"
        if flavour == "gemini":
            return by_effort
        if flavour == "openrouter":
            reasoning = body.get("reasoning") or {}
            return reasoning.get("effort") == "none" or reasoning.get("enabled") is False
        return by_template or by_effort

    def reasoning_field(self) -> str:
        # llama-server (and vLLM before it renamed the field) stream reasoning_content.
        return "reasoning_content" if self.stand_in.flavour in ("llama-server", "vllm-old") else "reasoning"

    def openai_object(self, chat: Chat, kind: str, **fields: Any) -> dict:
        made = {"id": self.completion_id, "object": kind, "created": self.created, "model": chat.model}
        if self.stand_in.flavour == "ollama":
            made["system_fingerprint"] = "fp_ollama"
        return {**made, **fields}

    def chunk(self, chat: Chat, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self.openai_object(chat, "chat.completion.chunk", choices=[choice])

    def delta(self, kind: str, token: str) -> dict:
        if kind == "content":
            return {"role": "assistant", "content": token}
        if self.stand_in.flavour == "ollama":  # Ollama's thinking chunks carry an empty content
            return {"role": "assistant", "content": "", "reasoning": token}
        return {"role": "assistant", self.reasoning_field(): token}

    def usage(self, reply: Reply, pieces: list, chat: Chat | None = None) -> dict:
        hidden = self.reasoning_spent(chat) if chat else 0  # reasoning a hosted model does not stream
        generated = len(pieces) + hidden  # reasoning is billed as output (completion) tokens
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": reply.prompt_tokens + generated,
        }
        if self.stand_in.reasoning_details or self.stand_in.flavour in HOSTED:
            thinking = sum(kind == "thinking" for kind, _ in pieces) + hidden
            usage["completion_tokens_details"] = {"reasoning_tokens": thinking}
        return usage

    def send_openai_reply(self, reply: Reply, chat: Chat) -> None:
        if self.sent_failure(reply, self.send_openai_error):
            return
        if reply.error and reply.error_in_200:
            self.request_done()
            self.send_json(200, self.openai_error(500, reply.error))
            return
        body = chat.body
        # Ollama's /v1 reads only max_tokens; vLLM prefers max_completion_tokens.
        limit = body.get("max_tokens")
        if self.stand_in.flavour != "ollama":
            limit = body.get("max_completion_tokens") or limit
        _, pieces, finish_reason = self.pieces(chat, reply, limit if isinstance(limit, int) else -1)
        reasoning = self.reasoning_spent(chat)
        if reasoning and isinstance(limit, int):  # reasoning spends max_completion_tokens first
            budget = max(limit - reasoning, 0)
            if budget < len(pieces):
                pieces, finish_reason = pieces[:budget], "length"
        if chat.stream:
            self.stream_openai(reply, chat, pieces, finish_reason)
            return
        self.request_done()
        if reply.error:
            self.send_openai_error(500, reply.error)
            return
        message = {"role": "assistant", "content": "".join(t for kind, t in pieces if kind == "content")}
        thinking = "".join(token for kind, token in pieces if kind == "thinking")
        if thinking:
            message[self.reasoning_field()] = thinking
        choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        usage = self.usage(reply, pieces, chat)
        self.send_json(200, self.openai_object(chat, "chat.completion", choices=[choice], usage=usage))

    def send_piece(self, chat: Chat, kind: str, token: str, finish_reason: str | None = None) -> None:
        self.stream_event(self.chunk(chat, self.delta(kind, token), finish_reason))
        chat.tokens_sent += 1
        chat.thinking_sent += kind == "thinking"

    def stream_openai(self, reply: Reply, chat: Chat, pieces: list, finish_reason: str) -> None:
        """Server-sent events token by token. vLLM puts finish_reason on the chunk of the last
        token; Ollama and llama-server send it in a chunk of its own. Then the usage chunk, when
        asked for, and [DONE]."""
        flavour = self.stand_in.flavour
        held = 1 if flavour in VLLM and pieces and not (reply.endless or reply.runaway) else 0
        leading, last = pieces[: len(pieces) - held], pieces[len(pieces) - held :]
        self.start_stream(last=reply.vanish, content_type="text/event-stream", compressed=reply.compressed)
        self.event_field = b"data:" if reply.unspaced_events else b"data: "
        if reply.endless_line:
            self.send_endless_line(chat, b'data: {"choices":[{"index":0,"delta":{"content":"')
            return
        try:
            for kind, token in self.generated(reply, leading):
                self.send_piece(chat, kind, token)
                self.generation_pause(reply)
        except OSError:  # the client hung up: the server cancels the request
            chat.hung_up = True
            self.close_connection = True
            return
        self.request_done()
        if reply.vanish:
            self.stand_in.stop(spare=self.connection)
        for kind, token in last:
            self.send_piece(chat, kind, token, finish_reason if reply.done and not reply.error else None)
        if reply.error:
            # vLLM wraps its error object (flat before 0.10.1) in "error" and still ends with
            # [DONE]; llama-server sends {"error": ...} and stops.
            status = 400 if flavour in VLLM else 500
            error = self.openai_error(status, reply.error)
            self.stream_event({"error": error} if flavour == "vllm-old" else error)
            if flavour in VLLM:
                self.stream_event("[DONE]")
        elif reply.done:
            if not last:
                ending = {"role": "assistant", "content": ""} if flavour in (*VLLM, "ollama") else {}
                self.stream_event(self.chunk(chat, ending, finish_reason))
            if (chat.body.get("stream_options") or {}).get("include_usage"):
                usage = self.usage(reply, pieces, chat)
                self.stream_event(self.openai_object(chat, "chat.completion.chunk", choices=[], usage=usage))
            self.stream_event("[DONE]")
        self.end_stream()


class Refused(Exception):
    """A request the server turns down before generating: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sees(entry: dict) -> bool:
    """Whether the model takes images: its vision capability, or on servers before Ollama
    0.6.4 (no capabilities) a projector in its families."""
    capabilities = entry.get("capabilities")
    if capabilities is None:
        return "clip" in (entry.get("families") or [])
    return "vision" in capabilities


def ollama_option_error(options: dict) -> str:
    """Ollama's error for an option of the wrong type (api/types.go, Options.FromMap), or "". Go
    ranges over a map in no set order: of two wrong options, either may be named."""
    for key, value in options.items():
        kind = OLLAMA_OPTIONS.get(key)
        if kind is None or value is None:  # unknown: skipped with a log line; null: skipped
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = {
            "integer": number,
            "float32": number,
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
        }
        if not fits[kind]:
            return f'option "{key}" must be of type {kind}'
        if kind == "array" and not all(isinstance(item, str) for item in value):
            return f'option "{key}" must be of an array of strings'
    return ""


def field_type_error(body: dict, known: dict, flavour: str) -> str:
    """The server's refusal of a top-level field of the wrong type, or "". vLLM validates the
    request with pydantic (lax: "40" is an integer), and its 400 carries the validation errors,
    worded here as pydantic's errors() list (the exact message around it varies by version);
    Ollama's /v1 answers encoding/json's error."""
    for name, kind in known.items():
        value = body.get(name)
        if kind is None or value is None:
            continue
        if flavour == "ollama":
            wrong = go_decode_error(value, kind)
            if wrong:
                go_type = "int" if kind is int else "float64"
                return f"json: cannot unmarshal {wrong} into Go struct field ChatCompletionRequest.{name} of type {go_type}"
            continue
        wrong = pydantic_error(value, kind)
        if wrong:
            error_type, message = wrong
            return str([{"type": error_type, "loc": ("body", name), "msg": message, "input": value}])
    return ""


def go_decode_error(value: Any, kind: type) -> str:
    """What Go's encoding/json calls a JSON value it cannot decode into an int or a float64."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float) and kind is int and not value.is_integer():
        return f"number {value:g}"
    if isinstance(value, (int, float)):
        return ""
    return {str: "string", list: "array", dict: "object"}[type(value)]


def pydantic_error(value: Any, kind: type) -> tuple[str, str] | None:
    """Pydantic's (lax mode) error type and message for a value of an int or float field."""
    what, article = ("integer", "an") if kind is int else ("number", "a")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        return (
            f"{kind.__name__}_parsing",
            f"Input should be a valid {what}, unable to parse string as {article} {what}",
        )
    if not isinstance(number, (int, float)):
        return f"{kind.__name__}_type", f"Input should be a valid {what}"
    if kind is int and not float(number).is_integer():
        return "int_from_float", "Input should be a valid integer, got a number with a fractional part"
    return None


def text_of(message: dict) -> str:
    """A message's text: its content as a string, or its text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if part.get("type") == "text")


def error_name(status: int) -> str:
    """vLLM-style type for other statuses: 503 is "ServiceUnavailableError"."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:  # a status no standard names, as a proxy's 529
        return "Error"


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it (Go's): "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest}" if minutes else rest


def retry_after(reply: Reply) -> dict:
    return {} if reply.retry_after is None else {"Retry-After": f"{reply.retry_after:g}"}


def strict_base64(encoded: str) -> bytes | str:
    """The image bytes, or Go's error for a string that is not standard base64 (Go's
    encoding/json decodes []byte with StdEncoding)."""
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        alphabet = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
        position = next((i for i, byte in enumerate(encoded.encode()) if byte not in alphabet), 0)
        return f"illegal base64 data at input byte {position}"


def decodable_by_llava(data: bytes) -> bool:
    return image_format(data) in LLAVA_DECODABLE


def image_format(data: bytes) -> str | None:
    """Pillow's name for the image's format, or None for bytes that are no image."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
