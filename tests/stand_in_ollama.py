"""A stand-in Ollama server on 127.0.0.1 for the tests and the benchmark.

It speaks the parts of Ollama's HTTP API the captioner uses, with the shapes, status codes
and error strings of Ollama's server/routes.go and api/types.go: GET/HEAD /, /api/version,
/api/tags, /api/ps, POST /api/show, /api/pull (NDJSON progress) and /api/chat (NDJSON by
default, one JSON object with "stream": false). Like llava's stb_image decoder it accepts
only JPEG, PNG, BMP and GIF. It records every chat request, counts requests in flight,
and can be scripted to answer each image differently: an error status, an error line
mid-stream, a stream that ends without "done", silence, a dropped connection.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
THOUGHT = " ".join(  # 90 tokens of what a model thinks
    f"Step {step}: the user wants a caption, so I look at part {step} of the picture and note what I see."
    for step in range(1, 6)
)
BUSY = "server busy, please try again.  maximum pending requests exceeded"
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)
RUNNER_CRASH = (
    "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details"
)


@dataclass
class Chat:
    """One /api/chat request as the server received it."""

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
    think: Any = None  # the request's "think", as sent
    thinking_sent: int = 0  # tokens streamed in message.thinking

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


Answer = Callable[[Chat], Union[Reply, str]]


def describe(chat: Chat) -> str:
    """Default answer: llava-like (leading space, a newline) and naming what arrived."""
    picture = chat.picture()
    return f" A {picture.format} picture,\n{picture.width}x{picture.height} pixels. "


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

    # Every endpoint answers 502 with nginx's page, as a reverse proxy does while its Ollama
    # restarts.
    down: bool = False

    def __post_init__(self) -> None:
        self.chats: list = []
        self.requests: list = []  # (time.monotonic(), method, path) of every request
        self.connections: set = set()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.slot_gate = threading.Semaphore(self.slots)
        handler = type("Handler", (Handler,), {"stand_in": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.005,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> StandInOllama:
        self.thread.start()
        return self

    def stop(self, spare: socket.socket | None = None) -> None:
        """Die as a killed server does: stop listening and cut every open connection."""
        if self.thread.is_alive():
            self.httpd.shutdown()
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

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
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

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def start_stream(self, last: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        if last:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def stream_line(self, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def read_body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            self.send_error_json(400, "missing request body")
            return None
        try:
            return json.loads(self.rfile.read(length))
        except json.JSONDecodeError as exc:
            self.send_error_json(400, str(exc))
            return None

    # -- routes -----------------------------------------------------------

    def proxy_says_down(self) -> bool:
        with self.stand_in.lock:
            self.stand_in.requests.append((time.monotonic(), self.command, self.path))
        if not self.stand_in.down:
            return False
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_text(502, NGINX_502, "text/html")
        return True

    def send_text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        stand_in = self.stand_in
        if self.proxy_says_down():
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
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [self.model_entry(name) for name in stand_in.models]})
        elif self.path == "/api/ps":
            self.send_json(200, {"models": []})
        else:
            self.not_found()

    def do_POST(self) -> None:
        routes = {"/api/show": self.show, "/api/pull": self.pull, "/api/chat": self.chat}
        route = routes.get(self.path)
        if self.proxy_says_down():
            return
        if route is None:
            self.not_found()
            return
        body = self.read_body()
        if body is not None:
            route(body)

    def not_found(self) -> None:
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
        chat = Chat(
            model=model,
            prompt="".join(m.get("content") or "" for m in messages),
            images=images,
            options=body.get("options") or {},
            keep_alive=body.get("keep_alive"),
            stream=body.get("stream", True),
            received_at=time.monotonic(),
            think=body.get("think"),
        )
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
                self.send_reply(model, reply, chat)
                chat.answered_at = time.monotonic()
            else:
                chat.hung_up = True
        finally:
            self.request_done()

    def thought(self, chat: Chat) -> str:
        """What the model thinks before it answers, as Ollama 0.12.4+ decides it."""
        entry = self.stand_in.models.get(normalized(chat.model), {})
        can_think = "thinking" in (entry.get("capabilities") or []) or entry.get("inline_thinking")
        if not can_think:
            return ""
        return THOUGHT if chat.think is None or chat.think or entry.get("thinking_only") else ""

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
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                self.close_connection = True
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.01))

    def send_reply(self, model: str, reply: Reply, chat: Chat) -> None:
        stream = chat.stream
        if reply.drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if reply.status != 200:
            self.request_done()
            if reply.body is not None:
                self.send_text(reply.status, reply.body, "text/html")
            else:
                self.send_error_json(reply.status, reply.error or "")
            return
        text = reply.text or ""
        thought = self.thought(chat)
        if thought and self.stand_in.models.get(normalized(model), {}).get("inline_thinking"):
            text, thought = f"<think>{thought}</think>{text}", ""
        pieces = [("thinking", token) for token in re.findall(r"\S+\s*", thought)]
        pieces += [("content", token) for token in re.findall(r"\S+\s*|\s+", text)]
        done_reason = reply.done_reason
        limit = chat.options.get("num_predict") or -1
        if 0 < limit < len(pieces) and not reply.endless:  # thinking spends num_predict too
            pieces, done_reason = pieces[:limit], "length"
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
        self.start_stream(last=reply.vanish)
        try:
            for kind, token in itertools.cycle(pieces) if reply.endless else pieces:
                piece = {"role": "assistant", "content": "", kind: token}
                self.stream_line({"model": model, "created_at": now(), "message": piece, "done": False})
                chat.tokens_sent += 1
                chat.thinking_sent += kind == "thinking"
                if self.stand_in.token_latency:
                    time.sleep(self.stand_in.token_latency)
                if reply.endless:
                    time.sleep(0.001)
        except OSError:  # the client hung up: Ollama cancels the request and stops generating
            chat.hung_up = True
            self.close_connection = True
            return
        self.request_done()
        if reply.vanish:
            self.stand_in.stop(spare=self.connection)
        if reply.error:
            self.stream_line({"error": reply.error})
        elif reply.done:
            self.stream_line(final)
        self.end_stream()


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
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.format in LLAVA_DECODABLE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
