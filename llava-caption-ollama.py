#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "ollama>=0.6.3,<0.7",
#     "httpx>=0.27",
#     "Pillow>=9.1",
# ]
# ///
"""Caption every image of a folder with a vision model served by a local Ollama.

    python llava-caption-ollama.py DIR [PROMPT_FILE]
    python llava-caption-ollama.py DIR [DIR ...] [--prompt PROMPT_FILE]

Each caption is written as <image stem>.txt beside its image (the Kohya convention),
atomically: a caption file is either complete or absent.  The work itself is
caption_folders(), usable without the command line; main() parses and calls it.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import enum
import errno
import functools
import hashlib
import importlib.util
import io
import ipaddress
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import ssl
import stat
import string
import sys
import threading
import time
import unicodedata
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar, NamedTuple, NoReturn, TextIO
from urllib.parse import urlsplit

# The libraries only a run that sends images needs, imported by import_run_libraries(): once,
# under a lock, as a thumbnail thread may ask for them while the main thread imports them.
IMPORTING = threading.Lock()
httpx: Any = None
ollama: Any = None
Image: Any = None
UnidentifiedImageError: Any = None

EXIT_OK, EXIT_SOME_FAILED, EXIT_CANNOT_START = 0, 1, 2

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PROMPT_FILE = Path(__file__).resolve().parent / "prompt.txt"
# The default prompt when the script runs without its prompt.txt (copied alone, or run by `uv
# run` from a URL): prompt.txt's own text, which a test keeps equal, so both are one pass.
BUILT_IN_PROMPT = (
    "Write one caption for this image, to be used as a Stable Diffusion training caption.\n"
    "Describe, in this order: the main subject, what it is doing, the setting, the medium or style, the lighting, and notable objects or colours.\n"
    'Write a single line of comma-separated descriptive phrases, densest first, without a preamble, without "The image shows", without quotes, and without any comment about the caption itself.'
)
IMAGE_EXTENSIONS = frozenset([".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"])
# What trainers keep beside the images: latent and text-encoder caches (Kohya's .npz,
# OneTrainer's and diffusers' tensors), masks and metadata, video clips. A caption path
# ending in one of these would destroy it.
DATASET_SIDE_EXTENSIONS = frozenset(
    [".npz", ".npy", ".safetensors", ".pt", ".pth", ".ckpt", ".json", ".jsonl", ".toml", ".yaml", ".yml"]
    + [".mp4", ".webm", ".mov", ".mkv", ".avi", ".heic", ".heif", ".jxl", ".psd", ".svg"]
)
CLIP_TOKENS = 77  # what Stable Diffusion's text encoder reads of a caption
PLACEHOLDERS = ("name", "folder", "class", "existing")  # what a prompt file may ask for
# Every file the tool itself keeps in a dataset folder starts with this (hidden, so trainers
# and discovery pass it over): the lock, the journal and temporary files.
OWN_FILE_PREFIX = ".llava-caption-ollama"
# A caption is one or two sentences of some 60-250 tokens; a model that loops goes on until
# its context is full, so every answer is bounded. Thinking spends the same budget (ollama/
# ollama#16184): a model allowed to think gets room for some 1,500 tokens of it.
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_TOKENS_THINKING = 2048
# What OpenAI bills for a picture at detail "high" (or "auto"), its GPT-4o family's rule
# (platform.openai.com/docs/guides/images-vision, "Calculating costs", as quoted on 2026-12-06):
# scaled to fit 2048x2048, then down so its shortest side is 768, then 170 tokens for each
# 512-px tile it covers, plus 85; at detail "low" 85 whatever its size. Other models and
# providers count otherwise (GPT-4.1-mini in 32-px patches, Gemini per 768-px tile, a local
# model by its encoder): an estimate from it is as exact as the model counts alike.
OPENAI_IMAGE_TOKENS = {"base": 85, "tile": 170, "tile_side": 512, "fit": 2048, "shortest": 768}
# What a dry run expects a caption to cost, in output tokens: one or two sentences (see above).
EXPECTED_CAPTION_TOKENS = 150
# llava 1.6 turns one image into up to ~2,880 tokens, so Ollama's old 2,048 default context
# gave empty answers (ollama/ollama#2813).
DEFAULT_NUM_CTX = 4096
DEFAULT_KEEP_ALIVE = "30m"
DEFAULT_MODEL = "llava:13b"
# An OpenAI-compatible server cannot say what temperature the model was made for, and Ollama's
# /v1 uses 1.0 where its native API uses 0.8 (api/types.go DefaultOptions); 0.8 keeps both
# APIs alike.
OPENAI_TEMPERATURE = 0.8
RETRY_AFTER_LONGEST = 300.0  # a Retry-After beyond this is read as this
# A request's tokens as --tpm counts them, before any answer says: OpenAI counts a request against
# its tokens-per-minute limit as its max tokens plus an estimate of its prompt, before it is
# answered (platform.openai.com/docs/guides/rate-limits, as stored on 2026-06-26). A picture at
# the default --max-size 1344 is at most 1,105 tokens at OpenAI's high detail (85, and 170 for
# each 512-px tile of 1152x768: its images-and-vision guide) and 1,032 at Gemini's (258 for each
# 768-px tile); 1,200 covers either with the prompt. An overestimate only paces a little slow.
PROMPT_TOKENS_GUESS = 1200

# Re-encoding a small plain JPEG/PNG costs ~5 ms and a generation of quality for ~5% fewer
# bytes, so files up to this size that need no change are sent as they are.
PASS_THROUGH_MAX_BYTES = 1_500_000
JPEG_QUALITY = 90  # a longer side of 1344 px at q90 is 0.47-0.53 MB of base64 per photo
LOOP_SPAN = 60  # characters of repeats that make a loop (see REPEATS)
LOOP_CHECK_EVERY = 16  # streamed pieces between two loop checks of a growing answer
# What a server may send, whatever it does with the limits it is sent. A token of these models'
# vocabularies (Llama, Qwen, Gemma BPE) is some 4 characters of English and fewer of other
# scripts; the longest are runs of spaces or punctuation a few dozen long. No answer within its
# token limit comes near 32 characters a token, so a longer one (thinking included) comes from a
# server that ignores the limit: stopped after 16,384 characters at the default 512 tokens,
# where a model that never repeats itself (no loop check catches it) would go on for ever.
CHARACTERS_PER_TOKEN = 32
# A streamed line is one token's JSON (under 1 KB); the longest line these APIs send is a whole
# JSON answer (/api/show with a model's licence and template, /api/tags of hundreds of models:
# some 100 KB). A line past 4 MiB is no answer of theirs, and held whole it would fill memory.
LONGEST_LINE = 4 * 1024 * 1024
# A caption request waits up to --timeout for its first byte (a queued one gets none until a slot
# frees), then generates at most --max-tokens: a GPU writes 512 tokens in 10-60 s, a CPU at 2
# tokens/s in some 4 minutes. A second --timeout for that bounds a server that sends a token now
# and then without end, which no read timeout notices.
DEADLINE_TIMEOUTS = 2


def pause_scale() -> float:
    # The tests shrink every pause the tool makes on its own (backoff, probes, the limit on
    # calls that load no model) so that the suite waits less than it computes.
    try:
        scale = float(os.environ.get("LLAVA_CAPTION_PAUSE_SCALE", "1"))
    except ValueError:
        return 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


PAUSE_SCALE = pause_scale()
BACKOFF_FIRST, BACKOFF_LONGEST = 0.5 * PAUSE_SCALE, 30.0 * PAUSE_SCALE
PROBE_FIRST, PROBE_LONGEST = 0.25 * PAUSE_SCALE, 15.0 * PAUSE_SCALE
# /api/version, /api/tags and /api/show load no model: a server answers them in milliseconds,
# so a port that accepts and stays silent is found out in seconds, not after --timeout. Never
# under 3 s, whatever the scale: a server on a loaded machine (the tests' stand-in beside four
# suites at once) has taken more than a second to list its models.
QUICK_TIMEOUT = max(10.0 * PAUSE_SCALE, 3.0)
DRAIN_SECONDS = 20.0  # after the first Ctrl-C, how long answers already on their way may take
POLL_SECONDS = 0.1  # how soon the coordinator notices a stop
PLAN_FIRST_SECONDS = 0.1  # planning before the first request: 10,000 images here, not 100,000
# A temporary file of ours lives for milliseconds; one this old was left by a killed run (the
# rule for names without their writer's pid, which earlier versions wrote).
STALE_SECONDS = 60.0


# ---------------------------------------------------------------------------
# Facts about models and servers: tables the code reads, each row with its source
# ---------------------------------------------------------------------------
# None of these could be tried on a real server here (no GPU): each comes from the upstream
# source or issue named beside it, and each behaviour built on it is tested against the tests'
# stand-in server. The next model release changes this section, not the code below.


@dataclass(frozen=True)
class ModelFacts:
    """What the model table of docs/servers-and-models.md says of a family of models (the tests hold the two to
    each other)."""

    tags: str  # as the docs' model table names them
    architectures: tuple[str, ...]  # general.architecture in Ollama's /api/show
    thinks: str  # "no", "yes", or how to avoid it
    num_ctx: str
    notes: str
    source: str
    # Answers nothing at all when told not to think (read by the run: SILENT_WITHOUT_THINKING).
    silent_without_thinking: bool = False

    @property
    def one_at_a_time(self) -> bool:
        return any(architecture.startswith(ONE_AT_A_TIME) for architecture in self.architectures)


# Architectures that Ollama runs one request at a time whatever OLLAMA_NUM_PARALLEL says
# (server/sched.go at v0.33: "model architecture does not currently support parallel requests").
ONE_AT_A_TIME = ("mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2", "nemotron_h")

# The levels Ollama's "think" takes, lowest first; any other string is a 400 "invalid think value"
# (ollama/ollama PR #15787; Qwen 3.8 takes all four, ollama/ollama#18091). Which values a model takes,
# levels or true/false, its /api/show says since PR #18473: "thinking": {"values": [...], "default": ...}.
THINK_LEVELS = ("low", "medium", "high", "max")

MODELS = [
    ModelFacts(
        "`llava:13b` (default), `llava:7b`, `llava:34b`",
        ("llama", "clip"),
        "no",
        "4096 (up to ~2,880 image tokens)",
        "a 2023 model; the default because it is the user's choice. Since Ollama 0.32.10 its `repeat_penalty` "
        "is 1.0 (was 1.1) and it may repeat itself more: `--option repeat_penalty=1.1` restores the older one",
        "Ollama docs and source (commit 6a261db7d); the tests' stand-in",
    ),
    ModelFacts(
        "`qwen2.5vl:7b`",
        ("qwen25vl",),
        "no",
        "4096+ (≈ (w/28)·(h/28) tokens: ~1,700 at 1344×896)",
        "runner crashes under 28 px a side (padded here)",
        "Ollama source and issues (#11297)",
    ),
    ModelFacts(
        "`qwen3-vl:8b-instruct`",
        ("qwen3vl",),
        "no (`-instruct`)",
        "8192",
        "thinking tags ignore `think: false`: use `-instruct`",
        "Ollama source (sched.go), #14798",
    ),
    ModelFacts("`gemma3:12b`", ("gemma3",), "no", "4096 (256 image tokens)", "", "Ollama source"),
    ModelFacts(
        "`gemma4`",
        ("gemma4",),
        "yes, by default: `think: false` sent",
        "4096 (280 image tokens)",
        "on Ollama's MLX engine (Apple Silicon, 0.40+) `think: false` gets an empty answer: the run stops at "
        "the first, saying so, and `--think` captions",
        "Ollama #15268, #17823, PR #17154",
        silent_without_thinking=True,
    ),
    ModelFacts(
        "`qwen3.6`, `qwen3.8`",
        ("qwen35", "qwen35moe"),
        "at levels, never off: `low` sent (`--think-level`)",
        "8192",
        '3.8 thinks at `high` by default; its template can answer 500 "no user query found in messages": '
        "the run stops, naming the fix (a newer Ollama, a larger context)",
        "Ollama #18091, #17778, PR #15787, PR #18473",
    ),
    ModelFacts("`qwen3.5`", ("qwen35",), "yes: `think: false` sent", "8192", "", "Ollama source"),
    ModelFacts(
        "`minicpm-v`, MiniCPM-V 4.6",
        ("qwen2",),
        "no",
        "4096",
        "4.6 (1.3B) runs on Ollama, llama.cpp and vLLM alike",
        "Ollama issues; OpenBMB",
    ),
    ModelFacts(
        "`mistral-small3.2`",
        ("mistral3",),
        "no",
        "8192 (up to ~3,000 image tokens at 1540 px)",
        "",
        "Ollama source",
    ),
    ModelFacts(
        "JoyCaption Beta One (community uploads)",
        ("llama", "clip"),
        "no",
        "4096",
        'made to be asked with the system prompt "You are a helpful image captioner.": give it with `--system`',
        "fpgaminer/joycaption README",
    ),
    ModelFacts(
        "`llama3.2-vision`",
        ("mllama",),
        "no",
        "",
        "cannot load on Ollama 0.30+ (the run says so)",
        "Ollama #16490",
    ),
]

# Some vision encoders crash the runner on a side under 28-32 px (qwen2.5vl, ollama/ollama#11297)
# or an aspect ratio beyond ~200:1 (ollama/ollama#13113): such pictures are padded with white.
SMALLEST_SIDE = 32
WIDEST_ASPECT = 50

# How each Ollama era says it could not decode an image: v0.4-0.11.4 (llava embedding),
# v0.11.5-0.29 (mtmd), the Go engine (image: unknown format), v0.30+ llama-server (400).
UNDECODABLE = re.compile(
    r"unable to make llava embedding|unable to tokenize mtmd embedding|image: unknown format"
    r"|failed to load image|failed to decode image",
    re.IGNORECASE,
)


# How each Ollama era says that the run's model or settings cannot work on a server, and the fix.
# The context message is llama-server's, passed through since Ollama 0.30; older servers cut the
# prompt silently instead (see refuse_cut_prompt()).
UNUSABLE_MODEL = [
    (
        re.compile(r"unknown model architecture: '?([\w.-]+)", re.IGNORECASE),
        (
            "this Ollama version cannot run the model (its architecture {0} is unknown to it, as "
            "llama3.2-vision's mllama is to Ollama 0.30+): choose another model, or an Ollama that runs it"
        ),
    ),
    (
        re.compile(
            r"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)", re.IGNORECASE
        ),
        "image and prompt take {0} tokens but the context holds {1}: raise --num-ctx to {2}",
    ),
    (
        re.compile(
            r"model requires more system memory \(([^)]*)\) than is available \(([^)]*)\)", re.IGNORECASE
        ),
        "the server has too little memory for the model ({0} needed, {1} free): choose a smaller model",
    ),
    # vLLM: "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens".
    (
        re.compile(r"maximum context length is (\d+) tokens", re.IGNORECASE),
        (
            "the model's context holds only {0} tokens, too few for image, prompt and --max-tokens: start "
            "vLLM with a longer --max-model-len, or lower --max-tokens"
        ),
    ),
    # llama-server started without the model's vision projector (tools/server/server.cpp).
    (
        re.compile(r"image input is not supported.*mmproj()", re.IGNORECASE | re.DOTALL),
        "the server was started without the model's vision projector: start llama-server with --mmproj FILE",
    ),
    # Ollama's MLX engine, the default on Apple Silicon since v0.40.0 (x/mlxrunner/client.go). It
    # takes num_ctx as a soft limit only: the hard one is the model's own maximum.
    (
        re.compile(
            r"input length \((\d+) tokens\) exceeds the model's maximum context length", re.IGNORECASE
        ),
        (
            "image and prompt take {0} tokens, more than the context Ollama's MLX engine allows: raise "
            "--num-ctx to {1} where it is lower; where it is not, the model's own maximum is the limit "
            "(MLX takes --num-ctx as a soft limit only): lower --max-size"
        ),
    ),
    # Qwen 3.8's chat template, a 500; reported gone with a larger context (ollama/ollama#17778, #17812).
    (
        re.compile(r"no user query found in messages()", re.IGNORECASE),
        (
            "the model's chat template finds no user turn in the request (as Qwen 3.8's can): "
            "update Ollama, or give the model a larger context (--num-ctx, or OLLAMA_CONTEXT_LENGTH on "
            "the server), which reportedly avoids it"
        ),
    ),
]

# A model that can think and answers nothing at all when told not to: gemma4 on Ollama's MLX
# engine, the default on Apple Silicon since v0.40.0, answers think:false with an empty content
# (ollama/ollama#17823, open). Of these architectures the first such answer is taken for the
# model's every answer; of another model, only answers that fail alike (FailureWatch).
SILENT_WITHOUT_THINKING = tuple(
    architecture for model in MODELS if model.silent_without_thinking for architecture in model.architectures
)
SILENT_WITHOUT_THINKING_CAUSE = (
    "the model returns nothing with thinking off (a known bug of Ollama's MLX engine with gemma4, "
    "ollama/ollama#17823)"
)


# Answers that are no caption, recognised by how they start, each with why it is refused.
REFUSED = "the model refused"
NOT_A_CAPTION = [
    (
        r"i'?m sorry|i am sorry|sorry\b|i apologi[sz]e\b",
        REFUSED,
    ),  # granite: "I apologize, but ..."
    (r"i cannot|i can'?t|i'?m (?:not able|unable)|i am (?:not able|unable)", REFUSED),
    (r"as an ai\b|unfortunately,? i\b", REFUSED),
    # moondream answers a caption prompt with a box: "[0.64, 0.50, 0.91, 0.88]" (ollama/ollama#6365)
    (r"\[\s*-?[\d.]+\s*(?:,\s*-?[\d.]+\s*){3}\]", "the model answered with box coordinates"),
]


@dataclass(frozen=True)
class Script:
    """A script an answer can drift into: its code points, and how long a run of it is a drift."""

    name: str
    ranges: tuple[tuple[int, int], ...]  # code points, first and last
    drift: int  # its letters in one run that make a drift rather than a quoted sign or name


# Qwen models drift into Chinese mid-caption (users of AThousandWords ask for a filter), and other
# models into other scripts. A run of letters of a script that neither the prompt nor the trigger
# words use is a drift once it holds `drift` of them: a clause of some five words (8 Chinese
# characters, each a syllable and often a word; 12 kana or Hangul, which spell words out syllable
# by syllable; 20 letters of an alphabet). A sign, a brand or a name that a caption quotes is one
# to four words: 拉面 is 2, 山田太郎 4, スターバックス 7, Ресторан 8. Scripts not listed (Latin
# among them) are never judged.
SCRIPTS = [
    Script(
        "Chinese characters (Han)",
        ((0x3005, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF)),
        8,
    ),
    Script("Japanese kana", ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F), (0x1B000, 0x1B16F)), 12),
    Script(
        "Korean Hangul",
        ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF), (0xFFA0, 0xFFDC)),
        12,
    ),
    Script("Cyrillic", ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)), 20),
    Script("Greek", ((0x0370, 0x03FF), (0x1F00, 0x1FFF)), 20),
    Script(
        "Arabic",
        ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
        20,
    ),
    Script("Hebrew", ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)), 20),
    Script("Thai", ((0x0E00, 0x0E7F),), 20),
    Script("Devanagari", ((0x0900, 0x097F), (0xA8E0, 0xA8FF)), 20),
]


@dataclass(frozen=True)
class Provider:
    """A hosted service's OpenAI-compatible API: how its base URL is recognised and what its
    chat completions take (the table "Hosted APIs" in docs/servers-and-models.md says the same).
    None of them could be reached from here: each row is the provider's documentation, read on
    the date given, and the behaviour built on it is tested against the tests' stand-in."""

    name: str  # the value of --provider
    title: str  # how messages name it
    host: str  # the base URL's host
    path: str  # the documented base URL's path, under which /models and /chat/completions are
    key_env: str  # where its key is read by default
    # The token limit's field: OpenAI's reasoning models refuse max_tokens (a 400 "Use
    # 'max_completion_tokens' instead"), and max_completion_tokens is what all its chat models take.
    limit_field: str
    # How thinking is set: "reasoning_effort": LEVEL, or "reasoning": {"effort": LEVEL}.
    effort_field: str
    thinking_off: str  # the effort that turns thinking off, or the lowest the provider has
    levels: dict  # --think-level: the provider's effort
    detail: bool  # takes image_url.detail (--detail)
    source: str


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider(
            "openai",
            "OpenAI",
            "api.openai.com",
            "/v1",
            "OPENAI_API_KEY",
            "max_completion_tokens",
            # reasoning_effort on reasoning models only: another model answers 400 "Unrecognized
            # request argument supplied: reasoning_effort" (adapted in the preflight). GPT-5 and
            # the o-series take minimal/low/medium/high, GPT-5.1 and later none/low/medium/high
            # and refuse "minimal" (the preflight sends the least the refusal lists instead).
            "reasoning_effort",
            "minimal",
            {"low": "low", "medium": "medium", "high": "high"},
            True,
            "platform.openai.com/docs/api-reference/chat/create and docs/guides/images-vision, read 2026-12-06",
        ),
        Provider(
            "gemini",
            "Gemini",
            "generativelanguage.googleapis.com",
            "/v1beta/openai",
            "GEMINI_API_KEY",
            "max_tokens",
            # reasoning_effort maps to a thinking budget; "none" turns thinking off.
            "reasoning_effort",
            "none",
            {"low": "low", "medium": "medium", "high": "high"},
            False,
            "ai.google.dev/gemini-api/docs/openai, read 2026-12-06",
        ),
        Provider(
            "openrouter",
            "OpenRouter",
            "openrouter.ai",
            "/api/v1",
            "OPENROUTER_API_KEY",
            "max_tokens",
            # reasoning: {effort}, one of xhigh/high/medium/low/minimal/none, for every model.
            "reasoning",
            "none",
            {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"},
            False,
            "openrouter.ai/docs/use-cases/reasoning-tokens and docs/api-reference, read 2026-12-06",
        ),
    )
}
IMAGE_DETAILS = ("low", "high", "auto")  # OpenAI's image_url.detail


# ---------------------------------------------------------------------------
# What goes wrong, and the libraries a run loads
# ---------------------------------------------------------------------------
# The one exception for what stops a run before it starts (CannotStart), the faults of one
# try at one image, and the imports only a run that sends images pays for.


class CannotStart(Exception):
    """The run cannot start: bad arguments, a missing folder or prompt, no server, a model that
    is not there or cannot see. Reported in one line, exit 2."""


class Fault(enum.Enum):
    """What went wrong with one try at one image: the retry policy (decide()) maps each to what
    happens next."""

    UNFIT_ANSWER = (
        "an answer unfit to train on: empty, a refusal, a loop, in a script the prompt is not written in, "
        "cut off at the token limit"
    )
    SERVER_BUSY = (
        '429 or 503: the server is busy, or still loading its model (llama-server\'s "Loading model")'
    )
    SERVER_STRUGGLING = "a 500 (runner crashed), an error mid-answer, an answer that broke off, a timeout"
    CONNECTION_BROKE = "the connection broke during the request"
    SERVER_DOWN = "the server refuses connections, or a proxy in front of it answers 502 or 504"
    MODEL_GONE = "the model is no longer on the server (404)"
    MODEL_UNUSABLE = (
        "the server cannot run the model as asked: an architecture it cannot load, a context too small "
        "for image and prompt, too little memory, no vision projector, a template that finds no user "
        "turn, a model known to answer nothing with thinking off"
    )
    FAILING_ALIKE = (
        "the server's answers so far all failed the same way, for one image after another, and none "
        "succeeded: the same error of its own, or the same answer unfit to train on"
    )
    ACCESS_DENIED = "the server (or a proxy) refuses us: 401 or 403"
    QUOTA_SPENT = "429 `insufficient_quota`: the account's quota or credit is spent"
    REQUEST_REFUSED = "a request the server will never accept: 400, 413, 422, an image it cannot decode"
    IMAGE_UNREADABLE = "the file cannot be read or decoded here"
    DISK_UNWRITABLE = "the disk is full, read-only or over quota"
    CAPTION_UNWRITABLE = "this one caption file cannot be written"
    WORKER_LOST = "with `--ray`: the worker the image was sent from was lost (its process or its node died)"


class TryFailed(Exception):
    """One try at one image went wrong, for `fault`; the message is the reason a user reads."""

    def __init__(
        self, fault: Fault, reason: str, pause: float = 0.0, status: int = 0, cause: str = ""
    ) -> None:
        super().__init__(redacted(reason))  # a reason often quotes the server
        self.fault = fault
        self.pause = pause  # seconds the server asked us to wait (Retry-After) before asking again
        self.status = status  # the server's HTTP status, where it answered with one
        # What stood in the way of a connection when it was more than that nothing listened: a
        # proxy, a TLS handshake, a name that does not resolve.
        self.cause = redacted(cause)
        # The answer this try was paid for, where one came (an answer unfit to train on, a
        # content filter's refusal): its tokens count toward the run's cost all the same.
        self.spent: Answer | None = None

    def __reduce__(self) -> tuple:
        # Pickled whole (a --ray worker hands it back): an exception pickles its args alone.
        return (TryFailed, (self.fault, str(self), self.pause, self.status, self.cause), self.__dict__)


def import_run_libraries() -> None:
    """Import what only a run that sends images needs: the ollama client (with httpx and
    pydantic: 0.19 s of a 0.25 s start, measured here) and Pillow. An invocation with nothing
    to caption, as most of a shell loop's over captioned folders are, never pays for them."""
    with IMPORTING:
        if UnidentifiedImageError is None:
            import_them()


def import_them() -> None:
    global httpx, ollama, Image, UnidentifiedImageError
    # The ollama package builds a default Client as it is imported (ollama/__init__.py), which
    # parses OLLAMA_HOST and the proxy variables (httpx reads them as a client is made) and
    # raises on a malformed one, or on a SOCKS proxy without httpx's SOCKS support; this tool
    # reads them itself (server_url(), proxy_for()), so the import must not see them. That client's
    # transport also reads the trusted certificates (SSL_CERT_FILE's, else certifi's) for a client
    # this tool never sends through: pointed at a certificate directory (read lazily, as each
    # certificate is needed), it reads none. Importing these libraries then took 0.19 s of CPU
    # instead of 0.33 s (httpx 0.29, Debian's bundle in SSL_CERT_FILE; certifi's alone is 45 ms).
    # The run's own clients read the certificates in trusted_certificates(), after the import.
    hidden = {
        name: os.environ.pop(name, None)
        for name in list(os.environ)
        if name in ("OLLAMA_HOST", "SSL_CERT_FILE", "SSL_CERT_DIR") or name.lower().endswith("_proxy")
    }
    os.environ["SSL_CERT_DIR"] = os.devnull
    try:
        import httpx
        import ollama
        from PIL import Image, UnidentifiedImageError
    except ImportError as missing:  # a user can cause this, so no traceback
        raise CannotStart(f"{missing.name} is not installed; run: pip install -r requirements.txt") from None
    finally:
        del os.environ["SSL_CERT_DIR"]
        os.environ.update({name: value for name, value in hidden.items() if value is not None})
    read_png_metadata_of_any_size()


# ---------------------------------------------------------------------------
# Configuration: the settings of a run
# ---------------------------------------------------------------------------
# What a run is asked to do (Config), and the templates its prompt, --prefix and --suffix are;
# the command line (at the end) fills it in, a library caller fills it in itself.


class Template:
    """The prompt file's text, parsed once: {name} {folder} {class} {existing} are filled in for
    each image, {caption:EXT} by the image's caption of the style EXT (see Style), {{ and }}
    are literal braces."""

    def __init__(self, text: str, source: str = "the prompt", as_read: str | None = None) -> None:
        # An unknown placeholder silently filled with nothing would change every caption of the
        # run (taggui drops unknown {vars} without a word), so it stops the run instead.
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise CannotStart(f"{source}: {exc}; write {{{{ or }}}} for a literal brace") from None
        self.text = text
        # The prompt file's text before its line ends were made "\n": what earlier versions sent,
        # and so what the passes they recorded are known by.
        self.as_read = text if as_read is None else as_read
        self.source = source
        self.fields = {name for _, name, _, _ in parsed if name is not None}
        # {caption:.tags}: the extensions of the captions it asks for, in the order it asks.
        self.captions = list(dict.fromkeys(spec for _, name, spec, _ in parsed if name == "caption"))
        for _, name, spec, conversion in parsed:
            if name == "caption" and not conversion and spec and spec.startswith(".") and "{" not in spec:
                continue
            if name == "caption":
                raise CannotStart(
                    f"{source}: write {{caption:EXT}} with the extension of a style's captions, "
                    "such as {caption:.tags}"
                )
            if name is not None and name not in PLACEHOLDERS:
                known = ", ".join(f"{{{known}}}" for known in PLACEHOLDERS) + ", {caption:EXT}"
                raise CannotStart(
                    f"{source} asks for {{{name}}}, which is not one of {known}; "
                    "write {{ or }} for a literal brace"
                )
            if name is not None and (spec or conversion):
                raise CannotStart(f"{source}: write {{{name}}} alone, without a conversion or a format")

    def fill(self, image: str | Path, existing: str, captions: dict[str, str] | None = None) -> str:
        """The text for one image; captions: its caption in each style the template asks for."""
        if not self.fields:
            return self.text.replace("{{", "{").replace("}}", "}")
        folder = folder_name(os.path.dirname(image))
        return self.text.format(
            name=readable_name(os.path.splitext(os.path.basename(image))[0]),
            folder=folder,
            # Kohya's folder convention "15_guideboat": 15 repeats of the class "guideboat".
            **{"class": re.sub(r"^\d+_(?=.)", "", folder)},
            existing=existing,
            caption=CaptionsOf(captions or {}),
        )


class CaptionsOf:
    """{caption:EXT} as str.format() fills it in: the format spec is the style's extension."""

    def __init__(self, captions: dict[str, str]) -> None:
        self.captions = captions

    def __format__(self, ext: str) -> str:
        return self.captions.get(ext, "")


class Style(NamedTuple):
    """--also PROMPT_FILE:EXT: a second caption of every image, in a file of its own extension,
    asked with its own prompt. Each style is a pass of its own (see RunPass)."""

    prompt: Template
    ext: str


@functools.lru_cache(maxsize=256)
def folder_name(path: str) -> str:
    # The folder's own name, whatever path named it: "." or ".." has no name of its own, and
    # Kohya's "15_guideboat" must give {class} from `cd 15_guideboat && ... .` too.
    return readable_name(os.path.basename(os.path.abspath(path)))


def readable_name(name: str) -> str:
    # A name that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates,
    # which no JSON encoder sends: the model gets U+FFFD in their place.
    return os.fsencode(name).decode("utf-8", "replace")


@dataclass
class Config:
    folders: list[Path]
    prompt: Template
    folder_prompt: str = ""  # a file of this name in a folder is the prompt for its images
    announce_prompt: bool = False  # say which file is the prompt: it came as DIR PROMPT_FILE
    model: str = DEFAULT_MODEL  # "" with --api openai: the one model the server serves
    api: str = "ollama"  # or "openai": POST /v1/chat/completions
    api_key: str = field(default="", repr=False)  # sent as a bearer token to an OpenAI-compatible server
    hosts: list[str] = field(default_factory=lambda: [DEFAULT_HOST])
    jobs: int = 2
    keep_alive: str | float = DEFAULT_KEEP_ALIVE
    timeout: float = 600.0
    max_size: int = 1344
    caption_ext: str = ".txt"
    existing: str = "skip"
    # --only without --existing: each image is redone in the mode of the pass that wrote its
    # caption (an append pass's redo list stays an append), else overwritten.
    redo_in_its_mode: bool = False
    overwrite_edits: bool = False  # captions edited since the tool wrote them are no longer left alone
    fresh: bool = False
    recursive: bool = False
    pull: bool = False
    dry_run: bool = False
    limit: int | None = None
    prefix: Template = field(default_factory=lambda: Template(""))
    suffix: Template = field(default_factory=lambda: Template(""))
    raw: bool = False
    any_script: bool = False  # accept answers in scripts neither the prompt nor the trigger words use
    retries: int = 3
    wait_server: float = 300.0
    rpm: float = 0.0  # --rpm: requests a minute each server may be sent (0: as many as it takes)
    tpm: int = 0  # --tpm: tokens a minute, each request counted as --max-tokens + PROMPT_TOKENS_GUESS
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    think: bool = False
    think_level: str = ""  # one of THINK_LEVELS, asked of a model that thinks at levels; "" lets it choose
    num_ctx: int = DEFAULT_NUM_CTX
    # --option: the server's own options (Ollama's) or request fields (OpenAI-compatible), in its
    # own words, sent as given; {} unless given.
    model_options: dict = field(default_factory=dict)
    system: Template = field(default_factory=lambda: Template(""))  # --system: the system message
    # The hosted service (a key of PROVIDERS) the OpenAI-compatible servers are, or "": a server of
    # the user's own, sent today's request.
    provider: str = ""
    detail: str = ""  # --detail: OpenAI's image_url.detail, "" unless given
    jsonl: Path | None = None
    review: Path | None = None  # the review page to write
    only: frozenset[str] | None = None  # --only: the real paths of the images to caption, and no others
    failed_list: Path | None = None
    # --price: (input, output) per million tokens, as providers publish their prices; None: no
    # cost is shown. --max-cost: what the run may spend at those prices. Neither changes a
    # caption, so neither enters caption_settings().
    price: tuple[float, float] | None = None
    max_cost: float | None = None
    also: list[Style] = field(default_factory=list)  # --also: the styles besides the main caption
    # --join: what joins an answer to the caption it is added to (append, prepend). With a line
    # break each line is a caption of its own (OneTrainer reads one caption per line).
    join: str = ", "
    ray: str = ""  # --ray: the Ray cluster whose workers prepare and send ("": this process does)

    def options(self) -> dict:
        """Sampling and load options, the same on every request: a changed load-time option
        makes Ollama reload the model (server/sched.go, needsReload)."""
        chosen = {"temperature": self.temperature, "seed": self.seed}
        present = {key: value for key, value in chosen.items() if value is not None}
        return {"num_ctx": self.num_ctx, "num_predict": self.max_tokens, **present}

    def caption_settings(self) -> dict:
        """The settings that change a caption, but for those the journal records with each caption
        (the image's prompt, the model, the mode). A setting added later enters only when it is
        not at its default, so an upgrade alone never starts a new pass."""
        settings = {
            "options": self.options(),
            "think": self.think,
            "max_size": self.max_size,
            "raw": self.raw,
            "prefix": self.prefix.text,
            "suffix": self.suffix.text,
            "caption_ext": self.caption_ext,
        }
        if self.folder_prompt:
            settings["folder_prompt"] = self.folder_prompt
        if self.think_level:
            settings["think_level"] = self.think_level
        if self.model_options:
            settings["model_options"] = self.model_options
        if self.system.text:
            settings["system"] = self.system.text
        if self.detail:
            settings["detail"] = self.detail
        if self.join != Config.join:
            settings["join"] = self.join
        return settings

    @property
    def line_per_caption(self) -> bool:
        """--join with a line break: each line of a caption file is a caption of its own."""
        return "\n" in self.join

    def styles(self) -> list[Config]:
        """The run's passes: its main caption, then a Config per --also style (its prompt and
        extension in place of --prompt and --ext). A style is the same pass whether it came as
        --also or as --prompt and --ext, so a style can be redone alone. --folder-prompt is the
        main caption's only."""
        return [self] + [
            replace(self, prompt=style.prompt, caption_ext=style.ext, folder_prompt="", also=[])
            for style in self.also
        ]

    def style(self, index: int) -> Config:
        return self if index == 0 else self.styles()[index]

    def settings_digest(self) -> str:
        """A pass is these settings, with the prompt, the model and the mode of each caption."""
        return digest(json.dumps(self.caption_settings(), sort_keys=True))

    def pass_identity(self, mode: str, model: str) -> str:
        """The pass as journals before version 2 named it in their first line (47ddee3 and
        earlier): a journal of theirs still counts after an upgrade."""
        settings = {
            "prompt": self.prompt.as_read,
            "model": model,
            "existing": mode,
            **self.caption_settings(),
        }
        return digest(json.dumps(settings, sort_keys=True))


def asking_order(prompt: Template, config: Config) -> list[int]:
    """The run's styles (indexes into Config.styles(), with prompt as the main caption's), in
    the order an image's requests are sent: each after those whose {caption:EXT} it asks for.
    CannotStart for an extension no style writes, or styles that ask for each other."""
    exts = [style.caption_ext for style in config.styles()]
    prompts = [prompt] + [style.prompt for style in config.also]
    for each in prompts:
        unknown = [ext for ext in each.captions if ext not in exts]
        if unknown:
            raise CannotStart(
                f"{each.source} asks for {{caption:{unknown[0]}}}, but no style of the run writes "
                f"{unknown[0]} captions (the run's: {', '.join(exts)})"
            )
    order: list[int] = []

    def after_what_it_needs(index: int, asking: list[int]) -> None:
        if index in order:
            return
        if index in asking:
            cycle = " -> ".join(exts[each] for each in [*asking[asking.index(index) :], index])
            raise CannotStart(f"the styles ask for each other's captions ({cycle}): no order can ask them")
        for ext in prompts[index].captions:
            after_what_it_needs(exts.index(ext), [*asking, index])
        order.append(index)

    for index in range(len(prompts)):
        after_what_it_needs(index, [])
    return order


# ---------------------------------------------------------------------------
# The run: claim the folders, find and plan the images, check the servers, caption, write
# ---------------------------------------------------------------------------
# caption_folders() tells a run's story in the order of the sections below; the summary
# and the exit code come from here.


@dataclass
class FolderCount:
    captioned: int = 0
    skipped: int = 0
    left_alone: int = 0
    failed: int = 0


@dataclass
class Summary:
    to_caption: int = 0  # captions planned so far (an image's in each style: at most --limit images)
    images_planned: int = 0  # the images of to_caption: what --limit counts
    listed: bool = False  # every folder is listed and planned: to_caption is final
    captioned: int = 0
    skipped: int = 0  # already captioned, or done by this pass before
    left_alone: int = 0  # edited by a person since the tool wrote them
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image or caption file, why)
    settled: int = 0  # images of to_caption captioned or failed; the rest is left for a rerun
    only_found: set[str] = field(default_factory=set)  # the --only entries found so far
    # --only entries with captions planned and not ended (by how many), each with what names
    # such a caption (see entries_kept()): a run that ends before them keeps them in
    # --failed-list, or a redo loop by one list would lose them.
    only_open: Counter[tuple[str, str]] = field(default_factory=Counter)
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # folders not captioned, and why
    orphans: list[Path] = field(default_factory=list)  # caption files without an image, left alone
    by_folder: dict[Path, FolderCount] = field(default_factory=dict)  # per folder given
    by_style: dict[str, FolderCount] = field(default_factory=dict)  # per style (--also), by extension
    by_server: dict[str, int] = field(default_factory=dict)  # captions each server wrote
    server_trouble: list[str] = field(default_factory=list)  # servers lost, dead or silent, and why
    one_at_a_time: list[tuple[str, int]] = field(default_factory=list)  # (server, --jobs) found so
    # (server, what set its pace, seconds work with a free slot waited for it) of each server
    # whose rate limit, not its speed, held requests back.
    paced: list[tuple[str, str, float]] = field(default_factory=list)
    stopped: str = ""  # why the run ended before its last image
    output_errors: list[str] = field(default_factory=list)  # --jsonl, --review, --failed-list unwritten
    interrupted: bool = False
    dry_run: bool = False
    limit: int | None = None  # --limit: once reached, the total is known before the listing ends
    seconds: float = 0.0
    tokens: int = 0  # generated, as the servers counted them
    generation_ns: int = 0
    words: int = 0  # in the captions written
    lines: int = 0  # captions in the files written: one a file, or with --join "\n" one a line
    over_clip_limit: int = 0  # captions estimated longer than CLIP's 77 tokens
    thought: bool = False  # some answers came with thinking, counted in the tokens
    # What the servers were paid for, every try and the preflight's picture included, as their
    # answers counted it (usage, prompt_eval_count and eval_count); reasoning is part of output.
    price: tuple[float, float] | None = None  # --price
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    most_prompt_tokens: int = 0  # the largest prompt an answer reported: the reserve for the next
    preflight_cost: float = 0.0  # of the probe pictures: paid once, not per image
    answers_paid: int = 0  # answers to images (not the probe), each try's
    estimated_answers: int = 0  # answers that said no token count, with --price counted at an estimate
    # --dry-run --price: the input tokens estimated for the images planned (estimated_tokens_of()),
    # and how many could not be opened to be estimated.
    estimated_prompt_tokens: int = 0
    not_estimated: int = 0

    @property
    def left(self) -> int:
        return 0 if self.dry_run else self.to_caption - self.settled

    @property
    def exit_code(self) -> int:
        trouble = self.failed or self.left_out or self.stopped or self.output_errors or self.left
        trouble = trouble or not (self.listed or self.dry_run)
        return EXIT_SOME_FAILED if trouble else EXIT_OK

    @property
    def cost(self) -> float:
        return self.cost_of(self.prompt_tokens, self.output_tokens)

    def cost_of(self, prompt_tokens: int, output_tokens: int) -> float:
        """At --price (per million tokens, input and output); 0 without it."""
        price_in, price_out = self.price or (0.0, 0.0)
        return (prompt_tokens * price_in + output_tokens * price_out) / 1e6

    def estimated_total_cost(self) -> float | None:
        """What the whole run will cost, each image left at what an answer cost so far (answers
        are paid as they come, before their images are written); None before the total is
        known or an answer came."""
        if not (self.total_known and self.answers_paid):
            return None
        per_answer = (self.cost - self.preflight_cost) / self.answers_paid
        return self.cost + per_answer * max(0, self.to_caption - self.answers_paid)

    @property
    def total_known(self) -> bool:
        return self.listed or (self.limit is not None and self.images_planned >= self.limit)

    def folder(self, root: Path) -> FolderCount:
        return self.by_folder.setdefault(root, FolderCount())

    # The one place images are counted: as planning decides them, and as each one planned ends.

    def image_planned(self, times: int = 1) -> None:
        """To caption (times -1: planned again, when the server named its model)."""
        self.to_caption += times

    def image_settled(self) -> None:
        """One planned image ended, captioned or failed (the rest is left for a rerun)."""
        self.settled += 1

    def only_planned(self, entries: set[tuple[str, str]], times: int = 1) -> None:
        """A caption --only names (by these entries) planned (times -1: ended, or planned again)."""
        self.only_open.update(dict.fromkeys(entries, times))

    def only_unfinished(self, only: set[str]) -> list[str]:
        """The --only entries the run left: not reached, or with captions not ended (an entry
        whose captions ended in some styles only, by the caption files of the others)."""
        left = set() if self.listed else only - self.only_found
        by_entry: dict[str, list[tuple[str, int]]] = {}
        for (entry, kept), times in self.only_open.items():
            by_entry.setdefault(entry, []).append((kept, times))
        for entry, captions in by_entry.items():
            open_ones = {kept for kept, times in captions if times > 0}
            left |= {entry} if len(open_ones) == len(captions) else open_ones
        return sorted(left, key=path_order)

    def style(self, ext: str) -> FolderCount:
        """The counts of one style (by_style holds them only in a run with --also)."""
        return self.by_style.setdefault(ext, FolderCount()) if self.by_style else FolderCount()

    def image_kept(self, root: Path, left_alone: bool, times: int = 1, ext: str = "") -> None:
        """Its caption stays: done before, or (left_alone) edited by a person since."""
        if left_alone:
            self.left_alone += times
            self.folder(root).left_alone += times
            self.style(ext).left_alone += times
        else:
            self.skipped += times
            self.folder(root).skipped += times
            self.style(ext).skipped += times

    def image_failed(self, root: Path, image: str, why: str, ext: str = "") -> None:
        """image: the image, or in a run with styles the caption file of the style that failed."""
        self.failed.append((image, why))
        self.folder(root).failed += 1
        self.style(ext).failed += 1

    def image_captioned(
        self, root: Path, server: str, answer: Answer, text: str, config: Config | None = None
    ) -> None:
        self.captioned += 1
        self.folder(root).captioned += 1
        self.style(config.caption_ext if config else "").captioned += 1
        self.by_server[server] = self.by_server.get(server, 0) + 1
        self.tokens += answer.tokens
        self.generation_ns += answer.generation_ns
        # With a line break joining captions, each line is a caption, and CLIP reads each alone.
        for caption in captions_in(text, config):
            self.lines += 1
            self.words += len(caption.split())
            self.over_clip_limit += estimated_clip_tokens(caption) > CLIP_TOKENS
        self.thought = self.thought or answer.thought

    def image_estimated(self, prompt_tokens: int | None) -> None:
        """A dry run's estimate of one image's input tokens; None: it could not be opened."""
        if prompt_tokens is None:
            self.not_estimated += 1
        else:
            self.estimated_prompt_tokens += prompt_tokens

    def estimated_cost(self) -> tuple[int, int, float]:
        """A dry run's estimate: input tokens, output tokens (EXPECTED_CAPTION_TOKENS a caption),
        and their cost at --price."""
        output = EXPECTED_CAPTION_TOKENS * (self.to_caption - self.not_estimated)
        return self.estimated_prompt_tokens, output, self.cost_of(self.estimated_prompt_tokens, output)

    def answer_paid(
        self, answer: Answer, preflight: bool = False, estimated: tuple[int, int] | None = None
    ) -> None:
        """An answer came, fit to train on or not (the preflight's picture too): its tokens are
        paid for. estimated: (input, output) in place of the counts of an answer that said none."""
        prompt_tokens, output_tokens = estimated or (answer.prompt_tokens, answer.tokens)
        self.estimated_answers += estimated is not None
        if preflight:
            self.preflight_cost += self.cost_of(prompt_tokens, output_tokens)
        else:
            self.answers_paid += 1
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.reasoning_tokens += answer.reasoning_tokens
        self.most_prompt_tokens = max(self.most_prompt_tokens, prompt_tokens)


class Stop:
    """How a run is asked to end early, from any thread: asked once, it sends nothing more and
    writes the answers already on their way; asked again, it waits for them no longer."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.hurried = threading.Event()

    def ask(self) -> None:
        (self.hurried if self.asked.is_set() else self.asked).set()


def caption_folders(config: Config, reporter: Reporter | None = None, stop: Stop | None = None) -> Summary:
    """Caption the images of config.folders and return what happened.

    Raises CannotStart if the run cannot start; `stop` ends it early (see Stop).
    """
    reporter = reporter or Reporter()
    reporter.name_relative_to(config.folders)
    stop = stop or Stop()
    started = time.monotonic()
    summary = Summary(dry_run=config.dry_run, limit=config.limit, price=config.price)
    summary.by_folder = {root: FolderCount() for root in config.folders}
    if config.also:
        summary.by_style = {style.caption_ext: FolderCount() for style in config.styles()}
    if config.announce_prompt:
        reporter.prompt_taken(config.prompt.source)
    review = Review(config.review, config) if config.review else None
    with ExitStack() as run:
        # A dry run only reads: it needs no lock.
        unwritable = (
            {}
            if config.dry_run
            else {root: run.enter_context(folder_lock(root, config.recursive)) for root in config.folders}
        )
        metadata = Metadata(config.jsonl, config.model, config.caption_ext) if config.jsonl else None
        discovery = Discovery(config, summary, reporter, metadata, unwritable, review)
        run.callback(discovery.close)
        try:
            if config.dry_run:
                discovery.list_all(stop)
                reporter.dry_run_done(summary)
            else:
                caption_what_is_planned(config, discovery, summary, reporter, stop, metadata, review)
        finally:
            summary.seconds = time.monotonic() - started
            save_metadata(metadata, summary)
        write_review_and_lists(config, review, summary, reporter, stop)
    return summary


def caption_what_is_planned(
    config: Config,
    discovery: Discovery,
    summary: Summary,
    reporter: Reporter,
    stop: Stop,
    metadata: Metadata | None,
    review: Review | None,
) -> None:
    """Send the images discovery plans, as it plans them, and write their captions."""
    discovery.until_something_to_send(stop)
    if not discovery.waiting or stop.asked.is_set():  # nothing to send: no server needed
        summary.interrupted = stop.asked.is_set()
        return
    cluster = Cluster(config, reporter, stop) if config.ray else None
    try:
        servers = ready_servers(config, reporter, stop, cluster)
    except BaseException:
        if cluster:
            cluster.close()
        raise
    if not config.model:  # --api openai without --model: the one model the servers serve
        config = replace(config, model=next(server.model for server in servers if server.in_rotation))
        discovery.model_known(config.model)
        metadata = metadata and metadata.for_model(config.model)
        review = review and review.for_model(config.model)
    for server in servers:
        if server.api.probe_answer:  # the preflight's picture is paid for too
            summary.answer_paid(server.api.probe_answer, preflight=True)
    if cluster:
        cluster.use(servers)
    writer = Writer()
    pipeline = Pipeline(discovery, writer, servers, config, stop, reporter, summary, cluster)
    try:
        reporter.start(summary)
        for outcome in pipeline.outcomes():
            account_for(outcome, config, summary, reporter, metadata, review)
        summary.stopped = pipeline.stopped_because(summary)
        summary.interrupted = stop.asked.is_set()
    finally:
        pipeline.close()
        writer.close()
        summary.server_trouble += [server.report() for server in servers if server.report()]
        summary.one_at_a_time += [(server.url, server.jobs) for server in servers if server.turns.told]
        summary.paced += [
            (server.url, server.pacer.told, server.pacer.waited) for server in servers if server.pacer.told
        ]
        for server in servers:
            server.close()


def write_review_and_lists(
    config: Config, review: Review | None, summary: Summary, reporter: Reporter, stop: Stop
) -> None:
    if review and output_written(review.page, lambda: review.write(summary, stop), summary):
        reporter.review_written(review.page)
        summary.output_errors += [review.broken] if review.broken else []
    if config.failed_list:
        failed = [image for image, _ in summary.failed]
        named = {os.path.realpath(image) for image in failed}
        left = [  # what --only's list names and the run did not finish stays in it
            entry for entry in summary.only_unfinished(config.only or set()) if str(entry) not in named
        ]
        what = "images that failed" + (" or were not reached" if left else "")
        output_written(
            config.failed_list, lambda: write_image_list(config.failed_list, failed + left, what), summary
        )


def account_for(
    outcome: Outcome,
    config: Config,
    summary: Summary,
    reporter: Reporter,
    metadata: Metadata | None,
    review: Review | None,
) -> None:
    """Account for the end of an image that was planned: counted (by the summary), reported,
    and kept in the JSONL and on the review page."""
    summary.image_settled()
    task = outcome.task
    if config.only is not None:
        summary.only_planned(entries_kept(str(task.image), task.style, config), times=-1)
    style = config.style(task.style)
    ext = style.caption_ext
    if review:
        review.settled(outcome, ext)
    if outcome.failure:
        summary.image_failed(task.root, task.named or task.image, outcome.failure, ext)
        reporter.image_failed(task.named or task.image, outcome.failure)
        return
    if outcome.answer.thought and not (config.think or outcome.answer.thinking_asked or summary.thought):
        reporter.thinks_anyway(config.model)
    summary.image_captioned(task.root, outcome.server, outcome.answer, outcome.text, style)
    reporter.image_captioned(task.named or task.image, outcome.text, outcome.seconds)
    if metadata and task.style:
        metadata.add_style(task.image, style_column(ext, task.style), outcome.text)
        metadata.save_now_and_then(reporter)
    elif metadata:
        answer = outcome.answer
        # "tokens" (output, reasoning included) came first; the others beside it, cost with --price.
        paid = {"prompt_tokens": answer.prompt_tokens, "reasoning_tokens": answer.reasoning_tokens}
        if config.price:
            paid["cost"] = round(summary.cost_of(answer.prompt_tokens, answer.tokens), 8)
        metadata.add(
            task.image, outcome.text, seconds=round(outcome.seconds, 2), tokens=answer.tokens, **paid
        )
        metadata.save_now_and_then(reporter)


def left_for_a_rerun(summary: Summary) -> str:
    # A run that ends early does not plan the rest: planning reads every caption file, and a
    # Ctrl-C must not wait for a listing of 100,000 files.
    unplanned = "" if summary.listed else " and the images not yet planned"
    # With styles (--also), what a run plans and leaves is an image's caption in each style.
    return f"{counted(summary.left, 'caption' if summary.by_style else 'image')}{unplanned} left for a rerun"


def save_metadata(metadata: Metadata | None, summary: Summary) -> None:
    if metadata and not summary.dry_run:  # a dry run only reads
        output_written(metadata.path, metadata.save, summary)


def output_written(path: Path, write: Callable[[], None], summary: Summary) -> bool:
    """Write one of the run's outputs besides the captions (JSONL, review page, failed list);
    whether it was. One that cannot be written is said in the summary and makes the exit code 1."""
    try:
        write()
    except OSError as exc:
        summary.output_errors.append(f"cannot write {path}: {reason_of(exc)}")
        return False
    return True


# ---------------------------------------------------------------------------
# Claiming the folders: one run at a time in each
# ---------------------------------------------------------------------------
# The folder lock, taken before anything is read, so two runs never plan from the same
# state; it dies with its process.


LOCK_NAME = f"{OWN_FILE_PREFIX}.lock"
# Where the operating system has it, a lock or journal that is a link is refused rather than
# followed: a link in a downloaded dataset must not make the tool write outside it.
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextmanager
def folder_lock(folder: Path, recursive: bool) -> Iterator[str]:
    """One run at a time in a folder (and, for a run with subfolders, below it): a second one,
    started by a double-started loop, refuses and names the first. The lock is the operating
    system's (flock, or msvcrt on Windows), so it dies with the process that held it, however
    that process ended. Yields "" once the folder is this run's, or why nothing can be written
    in it (read-only, full): a run with nothing to do may still end well."""
    refuse_if_held_above(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CannotStart(f"{path} is in the way: it is a link; remove it") from None
            yield reason_of(exc)
            return
        with open(descriptor, "r+b", buffering=0) as file:  # closing it releases the lock
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise CannotStart(f"{path} is in the way: it is not a file of this tool's; remove it")
            try:
                lock_file(file)
            except OSError:
                raise CannotStart(
                    f"another run is captioning {folder} ({holder_of(file)}); wait for it to end, or stop it"
                ) from None
            if not is_still_at(descriptor, path):
                continue  # locked a file the run before us had just removed: lock the new one
            try:  # who holds it, for the message of a run refused
                file.truncate(0)  # a killed run's line may still be there
                file.write(holder_line(recursive).encode())
                unwritable = ""
            except OSError as exc:  # a full disk: no caption could be written either
                unwritable = reason_of(exc)
            try:
                yield unwritable
            finally:
                # Removed while still held, so that finished folders carry no trace of it.
                try:
                    os.unlink(path)
                except OSError:
                    pass
            return


def holder_line(recursive: bool) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()}, started {started}" + (", with its subfolders" if recursive else "")


def holder_of(file: io.RawIOBase) -> str:
    try:
        file.seek(0)
        return file.read(200).decode("utf-8", "replace").strip() or "another process"
    except OSError:  # Windows does not let others read a locked byte
        return "another process"


def held_by_another_run(path: Path) -> str:
    """Who holds the lock file at path, or "" if nobody does (or there is none)."""
    try:
        descriptor = os.open(path, os.O_RDWR | NO_FOLLOW)
    except OSError:
        return ""
    with open(descriptor, "r+b", buffering=0) as file:
        try:
            lock_file(file)
        except OSError:
            return holder_of(file)
        return ""  # closing releases what was only a test


def refuse_if_held_above(folder: Path) -> None:
    """A run over a parent folder with its subfolders is captioning this one too."""
    for parent in folder.resolve().parents:
        holder = held_by_another_run(parent / LOCK_NAME)
        if holder.endswith("with its subfolders"):
            raise CannotStart(
                f"another run is captioning {parent} ({holder}); wait for it to end, or stop it"
            )


def is_still_at(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def lock_file(file: io.BufferedRandom) -> None:
    """Lock an open file without waiting; OSError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------
# The journal: what earlier runs wrote, and who changed it since
# ---------------------------------------------------------------------------
# One journal per folder, read by planning (skip, redo, leave alone) and written with
# each caption; version 1 journals of earlier versions are still honoured.


JOURNAL_NAME = f"{OWN_FILE_PREFIX}.journal"
JOURNAL_HEADER = json.dumps({"journal": 2})
MERGING = ("append", "prepend")
# The mode of a journal line that records a person's text, applied with --apply-edits: the text it
# leaves is a person's, as an edit made by hand is (origin_of()).
PERSON_EDIT = "edit"
EDITED_SINCE = (
    "edited since this pass wrote it, so what the pass added cannot be told from the edit; "
    "redo it with --existing overwrite, or edit it by hand"
)


class Written(NamedTuple):
    """One caption the tool wrote, as its journal line records it."""

    settings: str  # Config.settings_digest(); "v1:<pass>" for a pass of a version 1 journal not this run's
    mode: str
    model: str  # "" where a version 1 journal did not know it (--api openai without --model)
    prompt: str  # digest of the prompt that held for the image
    before: str  # text_digest() of the caption before the write ("" where unknown: version 1)
    after: str  # text_digest() of the text written
    kept: tuple[int, int] | None  # where the text before stands in the text written (append, prepend)
    origin: str  # who wrote the text before: "none" (blank), "tool", "person", "original"
    line: int  # its line in the journal: a later line is a later write
    landed: bool = False  # a second line says the caption was written


class RunPass(NamedTuple):
    """This run's pass, as journal lines are compared with it."""

    settings: str
    model: str  # "" until the server says which model it serves
    fresh: bool  # --fresh: the pass's earlier writes do not count
    legacy: dict[str, tuple[str, str]]  # a version 1 journal's first line: the (mode, model) it means
    prompt: tuple[str, str]  # the run's prompt: its digest as version 1 took it (line ends as read), and now
    # The extension of the captions this pass writes, and the one whose lines name none: lines
    # written before styles (--also) existed are the main caption's.
    ext: str = Config.caption_ext
    unnamed_ext: str = Config.caption_ext

    @classmethod
    def of(cls, config: Config, main: Config | None = None) -> RunPass:
        """config's pass; main: the run's main caption's Config, where config is a style's."""
        models = {config.model, ""}  # a version 1 run without --model recorded ""
        legacy = {
            config.pass_identity(mode, model): (mode, model)
            for mode in ("skip", "overwrite", "append", "prepend")
            for model in models
        }
        prompt = (digest(config.prompt.as_read), digest(config.prompt.text))
        unnamed = (main or config).caption_ext
        return cls(
            config.settings_digest(), config.model, config.fresh, legacy, prompt, config.caption_ext, unnamed
        )


class Journal:
    """Every caption the tool wrote in one folder, hidden in it (.llava-caption-ollama.journal):
    a JSON line per caption, with its pass (the settings, the model and the mode), a digest of
    the prompt, and digests of the caption's text before and after. From them planning tells
    whether this pass's answer is already in a caption, and whether someone changed a caption
    since the tool wrote it (see verdict()).

    The line is written before the caption file, and a short second line once the caption is in
    place. A crash between the two leaves a line without its second: if the file still holds
    the text before, the write counts as never made; a person who puts back the text before a
    write that did land has edited the caption. Each folder that holds images keeps its own
    journal, so a pass is the same whether its folders were named one by one or found by
    --recursive. Journals of version 1 (one pass per folder given, its images named by their
    path below it) are read, and rewritten in this form before a line is added.

    Each style of a run (--also) is a pass with a Journal of its own on the same file: a line
    names the extension of the caption it wrote ("x"), and each reads only its own lines. The
    main caption's Journal (owner) opens the file and writes every line."""

    def __init__(self, folder: str, run: RunPass, owner: Journal | None = None) -> None:
        self.path = os.path.join(folder, JOURNAL_NAME)
        self.run = run
        self.owner = owner or self
        self.others: list[str] = []  # the lines of other styles' captions, kept as they are
        self.records: dict[str, list[Written]] = {}
        self.fresh_from: dict[tuple[str, str, str], int] = {}  # a pass: its first line that counts
        self.lines = 0
        self.version = 0  # 0: none, or none this version reads (it is written anew)
        self.loaded = False
        self.descriptor: int | None = None
        self.unwritable = ""  # why it cannot be opened for writing, once tried
        self.opening = threading.Lock()  # captions are written on several threads
        self.freshened: set[str] = set()  # with --fresh: modes whose fresh start is written

    def load(self) -> Journal:
        if self.loaded:
            return self
        self.loaded = True
        try:
            # Split on "\n" alone: every line is JSON with its other line breaks escaped.
            lines = read_regular_file(Path(self.path)).decode("utf-8", "replace").split("\n")
        except OSError:
            return self
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if isinstance(header, dict) and isinstance(header.get("pass"), str):
            self.version = 1
            self.read_version_1(header["pass"], lines[1:])
            return self
        self.version = 2 if lines[0] == JOURNAL_HEADER else 0
        # A first line damaged (or a journal of no known form): what can be read of the rest still
        # counts, and the journal is written anew with it before a line is added.
        for line in lines[1:] if self.version else lines:
            self.read_line(line)
        return self

    def read_version_1(self, identity: str, lines: list[str]) -> None:
        if self.run.ext != self.run.unnamed_ext:
            return  # a style's: version 1 knew only the main caption
        mode, model = self.run.legacy.get(identity, ("", ""))
        settings = self.run.settings if mode else f"v1:{identity}"
        as_read, prompt_now = self.run.prompt
        for line in lines:
            try:
                name, after, *prompt = json.loads(line)
                # Lines of the earliest versions name no prompt: theirs was the run's.
                prompt = prompt[0] if prompt else as_read
                prompt = prompt_now if prompt == as_read else prompt
                self.remember(
                    str(name), Written(settings, mode, model, str(prompt), "", str(after), None, "", 0)
                )
            except (ValueError, TypeError):
                pass  # the last line of a run killed as it wrote: that image was not written

    def read_line(self, line: str) -> None:
        try:
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("x", self.run.unnamed_ext) != self.run.ext:
                self.others.append(line + "\n")
                return
            if "ok" in entry:
                self.landed(str(entry["ok"]), str(entry["a"]))
            elif "fresh" in entry:
                self.fresh_from[(str(entry["fresh"]), str(entry["e"]), str(entry["m"]))] = self.lines
                self.lines += 1
            else:
                fields = [str(entry[key]) for key in ("s", "e", "m", "t", "b", "a")]
                self.remember(
                    str(entry["i"]), Written(*fields, kept_span(entry.get("k")), str(entry["o"]), 0)
                )
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # the last line of a run killed as it wrote, or a line damaged: it counts for nothing

    def remember(self, name: str, written: Written) -> None:
        self.records.setdefault(name, []).append(written._replace(line=self.lines))
        self.lines += 1

    def landed(self, name: str, after: str) -> None:
        history = self.records.get(name, [])
        for index in range(len(history) - 1, -1, -1):
            if history[index].after == after:
                history[index] = history[index]._replace(landed=True)
                return

    def history(self, name: str) -> list[Written]:
        return [self.as_this_run(written) for written in self.load().records.get(name, [])]

    def as_this_run(self, written: Written) -> Written:
        """A line of a version 1 journal that another pass rewrote in this form ("v1:<pass>")
        is this run's pass where its identity is (see RunPass.legacy)."""
        mode_and_model = written.settings.startswith("v1:") and self.run.legacy.get(written.settings[3:])
        if not mode_and_model:
            return written
        mode, model = mode_and_model
        return written._replace(settings=self.run.settings, mode=mode, model=model)

    def counts(self, written: Written, mode: str | None, prompt: str) -> bool:
        """Whether a write was this run's pass (in this mode, unless None), with this prompt, and
        counts."""
        if self.run.fresh:
            return False
        if (
            written.settings != self.run.settings
            or written.prompt != prompt
            or mode not in (None, written.mode)
        ):
            return False
        if self.run.model and written.model and written.model != self.run.model:
            return False
        return written.line >= self.fresh_from.get(
            (written.settings, written.mode, written.model or self.run.model), 0
        )

    def add(self, task: Task, text: str, kept: tuple[int, int] | None) -> None:
        """The line of a caption about to be written."""
        entry = {
            "i": self.name(task.image),
            "s": self.run.settings,
            "e": task.mode,
            "m": self.run.model,
            "t": digest(task.template.text),
            "b": task.before,
            "a": digest(text),
            "o": task.origin,
            "x": self.run.ext,
        }
        if kept:
            entry["k"] = list(kept)
        self.write(entry)

    def confirm(self, task: Task, text: str) -> None:
        """The caption of the line before is in place."""
        self.write({"ok": self.name(task.image), "a": digest(text), "x": self.run.ext})

    def add_edit(self, image: Path, before: str, data: bytes, origin: str) -> None:
        """The line of a person's text about to be written (--apply-edits), and its second line
        once it is in place (edit_landed()): the text is theirs, which no later pass touches."""
        entry = {"i": self.name(image), "s": "", "e": PERSON_EDIT, "m": "", "t": "", "b": before}
        self.write({**entry, "a": text_digest(data), "o": origin, "x": self.run.ext})

    def edit_landed(self, image: Path, data: bytes) -> None:
        self.write({"ok": self.name(image), "a": text_digest(data), "x": self.run.ext})

    def write(self, entry: dict) -> None:
        owner = self.owner
        try:
            if owner.open_for_writing():
                raise OSError(errno.EIO, owner.unwritable)
            # Unbuffered: the line is in the operating system's hands before the caption is.
            # ASCII: names are escaped.
            os.write(owner.descriptor, (json.dumps(entry) + "\n").encode())
        except OSError as exc:
            raise TryFailed(write_fault(exc), f"cannot write {JOURNAL_NAME}: {reason_of(exc)}") from None

    def open_for_writing(self) -> str:
        """Open the journal for appending (once), and with --fresh mark where this pass starts
        anew; why it cannot be, or "". Planning asks before an image is sent, so a folder whose
        journal cannot be written costs no request."""
        if self.owner is not self:
            return self.owner.open_for_writing()
        with self.opening:
            if self.descriptor is None and not self.unwritable:
                try:
                    self.descriptor = self.start()
                except OSError as exc:
                    self.unwritable = reason_of(exc)
            return self.unwritable

    def start_fresh(self, mode: str) -> None:
        """--fresh: from here on, the pass's earlier writes in this folder do not count."""
        if mode not in self.freshened and not self.open_for_writing():
            self.freshened.add(mode)
            self.write({"fresh": self.run.settings, "e": mode, "m": self.run.model, "x": self.run.ext})

    def start(self) -> int:
        """Open the journal for appending; one of version 1 is rewritten in this form first. A
        run that only writes (--existing skip) reads no more of it than its first line."""
        if not self.loaded and self.first_line() == JOURNAL_HEADER:
            self.version = 2
        if self.version != 2:
            self.load()
        if self.version != 2:
            write_atomically(Path(self.path), "".join([JOURNAL_HEADER + "\n", *self.lines_of_version_2()]))
            self.version = 2
        descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | NO_FOLLOW | getattr(os, "O_BINARY", 0))
        # A line half-written by a run that died (a full disk) must not swallow the next one.
        os.lseek(descriptor, -1, os.SEEK_END)
        if os.read(descriptor, 1) != b"\n":
            os.write(descriptor, b"\n")
        return descriptor

    def first_line(self) -> str:
        try:
            with open_regular_file(Path(self.path)) as file:
                return file.readline(len(JOURNAL_HEADER) + 1).decode("utf-8", "replace").rstrip("\n")
        except OSError:
            return ""

    def lines_of_version_2(self) -> Iterator[str]:
        for name, history in self.records.items():
            for written in history:
                entry = {"i": name, "s": written.settings, "e": written.mode, "m": written.model}
                entry.update(t=written.prompt, b=written.before, a=written.after, o=written.origin)
                if written.kept:
                    entry["k"] = list(written.kept)
                yield json.dumps(entry) + "\n"
                if written.landed:
                    yield json.dumps({"ok": name, "a": written.after}) + "\n"
        yield from self.others

    def name(self, image: str | Path) -> str:
        return os.path.relpath(image, os.path.dirname(self.path)).replace(os.sep, "/")

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)


def kept_span(value: object) -> tuple[int, int] | None:
    """A journal's "k", where it is what this version writes: two offsets, the first not past
    the second. A journal travels with a dataset, so anything else is read as absent."""
    if isinstance(value, list) and len(value) == 2 and all(type(item) is int for item in value):
        start, end = value
        return (start, end) if 0 <= start <= end else None
    return None


class Verdict(NamedTuple):
    """What planning does with one image, from its caption and its journal lines."""

    action: str  # "caption", "skip", "left alone" (edited since written) or "fail"
    mode: str = "overwrite"  # how the answer joins the caption
    base: str | None = None  # the text the answer joins, where not the caption as it is
    why: str = ""
    assumed_model: str = ""  # skipped as done, if the server serves this model (not known yet)


def verdict(
    data: bytes, history: list[Written], journal: Journal | None, config: Config, prompt: str, named: bool
) -> Verdict:
    """The rules of reruns (docs/reruns.md), for one image whose caption holds data."""
    after = text_digest(data)
    written = writer_of(history, after)
    mode = config.existing
    if named and config.redo_in_its_mode and journal:
        mode = mode_of_the_pass(history, written, journal, prompt) or mode
    if named and mode == "skip":
        # A redo is never skipped: it writes the answer alone, as overwrite does, and is recorded
        # as the overwrite pass's, a blank caption's as much as any other (docs/reruns.md).
        mode = "overwrite"
    if is_blank(data):
        return Verdict("caption", mode, "")
    ours = pass_answer(history, written, journal, mode, prompt) if journal else None
    edited = origin_of(history, after) == "person"
    # In append and prepend, an edited caption this pass wrote holds an answer of the pass
    # that cannot be told apart: adding another would make two.
    wrote_it = (
        edited and mode in MERGING and any(w.landed and journal.counts(w, mode, prompt) for w in history)
    )
    if named:
        return redo_verdict(data, written, ours, mode, bool(wrote_it))
    if ours:
        return Verdict("skip", mode, assumed_model="" if journal.run.model else ours.model)
    if edited and not config.overwrite_edits:
        return Verdict("left alone", mode)
    if wrote_it:
        return Verdict("fail", mode, why=EDITED_SINCE)
    return Verdict("skip" if mode == "skip" else "caption", mode)


def redo_verdict(
    data: bytes, written: Written | None, ours: Written | None, mode: str, wrote_it: bool
) -> Verdict:
    """--only named the image: its caption is done again, edits included."""
    if mode not in MERGING:
        return Verdict("caption", "overwrite")
    if wrote_it:
        return Verdict("fail", mode, why=EDITED_SINCE)
    if ours is None:
        return Verdict("caption", mode)
    if ours is not written:
        return Verdict(
            "fail", mode, why="another pass added to its caption since; redo it with --existing overwrite"
        )
    text = data.decode("utf-8", "replace").strip()
    if not ours.kept or ours.kept[1] > len(text):
        return Verdict(
            "fail",
            mode,
            why="its journal does not say what this pass added (an earlier version wrote it); "
            "redo it with --existing overwrite",
        )
    start, end = ours.kept
    return Verdict("caption", mode, text[start:end])


def writer_of(history: list[Written], after: str) -> Written | None:
    """The write that left this text, if the tool wrote it."""
    return next((written for written in reversed(history) if written.after == after), None)


def chain(history: list[Written], written: Written | None) -> Iterator[Written]:
    """The write that left a caption's text, then those below the appends and prepends made on
    top of each other since: every write whose answer the text still holds."""
    while written is not None:
        yield written
        if written.mode not in MERGING or not written.before:
            return
        written = writer_of(history[: history.index(written)], written.before)


def pass_answer(
    history: list[Written], written: Written | None, journal: Journal, mode: str, prompt: str
) -> Written | None:
    """The write of this pass whose answer the caption holds."""
    return next((each for each in chain(history, written) if journal.counts(each, mode, prompt)), None)


def mode_of_the_pass(history: list[Written], written: Written | None, journal: Journal, prompt: str) -> str:
    """The mode this run's settings wrote the caption in: of the answer the text holds, else of
    the pass's last write (a caption edited since); "" if they never did."""
    ours = next((each for each in chain(history, written) if journal.counts(each, None, prompt)), None)
    ours = ours or next((w for w in reversed(history) if w.landed and journal.counts(w, None, prompt)), None)
    return ours.mode if ours else ""


def origin_of(history: list[Written], after: str) -> str:
    """Who wrote a caption's text: "tool", "person" (someone changed what the tool wrote), or
    "original" (the tool never wrote it). The text before a write that never landed is as it
    was before that write. Lines of version 1 journals, which knew no text before, never make a
    caption a person's: an earlier version did such an image again."""
    written = writer_of(history, after)
    if written:
        return "person" if written.mode == PERSON_EDIT else "tool"
    known = [written for written in history if written.before]
    undone = next((w for w in reversed(known) if w.before == after and not w.landed), None)
    if undone:
        return undone.origin or "original"
    return "person" if known else "original"


def is_blank(data: bytes) -> bool:
    """Nothing a person or a trainer could read: empty, white space (no-break spaces too),
    a byte-order mark alone (what Notepad saves for an empty file), control and format
    characters (NUL, zero-width spaces). Such a file is no caption."""
    return has_nothing_visible(data.decode("utf-8", "replace"))


def has_nothing_visible(text: str) -> bool:
    """is_blank() for text: a caption, a prompt or a system prompt with nothing a person or a
    model could read."""
    return not any(not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf") for char in text)


def text_digest(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    # Most images planned have no caption yet: one string for all of them, not 65 bytes each.
    return digest(text) if text else NO_TEXT_DIGEST


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


NO_TEXT_DIGEST = digest("")


# ---------------------------------------------------------------------------
# Discovery: list the folders and plan each image, a step at a time
# ---------------------------------------------------------------------------
# What images there are, which are left to caption and in which mode; planning streams,
# a few hundred images at a time between answers.


@dataclass
class Task:
    """One image on its way: prepared, sent, perhaps sent again."""

    image: str  # a path, but not a Path: see Listing.path_of()
    root: Path
    existing: str  # the text the answer joins (append, prepend) or {existing} asks for
    template: Template
    mode: str = "skip"  # how the answer joins the caption: the --existing mode this image is done in
    before: str = ""  # text_digest() of the caption as planned: the journal's "text before"
    origin: str = "none"  # who wrote that text (origin_of())
    prompt: str = ""  # filled in by preparation
    payload: bytes = b""  # the encoded image to send, filled in by preparation
    thumbnail: bytes = b""  # for the review page, made from the payload by preparation
    prepared: Any = None  # with --ray: the payload in the cluster's object store, in place of payload
    tries: int = 0  # tries that failed in a way that counts against --retries
    faults: dict[Fault, int] = field(default_factory=dict)  # how often each fault happened to it
    not_before: float = 0.0  # time.monotonic() before which it must not be sent again
    style: int = 0  # which of Config.styles() it is captioned in: 0 the main caption, else an --also
    named: str | None = None  # what its failure is said of: the image, or its style's caption file
    image_styles: ImageStyles | None = None  # the image's captions in every style this run asks for

    @classmethod
    def of(cls, planned: Planned, config: Config) -> Task:
        listing = planned.listing
        image = listing.path_of(planned.name)
        style = planned.style
        template = listing.prompt if style == 0 else config.also[style - 1].prompt
        journaled = (planned.mode, planned.before, planned.origin)
        task = cls(image, listing.root, planned.existing, template, *journaled, style=style)
        task.named = named_in_reports(image, config, style)
        return task


def named_in_reports(image: str, config: Config, style: int) -> str:
    """What a failure is said of, and --failed-list names: the image; in a run with styles, the
    caption file of the style that failed, so that --only redoes that style alone."""
    return caption_path(image, config.style(style)) if config.also else image


@dataclass
class Listing:
    """One folder's listing, by name: its images and subfolders in sorted order, the caption
    files the listing showed, and the prompt that holds for its images. Names, not paths: a
    folder of 100,000 images costs some 10 MB."""

    path: str
    root: Path  # the folder given, below which this one was found
    names: list[str]  # images and subfolders, sorted
    folders: set[str]  # which of the names are subfolders
    captions: set[str]  # caption files the listing showed
    shared: dict[str, list[str]]  # caption name: the images that would all write it
    prompt: Template
    order: list[int] = field(default_factory=lambda: [0])  # its styles, in the order they are asked
    position: int = 0

    def next_name(self) -> str | None:
        if self.position == len(self.names):
            return None
        self.position += 1
        # Given up once taken, so that a name is freed once its image is done: see path_of().
        name, self.names[self.position - 1] = self.names[self.position - 1], ""
        return name

    def path_of(self, name: str) -> str:
        """One of its images' path, made only to send it or to name it; a str, as every per-image
        path is from planning to writing (the Task's image, its caption, the temporary file).
        pathlib interns each name a Path is made of (sys.intern, Python 3.10 to 3.13), and each
        new name in the interpreter's table of interned strings, freed again once its image is
        done, wears that table until it is built anew at its size: a step of 3.8 MB in the
        driver's memory every 20,000 to 40,000 images sent (Python 3.11, 100,000 images,
        measured), twice that under --ray, whose modules make the table twice as large."""
        return os.path.join(self.path, name)


class Planned(NamedTuple):
    """An image that needs a caption, as discovery keeps it until it is prepared."""

    listing: Listing
    name: str
    existing: str  # the caption already there, where --existing or {existing} uses it
    # The Task's mode, before and origin, as fields: a tuple of them costs 64 bytes an image.
    mode: str
    before: str
    origin: str
    style: int = 0  # the Task's style


class Pending(NamedTuple):
    """An image's caption in one style that planning found to be asked for."""

    style: int
    text: str  # the text the answer joins, or {existing} asks for
    existing: bytes
    history: list[Written]
    decided: Verdict


# How far above a folder a journal of version 1 may name its images (-r kept it in the folder given).
LEGACY_LEVELS = 4


class Discovery:
    """The images below the run's folders, found and planned a step at a time: the first image
    is sent while a huge folder is still being planned, and the total is known once the last
    folder is. Whether a caption exists is read from the folder's listing, so no file that is
    not there is ever opened. Images are planned in order, each folder's entries by name (the
    order of their relative paths)."""

    STEP = 256  # images planned per step: some 5 ms, so an answer is never kept waiting long

    def __init__(
        self,
        config: Config,
        summary: Summary,
        reporter: Reporter,
        metadata: Metadata | None,
        unwritable: dict[Path, str],
        review: Review | None = None,
    ) -> None:
        self.config = config
        self.review = review
        self.summary = summary
        self.reporter = reporter
        self.metadata = metadata
        self.unwritable = unwritable
        self.waiting: deque[Planned] = deque()  # to caption, not prepared yet; an image's styles together
        self.journals: dict[tuple[str, int], Journal] = {}  # by folder and style
        self.legacy_above: dict[str, list[tuple[str, Journal]]] = {}  # by folder: see journals_above()
        self.styles = config.styles()
        self.runs = [RunPass.of(style, config) for style in self.styles]
        # Skipped as done by this pass with a model, before the server said which it serves:
        # (listing, image name, style, model).
        self.assumed: list[tuple[Listing, str, int, str]] = []
        self.seen_folders: set[tuple[int, int]] = set()
        self.roots = {folder_identity(str(root)): root for root in config.folders}
        self.finished = False
        asking_order(config.prompt, config)  # styles that cannot be asked stop a library caller's run too
        self.steps = self.walk_every_folder()

    def step(self) -> None:
        """Plan the next few images (or list the next folder)."""
        if self.finished:
            return
        try:
            next(self.steps)
        except StopIteration:
            self.finished = self.summary.listed = True
            for path in sorted((self.config.only or set()) - self.summary.only_found):
                self.fail(self.config.folders[0], path, self.why_not_found(Path(path)))
            self.reporter.listed(self.summary)

    def until_something_to_send(self, stop: Stop) -> None:
        """Plan until an image needs a caption; then on for a moment, so that a folder of a few
        thousand images is planned whole (and its total said) before the first request."""
        started = time.monotonic()
        while not (self.waiting or self.finished or stop.asked.is_set()):
            self.step()
        while (
            not self.finished and time.monotonic() - started < PLAN_FIRST_SECONDS and not stop.asked.is_set()
        ):
            self.step()

    def list_all(self, stop: Stop) -> None:
        """A dry run: plan everything, listing each image to caption as it is planned."""
        while not self.finished and not stop.asked.is_set():
            self.step()
            planned = [item.listing.path_of(item.name) for item in self.waiting]
            if self.config.price:  # --dry-run --price: what sending them would cost
                for item, image in zip(self.waiting, planned):
                    template = (
                        item.listing.prompt if item.style == 0 else self.config.also[item.style - 1].prompt
                    )
                    prompt = template.fill(image, item.existing)
                    self.summary.image_estimated(estimated_tokens_of(image, prompt, self.config))
            # An image is listed once, however many of its styles it would be asked in.
            unwritten = self.reporter.list_planned(list(dict.fromkeys(planned)))
            self.summary.output_errors += [unwritten] if unwritten else []
            self.waiting.clear()

    def close(self) -> None:
        self.steps.close()
        for journal in self.journals.values():
            journal.close()

    def walk_every_folder(self) -> Iterator[None]:
        for root in self.config.folders:
            yield from self.walk(root)

    def journal(self, folder: str, style: int = 0) -> Journal:
        folder = os.path.abspath(folder)
        if (folder, style) not in self.journals:
            owner = self.journal(folder) if style else None
            self.journals[(folder, style)] = Journal(folder, self.runs[style], owner)
        return self.journals[(folder, style)]

    def journal_of(self, task: Task) -> Journal:
        return self.journal(os.path.dirname(task.image), task.style)

    def history(self, listing: Listing, name: str, style: int = 0) -> tuple[list[Written], Journal | None]:
        """An image's journal lines in a style, if its verdict needs them: not for --existing
        skip, where a caption is done whoever wrote it."""
        if self.config.existing == "skip" and self.config.only is None:
            return [], None
        journal = self.journal(listing.path, style)
        if self.runs[style].fresh and not self.config.dry_run:
            journal.start_fresh(self.config.existing)
        above = self.written_above(listing.path, name) if style == 0 else []
        return above + journal.history(name), journal

    def written_above(self, folder: str, name: str) -> list[Written]:
        """Lines of version 1 journals in the folders above (a run with --recursive kept one
        journal in the folder given, naming the images below it by their path), older than any
        line of this version."""
        history: list[Written] = []
        for above, journal in self.journals_above(os.path.abspath(folder)):
            relative = os.path.relpath(os.path.join(folder, name), above).replace(os.sep, "/")
            history = journal.history(relative) + history
        return history

    def journals_above(self, folder: str) -> list[tuple[str, Journal]]:
        """The version 1 journals up to LEGACY_LEVELS folders above folder, looked for once."""
        if folder not in self.legacy_above:
            found = []
            above = folder
            for _ in range(LEGACY_LEVELS):
                if os.path.dirname(above) == above:
                    break
                above = os.path.dirname(above)
                if self.journal(above).load().version == 1:
                    found.append((above, self.journal(above)))
            self.legacy_above[folder] = found
        return self.legacy_above[folder]

    def model_known(self, model: str) -> None:
        """The server said which model it serves (--api openai without --model): images skipped
        as done by this pass with another model are planned again."""
        self.runs = [run._replace(model=model) for run in self.runs]
        self.config = replace(self.config, model=model)
        self.styles = self.config.styles()
        for (_, style), journal in self.journals.items():
            journal.run = self.runs[style]
        assumed, self.assumed = self.assumed, []
        changed = [
            (listing, name, style)
            for listing, name, style, assumed_model in assumed
            if assumed_model != model
        ]
        if not changed:
            return
        for listing, _, style in changed:
            self.summary.image_kept(
                listing.root, left_alone=False, times=-1, ext=self.styles[style].caption_ext
            )
        # Planned again with those to caption so far, in the order of planning, so that --limit
        # takes the first images whatever the server's answer.
        planned = [(item.listing, item.name, item.style) for item in self.waiting]
        self.summary.image_planned(times=-len(planned))
        for listing, name, style in planned:
            self.only_planned(listing, name, style, times=-1)
        self.summary.images_planned -= len({(listing.path, name) for listing, name, _ in planned})
        self.waiting.clear()
        again = sorted(changed + planned, key=self.order_of)
        for _, group in itertools.groupby(again, key=lambda each: (id(each[0]), each[1])):
            styles = list(group)
            self.plan(styles[0][0], styles[0][1], {style for _, _, style in styles})

    def order_of(self, image: tuple[Listing, str, int]) -> tuple[int, tuple[str, ...], int]:
        """Where planning comes to an image's caption: folder by folder as given, each by relative
        path, each image's styles in the order they are asked."""
        listing, name, style = image
        relative = Path(os.path.relpath(os.path.join(listing.path, name), listing.root))
        return self.config.folders.index(listing.root), relative.parts, listing.order.index(style)

    def walk(self, root: Path) -> Iterator[None]:
        first = self.listing(str(root), root, self.config.prompt)
        stack = [first] if first else []
        planned = 0
        while stack:
            here = stack[-1]
            name = here.next_name()
            if name is None:
                stack.pop()
                continue
            if name in here.folders:
                below = self.listing(os.path.join(here.path, name), root, here.prompt)
                stack += [below] if below else []
                yield  # a folder listed is a step: it may have held 100,000 names
                continue
            self.plan(here, name)
            planned += 1
            if planned % self.STEP == 0:
                yield

    def listing(self, path: str, root: Path, prompt: Template) -> Listing | None:
        """The folder at path, listed; None (and the folder reported) if it cannot be read."""
        try:
            # Following links lets a dataset be assembled from linked folders; remembering each
            # real folder keeps a link back to a parent from looping forever.
            identity = folder_identity(path)
            if identity in self.seen_folders or (path != str(root) and identity in self.roots):
                return None  # listed already, or given on the command line: captioned as such
            self.seen_folders.add(identity)
            with os.scandir(path) as entries:
                return self.listing_of(path, root, entries, prompt)
        except OSError as exc:
            if len(self.config.folders) == 1 and path == str(root):
                raise CannotStart(f"cannot list {root}: {reason_of(exc)}") from None
            # lost+found on a data disk, say
            self.folder_left_out(path, f"cannot list it: {reason_of(exc)}; its images are left out")
            return None

    def listing_of(
        self, path: str, root: Path, entries: Iterator[os.DirEntry], prompt: Template
    ) -> Listing | None:
        exts = tuple(style.caption_ext for style in self.styles)
        names: list[str] = []
        folders = set()
        captions = set()
        has_own_prompt = False
        for entry in entries:
            name = entry.name
            if name.startswith(OWN_FILE_PREFIX):
                trouble = self.own_file(path, root, entry)
                if trouble:
                    self.folder_left_out(path, trouble)
                    return None
            has_own_prompt = has_own_prompt or name == self.config.folder_prompt
            if name.startswith("."):
                continue
            if name.endswith(exts):
                captions.add(name)  # whatever it is: existing_caption() looks closer
            if entry.is_dir():
                if self.config.recursive:
                    names.append(name)
                    folders.add(name)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    names.append(name)
                else:
                    self.fail(root, entry.path, why_not_a_file(entry.path))
        if has_own_prompt:
            try:
                prompt = read_prompt(Path(path, self.config.folder_prompt))
                order = asking_order(prompt, self.config)
            except CannotStart as exc:
                below = " and those of its subfolders" if folders else ""
                self.folder_left_out(path, f"{exc}; its images{below} are left out")
                return None
        names.sort()
        # Sorted, the captions the images would write show a shared one as neighbours: half the
        # memory of counting them in a dict, which matters in a folder of 100,000.
        written = sorted(caption_name(name, self.config) for name in names if name not in folders)
        shared: dict[str, list[str]] = {
            one: [] for one, next_one in zip(written, written[1:]) if one == next_one
        }
        for name in names:
            if shared and name not in folders and caption_name(name, self.config) in shared:
                shared[caption_name(name, self.config)].append(name)
        captions.discard(self.config.folder_prompt)
        if captions:
            stems = {os.path.splitext(name)[0] for name in names if name not in folders}
            ours = {stem + ext for stem in stems for ext in exts}
            self.summary.orphans += [Path(path, name) for name in sorted(captions.difference(ours))]
        # A prompt from a folder above was checked when that folder was listed.
        order = order if has_own_prompt else asking_order(prompt, self.config)
        return Listing(path, root, names, folders, captions, shared, prompt, order)

    def own_file(self, path: str, root: Path, entry: os.DirEntry) -> str:
        """Deal with a file of this tool's in a listing: a killed run's temporary file is removed,
        and a lock below the folder given means that a run of its own is captioning it there."""
        if entry.name.endswith(".tmp") and not self.config.dry_run and is_stale(entry):
            remove_quietly(entry.path)
        if entry.name == LOCK_NAME and path != str(root) and not self.config.dry_run:
            holder = held_by_another_run(Path(entry.path))
            if holder:
                return f"another run is captioning it ({holder}); its images are left out"
        return ""

    def why_not_found(self, path: Path) -> str:
        """Why an image --only lists was not planned: in a folder left out (which says why), or
        in none of the folders given."""
        for folder, _ in self.summary.left_out:
            if is_below(path, folder):
                return f"listed by --only, but its folder {self.reporter.folder_name(folder)} is left out"
        return "listed by --only, but not found in the folders given"

    def folder_left_out(self, path: str, why: str) -> None:
        self.summary.left_out.append((Path(path), why))
        self.reporter.folder_failed(Path(path), why)

    def fail(self, root: Path, image: str, why: str, style: int | None = None) -> None:
        """An image failed before it was sent: in one style, or (None) whole."""
        if self.review:
            self.review.image(image, "failed", reason=why, style=self.ext(style))
        named = image if style is None else named_in_reports(image, self.config, style)
        self.summary.image_failed(root, named, why, self.ext(style))
        self.reporter.image_failed(named, why, counted=False)

    def plan(self, listing: Listing, name: str, styles: set[int] | None = None) -> None:
        """Decide for one image, in each style (or those given): to caption, already captioned,
        or failed before it is sent. Its captions to ask for are planned together, in the order
        they are asked, so that the image is prepared once for all of them."""
        pending = [
            decided
            for style in listing.order
            if styles is None or style in styles
            for decided in [self.plan_style(listing, name, style)]
            if decided
        ]
        if not pending:
            return
        if self.config.limit is not None and self.summary.images_planned >= self.config.limit:
            for each in pending:  # left for a later run
                self.only_planned(listing, name, each.style)
            if self.review:  # still on the page
                for each in pending:
                    self.review.image(
                        listing.path_of(name),
                        "not_attempted",
                        readable_text(each.existing),
                        style=self.ext(each.style),
                    )
            return
        unwritable = self.unwritable_reason(listing)
        if unwritable:
            for each in pending:
                self.fail(listing.root, listing.path_of(name), unwritable, each.style)
            return
        self.summary.images_planned += 1
        for each in pending:
            self.to_caption(listing, name, each)

    def plan_style(self, listing: Listing, name: str, style: int) -> Pending | None:
        """Decide for one image in one style; what to ask for, or None where it is decided."""
        if not self.named_by_only(listing, name, style):
            return None
        config = self.styles[style]
        root = listing.root
        caption = caption_name(name, config)
        refused = self.caption_name_refused(listing, name, caption)
        if refused:
            self.fail(root, listing.path_of(name), refused, style)
            return None
        caption_file = os.path.join(listing.path, caption)
        try:
            existing = existing_caption(caption_file, caption in listing.captions)
        except TryFailed as failure:
            self.fail(root, listing.path_of(name), str(failure), style)
            return None
        if self.metadata:
            self.metadata.recover(
                listing.path_of(name), caption_file, existing, style_column(config.caption_ext, style)
            )
        history, journal = self.history(listing, name, style)
        prompt = listing.prompt if style == 0 else config.prompt
        decided = verdict(
            existing, history, journal, config, digest(prompt.text), self.config.only is not None
        )
        if decided.action == "fail":
            self.fail(root, listing.path_of(name), decided.why, style)
            return None
        if decided.action != "caption":
            self.not_captioned(listing, name, existing, decided, style)
            return None
        try:
            text = self.text_to_join(caption_file, existing, decided, prompt)
        except TryFailed as failure:
            self.fail(root, listing.path_of(name), str(failure), style)
            return None
        return Pending(style, text, existing, history, decided)

    def ext(self, style: int | None) -> str:
        """The extension of a style's captions, where the run has styles ("" otherwise)."""
        return self.styles[style].caption_ext if style is not None and self.config.also else ""

    def only_planned(self, listing: Listing, name: str, style: int, times: int = 1) -> None:
        if self.config.only is not None:
            self.summary.only_planned(
                entries_kept(os.path.join(listing.path, name), style, self.config), times
            )

    def named_by_only(self, listing: Listing, name: str, style: int = 0) -> bool:
        """Whether the image's caption in a style is this run's business: every one, or those
        --only names: by the image (every style), or by the style's caption file."""
        if self.config.only is None:
            return True
        named = entries_naming(os.path.join(listing.path, name), style, self.config)
        if not named:
            self.keep_in_the_jsonl(listing, name, style)  # the JSONL still holds every caption
            return False
        self.summary.only_found |= named
        return True

    def caption_name_refused(self, listing: Listing, name: str, caption: str) -> str:
        """Why the image's caption file cannot be its own, or ""."""
        stem_shared = caption_name(name, self.config)  # twins share a stem, so every style's caption
        if stem_shared in listing.shared:
            # One caption would describe only one of the pictures: caption neither.
            twins = [other for other in listing.shared[stem_shared] if other != name]
            return f"shares {caption} with {', '.join(twins)}; rename one of them"
        if caption == self.config.folder_prompt:
            return f"its caption would overwrite the folder's prompt file {caption}"
        if len(os.fsencode(caption)) > longest_name(listing.path):
            return f"its caption's name would be too long for the file system ({caption})"
        return ""

    def unwritable_reason(self, listing: Listing) -> str:
        """Why nothing can be written in the image's folder, or "". With one folder the run
        cannot start (CannotStart); with several, its images fail and the others go on. No
        request is wasted on a caption that could not be written."""
        root = listing.root
        if self.unwritable.get(root):
            if len(self.config.folders) == 1:
                raise CannotStart(f"cannot write in {root}: {self.unwritable[root]}")
            return f"cannot write in {root}: {self.unwritable[root]}"
        why = "" if self.config.dry_run else self.journal(listing.path).open_for_writing()
        return f"cannot write {JOURNAL_NAME}: {why}" if why else ""

    def to_caption(self, listing: Listing, name: str, pending: Pending) -> None:
        self.summary.image_planned()
        self.only_planned(listing, name, pending.style)
        existing, decided = pending.existing, pending.decided
        before = text_digest(existing)
        origin = "none" if is_blank(existing) else origin_of(pending.history, before)
        self.waiting.append(Planned(listing, name, pending.text, decided.mode, before, origin, pending.style))
        if self.review:
            self.review.image(
                listing.path_of(name), "not_attempted", readable_text(existing), style=self.ext(pending.style)
            )

    def text_to_join(self, caption_file: str, existing: bytes, decided: Verdict, prompt: Template) -> str:
        """The text the answer joins (append, prepend), or {existing} asks for; "" where neither
        needs it."""
        if decided.base is not None:
            return decided.base
        if self.wants_text(prompt) or decided.mode in MERGING:
            refuse_to_send_or_join(caption_file, existing, self.sends_text(prompt))
            return caption_text(caption_file, existing)
        return ""

    def keep_in_the_jsonl(self, listing: Listing, name: str, style: int = 0) -> None:
        caption = caption_name(name, self.styles[style])
        if self.metadata and caption_name(name, self.config) not in listing.shared:
            caption_file = os.path.join(listing.path, caption)
            try:
                existing = existing_caption(caption_file, caption in listing.captions)
            except TryFailed:
                return  # not readable: a run that names it says why
            column = style_column(self.styles[style].caption_ext, style)
            self.metadata.recover(listing.path_of(name), caption_file, existing, column)

    def not_captioned(
        self, listing: Listing, name: str, existing: bytes, decided: Verdict, style: int = 0
    ) -> None:
        """Count an image that keeps its caption: done before, or edited by a person since."""
        self.summary.image_kept(listing.root, left_alone=decided.action == "left alone", ext=self.ext(style))
        if decided.assumed_model:
            self.assumed.append((listing, name, style, decided.assumed_model))
        if self.review:
            self.review.image(listing.path_of(name), "before", readable_text(existing), style=self.ext(style))

    def wants_text(self, prompt: Template) -> bool:
        """Whether an image's existing caption is used: merged, or asked for by a placeholder."""
        return self.config.existing in MERGING or self.sends_text(prompt)

    def sends_text(self, prompt: Template) -> bool:
        """Whether an image's existing caption goes into what is sent ({existing})."""
        asked = (
            prompt.fields | self.config.prefix.fields | self.config.suffix.fields | self.config.system.fields
        )
        return "existing" in asked


def entries_naming(image: str, style: int, config: Config) -> set[str]:
    """The --only entries that name an image's caption in a style: the image (every style), or
    that style's caption file."""
    caption = caption_path(image, config.style(style))
    return {os.path.realpath(image), os.path.realpath(caption)} & (config.only or set())


def entries_kept(image: str, style: int, config: Config) -> set[tuple[str, str]]:
    """The --only entries that name an image's caption in a style, each with how --failed-list
    names that caption for a run that did not end it: in a run with styles, an entry naming
    the image by that style's caption file, as a failure is named (named_in_reports), so that
    the next run does not ask again (and pay again) for the styles this one wrote."""
    real = os.path.realpath(image)
    folder, name = os.path.split(image)
    caption = os.path.join(os.path.realpath(folder), caption_name(name, config.style(style)))
    return {
        (entry, caption if config.also and entry == real else entry)
        for entry in entries_naming(image, style, config)
    }


def caption_name(image_name: str, config: Config) -> str:
    return os.path.splitext(image_name)[0] + config.caption_ext


def caption_path(image: str, config: Config) -> str:
    return os.path.join(os.path.dirname(image), caption_name(os.path.basename(image), config))


def path_parts(path: str | Path) -> list[str]:
    """A path's parts as pathlib has them, by os.path (see Listing.path_of()): the root first,
    "." and empty ones left out, ".." kept (a link before it is not to be cancelled)."""
    path = os.fspath(path)
    if os.altsep:
        path = path.replace(os.altsep, os.sep)
    parts = [part for part in path.split(os.sep) if part not in ("", ".")]
    return [os.sep, *parts] if path.startswith(os.sep) else parts


def joined(parts: list[str]) -> str:
    if parts[:1] == [os.sep]:
        return os.sep + os.sep.join(parts[1:])
    return os.sep.join(parts) or "."


def path_order(path: str) -> list[str]:
    """The order in which images are listed (summary, review page, --failed-list): a folder's
    images together, before the next folder's, as pathlib orders paths (a-b.png after a/z.png)."""
    return path_parts(os.path.normcase(path))


def folder_identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def is_stale(entry: os.DirEntry) -> bool:
    """Whether a temporary file of ours was left by a run that ended before renaming it: its
    writer's process is gone (so a rerun right after a kill -9 finds it), or, where that cannot
    be told, the file is older than any write takes."""
    pid = writer_pid(entry.name)
    if pid and os.name != "nt":  # Windows has no signal 0: its os.kill would end the process
        return not process_is_alive(pid)
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
    except OSError:
        return False


def writer_pid(name: str) -> int:
    """The pid in a temporary file's name (see write_atomically), or 0 for a name without one."""
    match = re.fullmatch(rf"{re.escape(OWN_FILE_PREFIX)}-(\d{{1,9}})-[0-9a-f]+\.tmp", name)
    return int(match.group(1)) if match else 0


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # asks only whether it exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def why_not_a_file(path: str) -> str:
    # Only regular files are images: a named pipe would block the run forever, and a link to
    # /dev/zero would be read without end.
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot read: {reason_of(exc)}"
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    kind = next((what for test, what in kinds.items() if test(mode)), "not a plain file")
    return f"not an image file but {kind}"


@functools.cache
def longest_name(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf; NTFS allows 255
        return 255


def existing_caption(path: str | Path, listed: bool) -> bytes:
    """The bytes of the caption file beside an image (b"" if there is none). Raises TryFailed
    if something is in the way: a folder, a special file, a file that cannot be read."""
    if not listed:  # the folder's listing already says it is not there: no open() needed
        return b""
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        what = f"the existing {os.path.basename(path)}"
        raise TryFailed(Fault.CAPTION_UNWRITABLE, f"cannot read {what}: {reason_of(exc)}") from None


def refuse_to_send_or_join(path: str, data: bytes, sent: bool) -> None:
    """Raise TryFailed for an existing caption that must be neither sent ({existing}) nor joined
    to (append, prepend): a link, which in a downloaded dataset would send a file from outside it
    to the server (a hosted one too) or copy it into the caption; or, where it is sent, one longer
    than any prompt may sensibly hold (the rule {caption:EXT} keeps, ImageStyles.caption_on_disk())."""
    if os.path.islink(path):
        raise TryFailed(
            Fault.CAPTION_UNWRITABLE,
            f"the existing {os.path.basename(path)} is a link; a caption that is sent or joined to is read only from a file",
        )
    if sent and len(data) > LONGEST_ASKED_CAPTION:
        raise TryFailed(
            Fault.CAPTION_UNWRITABLE,
            f"the existing {os.path.basename(path)} is longer than {LONGEST_ASKED_CAPTION:,} bytes",
        )


def readable_text(data: bytes) -> str:
    return data.decode("utf-8-sig", "replace").strip()


def caption_text(path: str | Path, data: bytes) -> str:
    if is_blank(data):
        return ""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        # What we cannot read we cannot merge, and never overwrite.
        raise TryFailed(
            Fault.CAPTION_UNWRITABLE, f"the existing {os.path.basename(path)} is not UTF-8 text"
        ) from None


def read_regular_file(path: str | Path) -> bytes:
    with open_regular_file(path) as file:
        return file.read()


def open_regular_file(path: str | Path) -> BinaryIO:
    """A regular file, open for reading; OSError for anything else. Opened without blocking, so
    a named pipe or a device in its place is refused, never read."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    file = open(descriptor, "rb")  # noqa: SIM115 - returned to a with block
    mode = os.fstat(descriptor).st_mode
    if stat.S_ISREG(mode):
        return file
    file.close()
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    raise OSError(errno.EINVAL, "not a regular file")


# ---------------------------------------------------------------------------
# Servers: each one's health, and the checks before the first image is sent
# ---------------------------------------------------------------------------
# Which servers answer, in rotation or not; the checks at the start and the short wait for
# a server that is restarting.


class State(enum.Enum):
    ANSWERING = "answering"
    QUIET = "not answering; probed until it does"
    OUT = "taken out of rotation"
    DEAD = "did not answer at the start"


class Server:
    """One server of the run: its API (which holds the clients), its free slots, and whether
    it answers."""

    def __init__(self, url: str, jobs: int, api: Api) -> None:
        self.url = url
        self.jobs = jobs
        self.api = api
        self.model = ""  # as this server names it, once the preflight has checked it
        self.in_flight = 0
        self.state = State.ANSWERING
        self.why = ""  # what went wrong, in every state but ANSWERING
        self.quiet_since = 0.0
        self.next_probe = 0.0
        self.probe_pause = PROBE_FIRST
        self.down_sign = ""  # at the start: how it showed that it may be restarting (down_sign())
        self.watch = FailureWatch()
        self.turns = TurnTaking(jobs)  # whether it answers one request at a time
        self.pacer = Pacer()  # when it may be sent the next request (its rate limit)
        self.busy_since = 0.0  # since when it refuses as busy (429, 503) without a good answer
        self.busy_times = 0

    @property
    def in_rotation(self) -> bool:
        return self.state in (State.ANSWERING, State.QUIET)

    def free_slots(self) -> int:
        return self.jobs - self.in_flight if self.state is State.ANSWERING else 0

    def went_quiet(self, why: str) -> None:
        if self.state is State.ANSWERING:
            self.state, self.why, self.quiet_since = State.QUIET, why, time.monotonic()
            self.next_probe, self.probe_pause = self.quiet_since, PROBE_FIRST

    def probe_due(self) -> bool:
        return self.state is State.QUIET and time.monotonic() >= self.next_probe

    def probe(self) -> str:
        """Ask the server whether it answers (on a worker thread); why not, or ""."""
        try:
            with self.api.errors():
                self.api.models()
        except TryFailed as failure:
            return str(failure)
        return ""

    def probed(self, trouble: str, wait_seconds: float) -> None:
        """Take in a probe's verdict: back in rotation, asked again later and more slowly, or,
        past wait_seconds, out of rotation."""
        if self.state is not State.QUIET:
            return
        if not trouble:
            self.state, self.why = State.ANSWERING, ""
            return
        now = time.monotonic()
        if now + self.probe_pause - self.quiet_since > wait_seconds:
            self.take_out(f"{trouble} for more than {duration(wait_seconds)}")
            return
        self.why = trouble
        self.next_probe = now + self.probe_pause
        self.probe_pause = min(self.probe_pause * 2, PROBE_LONGEST)

    def take_out(self, why: str) -> None:
        if self.in_rotation:
            self.state, self.why = State.OUT, why

    def report(self) -> str:
        """What the summary says of this server, if anything went wrong with it."""
        if self.state is State.ANSWERING:
            return ""
        if self.state is State.QUIET:
            return f"{self.url} was not answering when the run ended: {self.why}"
        return f"{self.url} {self.state.value}: {self.why}"

    def close(self) -> None:
        self.api.close()


# How many requests a server really runs at once. OLLAMA_NUM_PARALLEL silently falls back to 1
# slot when memory is short, and /api/ps does not show it (ollama/ollama#17556); Ollama's MLX
# engine samples one sequence at a time whatever it says (x/mlxrunner/sample.go): more --jobs
# then only queue. The times the run has of each request anyway (sent, first token of content or
# thinking, end) tell, without a request more: a server that answers one at a time begins each
# answer only after the one before it ended, although the next request was already waiting, and
# gives each a whole turn of its own; one that answers several at once streams them side by side,
# or (answers shorter than the wait for their first token) ends them moments apart.
#
# An answer took a turn of its own when (1) its request was sent before the server, answering one
# at a time, could have begun the answer before it (so it waited through all of that one), (2) no
# other answer streamed while it did, and (3) its turn, from the end of the answer before it to
# its own, lasted at least TURN_SHARE of the longest of the last TURNS_REMEMBERED: answers begun
# together on a server with several slots end moments apart, where a turn of one's own takes an
# answer's whole time (half of the longest, as captions differ in length). The first turn, from
# its request's sending, may include loading the model: it only delays the verdict.
# TURNS_IN_A_ROW such answers in a row name the server: a 4-slot server behind --jobs 5 makes one
# request in five wait, and the others' answers stream beside it or end with it; a server that
# answers one at a time is named at its sixth answer (the first has no answer before it, the
# second was sent with the first): the stand-in's within 10 images, even on a loaded machine.
# With --jobs 1 or 2 nothing is watched: no request waits, or one does as --jobs = slots + 1
# means it to (README), so that the next starts the moment a slot frees.
# Where answers stream for less time than their requests wait for their first token, a server
# with several slots whose requests have drifted apart ends them one after another, as a faster
# server that answers one at a time would: no timing tells the two apart. Captions stream for
# seconds (the tests' stand-in streams its default answer in a millisecond).
TURNS_IN_A_ROW = 4
TURN_SHARE = 0.5
TURNS_REMEMBERED = 8
LEAST_JOBS_WATCHED = 3
# The turn of the request this thread sends (each request has a thread of its own), set by
# TurnTaking.timed(), for Gathered to time its first token whichever API streams it.
SENDING = threading.local()


@dataclass(eq=False)
class Turn:
    """One request's times (TurnTaking.now()) as its server served it."""

    taking: TurnTaking
    sent: float
    first: float = 0.0  # its first token, of content or of thinking
    could_start: float = 0.0  # when a server answering one at a time could have begun it
    queued: bool = False  # sent before that server could begin the answer before it
    together: bool = False  # another answer streamed while this one did

    def first_token(self) -> None:
        self.taking.began(self, self.taking.now())


class TurnTaking:
    """Whether a server answers one request at a time, from the times of its requests (see
    TURNS_IN_A_ROW). The requests' threads tell it of each one's start, first token and end,
    each under a lock held for microseconds."""

    def __init__(self, jobs: int) -> None:
        self.watching = jobs >= LEAST_JOBS_WATCHED
        self.lock = threading.Lock()
        self.answering: set[Turn] = set()
        self.last: Turn | None = None  # the answer that ended last
        self.last_end = 0.0
        self.lengths: deque[float] = deque(maxlen=TURNS_REMEMBERED)
        self.in_a_row = 0  # answers in a row that took a turn of their own
        self.one_at_a_time = False
        self.told = False  # the run said so

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Time the request this thread sends within (its first token is Gathered's to time)."""
        if not self.watching or self.one_at_a_time:  # nothing left to learn
            yield
            return
        SENDING.turn = turn = Turn(self, self.now())
        try:
            yield
        finally:
            SENDING.turn = None
            self.ended(turn, self.now())

    def now(self) -> float:
        """The clock its requests are timed by (a Ray worker's is another: TurnsTold)."""
        return time.monotonic()

    def began(self, turn: Turn, now: float) -> None:
        with self.lock:
            turn.first = now
            turn.could_start = max(turn.sent, self.last_end)
            turn.queued = self.last is not None and turn.sent <= self.last.could_start
            turn.together = bool(self.answering)
            for other in self.answering:
                other.together = True
            self.answering.add(turn)

    def dropped(self, turn: Turn) -> None:
        """A request whose end will never be told (its Ray worker was lost): no turn to time, and
        no answer streaming beside the others from now on."""
        with self.lock:
            self.answering.discard(turn)

    def ended(self, turn: Turn, now: float) -> None:
        with self.lock:
            if turn not in self.answering:  # no token came: no turn to time
                return
            self.answering.discard(turn)
            length = now - turn.could_start
            whole = length >= TURN_SHARE * max(self.lengths, default=0.0)
            own_turn = turn.queued and not turn.together and whole
            self.lengths.append(length)
            self.in_a_row = self.in_a_row + 1 if own_turn else 0
            self.one_at_a_time = self.one_at_a_time or self.in_a_row >= TURNS_IN_A_ROW
            self.last, self.last_end = turn, max(self.last_end, now)


def server_for(url: str, config: Config) -> Server:
    import_run_libraries()
    refuse_unusable_proxies(url)
    server = Server(url, config.jobs, APIS[config.api](url, config.timeout, config.api_key))
    server.pacer = Pacer(config.rpm, config.tpm, config.max_tokens + PROMPT_TOKENS_GUESS)
    return server


def ready_servers(
    config: Config, reporter: Reporter, stop: Stop, cluster: Cluster | None = None
) -> list[Server]:
    """Every server checked at once; those that do not answer are named and left out. Raises
    CannotStart if none answers, or if one lacks the model or has one that cannot see. A Ray
    node's own server (--host local:PORT) is checked from that node."""
    servers = [server_for(url, config) for url in config.hosts if not url.startswith(LOCAL_HOST)]
    if config.provider:
        # One key: a provider counts the requests of every base URL it is reached by (a gateway
        # and the API itself) against one account's limits (OpenAI's per organization and project,
        # Gemini's per project), so the run paces them together.
        for server in servers[1:]:
            server.pacer = servers[0].pacer
    check_servers(servers, config, reporter, stop)
    for url in config.hosts:
        if cluster and url.startswith(LOCAL_HOST):
            servers += cluster.node_servers_for(config, int(url[len(LOCAL_HOST) :]), reporter, stop)
    if not any(server.in_rotation for server in servers):
        wait_for_a_restart(
            servers, config, reporter, stop, cluster.check_servers if cluster else check_servers
        )
    if not any(server.in_rotation for server in servers):
        for server in servers:
            server.close()
        if len(servers) == 1:
            raise CannotStart(servers[0].why)
        raise CannotStart("no server answers: " + "; ".join(server.why for server in servers))
    for server in servers:
        if server.state is State.DEAD:
            reporter.left_out_at_the_start(server.report())
    models = {server.model for server in servers if server.in_rotation}
    if len(models) > 1:  # --api openai without --model, and servers that serve different models
        served = ", ".join(f"{server.model} on {server.url}" for server in servers if server.in_rotation)
        raise CannotStart(f"the servers serve different models ({served}): choose one with --model")
    return servers


def check_servers(servers: list[Server], config: Config, reporter: Reporter, stop: Stop) -> None:
    """The preflight of every server at once; those that do not answer are DEAD, with why."""
    for server in servers:
        server.down_sign = ""
    checks = [in_the_background(server.api.preflight, server, config, reporter, stop) for server in servers]
    while wait(checks, timeout=POLL_SECONDS)[0] != set(checks):
        if stop.asked.is_set():  # a --pull can take minutes, and a silent server --timeout
            raise CannotStart("interrupted while checking the servers")
    for server, check in zip(servers, checks):
        dead = check.result()  # raises what the check raised: CannotStart
        server.state, server.why = (State.DEAD, dead) if dead else (State.ANSWERING, "")


# Ollama's desktop app restarts itself to install an update, and the systemd unit that Ollama's
# install.sh writes starts a stopped server again after 3 s (ollama/ollama:scripts/install.sh,
# Restart=always, RestartSec=3): a server that refuses connections as a run starts may be back
# in seconds, and a shell loop over folders (`|| break`) would end the night there. 15 s covers
# such a restart, while whoever forgot `ollama serve` hears of it 15 s later, not after the
# minutes of --wait-server.
RESTART_WAIT = 15.0 * PAUSE_SCALE


def wait_for_a_restart(
    servers: list[Server], config: Config, reporter: Reporter, stop: Stop, check: Callable[..., None]
) -> None:
    """No server answered at the start: ask those that refused connections (or whose proxy said
    they are down) again, more and more slowly, for a short while (RESTART_WAIT, at most
    --wait-server), in case they are restarting; until one answers. check: check_servers(), or
    the cluster's, which checks a node's own server on its node."""
    restarting = [server for server in servers if server.down_sign]
    seconds = min(RESTART_WAIT, config.wait_server)
    if not restarting or seconds <= 0:
        return
    for server in restarting:
        reporter.waiting_for_a_restart(server.url, server.down_sign, seconds)
    until, pause = time.monotonic() + seconds, PROBE_FIRST
    while not any(server.in_rotation for server in servers):
        left = until - time.monotonic()
        if left <= 0:
            return
        if stop.asked.wait(min(pause, left)):
            raise CannotStart("interrupted while waiting for the servers")
        pause = min(2 * pause, PROBE_LONGEST)
        check(restarting, config, reporter, stop)
    for server in restarting:
        if server.in_rotation:
            reporter.answers(server.url)


def down_sign(failure: TryFailed) -> str:
    """How a server that may be restarting shows it: refused connections, or a proxy in front
    of it saying it is down (502, 504). Other failures to connect (a proxy, TLS, a name that
    does not resolve) do not pass with a restart."""
    if failure.fault is not Fault.SERVER_DOWN or failure.cause:
        return ""
    return (
        f"answers {failure.status} (its proxy's word for a server that is down)"
        if failure.status
        else "refuses connections"
    )


def patiently(
    call: Callable[[], Any],
    server: Server,
    config: Config,
    reporter: Reporter,
    stop: Stop,
    paced: bool = False,
) -> Any:
    """call(), asked again while the server answers that it is busy or still loading its model
    (429, 503: llama-server says "Loading model"), for up to --wait-server. A paced call (the
    probe picture, a request like any other) keeps to the server's rate limit."""
    since, tries = time.monotonic(), 0
    while True:
        if paced:
            stop.asked.wait(max(0.0, server.pacer.due() - time.monotonic()))
            server.pacer.sent(time.monotonic())
        try:
            with server.api.errors():
                return call()
        except TryFailed as failure:
            waited = time.monotonic() - since
            if (
                not POLICY[failure.fault].waited_for_at_start
                or waited > config.wait_server
                or stop.asked.is_set()
            ):
                raise
            if not tries:
                reporter.busy_at_the_start(server.url, str(failure), config.wait_server)
            tries += 1
            stop.asked.wait(max(backoff(tries), failure.pause))
        finally:
            if paced:
                server.pacer.landed()


def probe_task() -> Task:
    picture = Image.new("RGB", (64, 64), "white")
    return Task(
        # An absolute path: folder_name() caches each folder's name by its path, and a --system
        # template filled for a relative one would fix "." to the working folder of the moment.
        str(DEFAULT_PROMPT_FILE.with_name("a 64x64 probe picture")),
        Path(),
        "",
        Template(""),
        prompt="What colour is this?",
        payload=encode_jpeg(picture),
    )


# ---------------------------------------------------------------------------
# Servers' APIs: one class each, behind one interface (Api)
# ---------------------------------------------------------------------------
# How each API is spoken: settings, clients, listing the models, the checks at the start,
# one caption request, the words of its errors. A new API is a class added to APIS.


@dataclass
class Answer:
    text: str
    done_reason: str
    tokens: int  # generated, thinking included
    generation_ns: int
    thought: bool = False  # thinking came back, in message.thinking or as a <think> block
    # The request let the model think: a model that cannot turn thinking off is sent its lowest
    # level, and its thinking is no surprise worth a warning.
    thinking_asked: bool = False
    prompt_tokens: int = 0  # as the server counted them (image included); 0 where it said nothing
    # Of the generated tokens, those spent thinking, where the server says (OpenAI's usage,
    # completion_tokens_details.reasoning_tokens): billed as output, but no caption.
    reasoning_tokens: int = 0


class Gathered:
    """An answer as it streams in, from either API: its text, whether thinking came with it
    (never part of a caption), and checks that it does not loop and stays within what its
    token limit allows."""

    def __init__(self, max_tokens: int) -> None:
        self.parts: list[str] = []
        self.thought = False
        self.max_tokens = max_tokens
        self.length = 0  # characters, thinking included
        self.untimed: Turn | None = getattr(SENDING, "turn", None)  # until its first token

    def add(self, content: str, thinking: str) -> None:
        if self.untimed and (content or thinking):
            self.untimed.first_token()
            self.untimed = None
        self.parts.append(content)
        self.thought = self.thought or bool(thinking)
        self.length += len(content) + len(thinking)
        if self.length > self.max_tokens * CHARACTERS_PER_TOKEN:
            raise TryFailed(
                Fault.MODEL_UNUSABLE,
                f"it sent an answer of more than {self.max_tokens * CHARACTERS_PER_TOKEN} characters, longer "
                f"than --max-tokens {self.max_tokens} allows: it ignores the token limit",
            )
        if len(self.parts) % LOOP_CHECK_EVERY == 0 and is_looping(THINK_BLOCK.sub("", "".join(self.parts))):
            raise TryFailed(
                Fault.UNFIT_ANSWER, f"the answer repeats itself: {shortened(''.join(self.parts))}"
            )

    def answer(self, done_reason: str, tokens: int, generation_ns: int) -> Answer:
        text = "".join(self.parts)
        thought = self.thought or bool(THINK_BLOCK.match(text))
        return Answer(THINK_BLOCK.sub("", text, count=1), done_reason, tokens, generation_ns, thought)


class ServerSaid(Exception):
    """A server's error answer, for the APIs spoken over httpx (the official client raises its
    own, ollama.ResponseError): its status (-1 for an error in the middle of an answer), its
    message, and how long it asked us to wait (Retry-After), if it did."""

    def __init__(self, status: int, error: str, retry_after: float = 0.0) -> None:
        super().__init__(error)
        self.status_code = status
        self.error = error
        self.retry_after = retry_after


class Api:
    """What differs between the servers' APIs, behind one interface: the settings it reads,
    its clients, listing the models, the check before any image is sent, one caption request,
    and the words its errors are told in. The rest of the run never asks which API it talks to:
    another API is another subclass in APIS."""

    name: ClassVar[str]  # the value of --api
    server_kind: ClassVar[str]  # how messages name one of its servers: "Ollama server"
    said_by: ClassVar[str]  # who speaks in an error message: "Ollama answered 401"
    reached_as: ClassVar[str]  # "cannot reach Ollama at URL"
    start_advice: str  # what to do when nothing listens at its address (a node's own: NODE_SERVER_ADVICE)
    answers_like: ClassVar[str]  # "does not answer like an Ollama server"
    key_advice: ClassVar[str]  # where the key a 401 asks for is taken from
    answer_format: ClassVar[str]  # what its answers are written in: "Ollama's JSON"
    refused_advice: ClassVar[str]  # said after "refuses this client" of a 403
    # The fix when image, prompt and answer do not fit the context; "" for the --num-ctx one.
    context_fix: ClassVar[str] = ""
    # What the API says of the model, where it says it (Ollama's /api/show): it can think, its
    # architecture, the values its "think" takes (thinking.values, PR #18473); empty when unknown.
    thinks = False
    architecture = ""
    thinking_values: tuple = ()
    # The answer to the preflight's picture, where one is sent (OpenAI-compatible): paid for.
    probe_answer: Answer | None = None
    # Whether its requests carry a system message (--system); one that cannot refuses it.
    sends_system: ClassVar[bool] = False
    one_at_a_time_causes: ClassVar[str]  # why one of its servers may answer one request at a time

    def __init__(self, url: str, timeout: float, key: str = "") -> None:
        self.url = url
        self.key = key
        self.timeout = timeout
        self.open_clients(timeout)

    def open_clients(self, timeout: float) -> None:
        # A client waits forever by default. A queued request gets no byte until a slot frees,
        # so the read timeout of a caption request must be generous; connecting, and the calls
        # that load no model, need not be.
        self.patient = httpx.Timeout(timeout, connect=min(timeout, QUICK_TIMEOUT))
        caption_deadline = Transport(
            self.url,
            DEADLINE_TIMEOUTS * timeout,
            f" ({DEADLINE_TIMEOUTS} times --timeout); raise --timeout if it is only slow",
        )
        quick_deadline = Transport(
            self.url, DEADLINE_TIMEOUTS * QUICK_TIMEOUT, ", for a call that loads no model"
        )
        self.client = self.connect(self.patient, caption_deadline)
        self.quick = self.connect(QUICK_TIMEOUT, quick_deadline)

    def __getstate__(self) -> dict:
        # Sent to --ray workers as the preflight left it: its clients are opened there again.
        return {key: value for key, value in vars(self).items() if key not in ("client", "quick", "patient")}

    def __setstate__(self, state: dict) -> None:
        import_run_libraries()  # a process that only unpickles it (Ray Client's server) has not
        vars(self).update(state)
        self.open_clients(self.timeout)

    @classmethod
    def settings(cls, args: argparse.Namespace) -> dict:
        """The run's settings that depend on the API: the servers' addresses, the model, the
        key; an option the API cannot honour is refused with the reason, never ignored."""
        raise NotImplementedError

    @classmethod
    def options_to_send(cls, given: dict) -> dict:
        """--option (key: its value as typed) as this API sends it, and as the pass knows it; raise
        CannotStart for one it cannot send. An API with no place for them refuses them all: they
        would be dropped."""
        if given:
            raise CannotStart(f"--option: the {cls.name} API has no place for model options; run without it")
        return given

    def connect(self, timeout: Any, transport: Transport) -> Any:
        """A client of this API. Redirects are not followed: httpx turns a POST into a GET when
        it follows a 301 or 302 (as browsers do), so a caption request would arrive as no
        request at all; the status is reported instead."""
        SECRETS.add(self.key, "API key")
        key = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=key, transport=transport)

    def models(self) -> list[dict]:
        """The models the server has, each {"name": ..., "owner": ...}; asked with the quick
        client. Raises what the client raises."""
        raise NotImplementedError

    def preflight(self, server: Server, config: Config, reporter: Reporter, stop: Stop) -> str:
        """Before any image is sent: the server answers, has the model, and the model can see.
        Returns why the server does not answer (or ""); raises CannotStart for the model."""
        raise NotImplementedError

    def request(self, server: Server, config: Config, task: Task, seed: int | None) -> Answer:
        """Send one image; return the model's whole answer. Raises what the client raises, or
        TryFailed."""
        raise NotImplementedError

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn every way a server or connection can fail into a TryFailed with its fault. The
        clients raise (ollama 0.6.3, _client.py; httpx): the error answer's exception (status
        -1 for an error mid-stream), the builtin ConnectionError or httpx.ConnectError when
        nothing listens, other httpx errors for timeouts and broken connections, ValueError
        for undecodable JSON and pydantic's validation errors."""
        try:
            yield
        except (*answer_errors(), ConnectionError, httpx.HTTPError, ValueError) as exc:
            raise classified(exc, self) from None

    def first_contact(self, server: Server, listing: Callable[[], Any]) -> tuple[Any, str]:
        """The server's first answer (listing()), or why it gave none, in this API's words."""
        try:
            with self.errors():
                return listing(), ""
        except TryFailed as failure:
            server.down_sign = down_sign(failure)
            if failure.fault is Fault.SERVER_DOWN and failure.cause:
                return None, f"cannot reach {self.reached_as} {self.url}: {failure.cause}"
            if failure.fault is Fault.SERVER_DOWN:
                return None, f"cannot reach {self.reached_as} {self.url}; {self.start_advice}"
            # Silence (a wrong port, an SSH server, a stuck proxy) is told from an answer, which
            # says what it says: a 500 or a 301 comes in milliseconds.
            if failure.fault is Fault.SERVER_STRUGGLING and not failure.status:
                return None, (
                    f"{self.url} accepts connections but sent no answer in {QUICK_TIMEOUT:g}s: "
                    f"is it {self.said_by}?"
                )
            # No other server would let us in either, nor would a spent quota come back by waiting.
            if failure.fault in (Fault.ACCESS_DENIED, Fault.QUOTA_SPENT):
                raise CannotStart(f"{self.url}: {failure}") from None
            return None, f"{self.url} does not answer like {self.answers_like}: {failure}"

    def close(self) -> None:
        self.client.close()
        self.quick.close()


def answer_errors() -> tuple[type[Exception], ...]:
    """The exceptions that carry a server's error answer: its status and message."""
    return (ollama.ResponseError, ServerSaid)


class OllamaApi(Api):
    """Ollama's own API (/api/chat), through the official client: NDJSON streaming, num_ctx and
    keep_alive, /api/show for what a model can do, /api/pull."""

    name = "ollama"
    server_kind = "Ollama server"
    said_by = "Ollama"
    reached_as = "Ollama at"
    start_advice = "start it with 'ollama serve' or point --host (or OLLAMA_HOST) at it"
    answers_like = "an Ollama server"
    answer_format = "Ollama's JSON"
    key_advice = "OLLAMA_API_KEY"
    refused_advice = " (check OLLAMA_ORIGINS or the proxy)"
    sends_system = True
    one_at_a_time_causes = (
        "OLLAMA_NUM_PARALLEL may have fallen back to 1 for lack of memory (ollama/ollama#17556), or the "
        "model runs one at a time (as every model does on Ollama's MLX engine)"
    )

    def __init__(self, url: str, timeout: float, key: str = "") -> None:
        super().__init__(url, timeout)
        self.thinks = False  # the model can think (its /api/show capabilities say so)
        self.thinking: Thinking | None = None  # the values "think" takes, where /api/show says
        self.think: bool | str | None = None  # what each request sends as "think" (None: nothing)

    @property
    def thinking_values(self) -> tuple:  # type: ignore[override]
        return self.thinking.values if self.thinking else ()

    @classmethod
    def settings(cls, args: argparse.Namespace) -> dict:
        if args.api_key_env:
            raise CannotStart(
                "--api-key-env is for --api openai; Ollama's client reads OLLAMA_API_KEY itself"
            )
        for option, value in (("--provider", args.provider != "auto"), ("--detail", args.detail)):
            if value:
                raise CannotStart(f"{option} is for --api openai, the API of the hosted services")
        given = args.hosts or [os.environ.get("OLLAMA_HOST") or DEFAULT_HOST]
        source = "--host" if args.hosts else "OLLAMA_HOST"
        return {
            "hosts": server_urls(given, source, ollama_port=True),
            "model": args.model or DEFAULT_MODEL,
            "keep_alive": DEFAULT_KEEP_ALIVE if args.keep_alive is None else args.keep_alive,
            "num_ctx": args.num_ctx or DEFAULT_NUM_CTX,
        }

    @classmethod
    def options_to_send(cls, given: dict) -> dict:
        for key, value in given.items():
            why = ollama_option_refusal(key, value)
            if why:
                raise CannotStart(f"--option {option_text(key, value)}: {why}")
        return {key: in_ollamas_type(key, value) for key, value in given.items()}

    def connect(self, timeout: Any, transport: Transport | None = None) -> ollama.Client:
        SECRETS.add(os.environ.get("OLLAMA_API_KEY", ""), "API key")  # the client sends it if set
        transport = transport or Transport(self.url)
        return ollama.Client(host=self.url, timeout=timeout, transport=transport, follow_redirects=False)

    def models(self) -> list[dict]:
        return [{"name": model.model, "owner": ""} for model in self.quick.list().models]

    def preflight(self, server: Server, config: Config, reporter: Reporter, stop: Stop) -> str:
        server.model = config.model
        _, trouble = self.first_contact(server, self.quick.list)
        if trouble:
            return trouble
        details, self.thinking = self.show_model(config, reporter, stop)
        if not can_see(details):
            raise CannotStart(
                f"model {config.model} on {self.url} cannot see images (it lacks the 'vision' capability); "
                "choose a vision model such as llava"
            )
        self.thinks = "thinking" in (details.capabilities or []) or self.thinking is not None
        self.think = self.think_to_send(config)
        architecture = str((details.modelinfo or {}).get("general.architecture", ""))
        self.architecture = architecture
        if config.jobs > 1 and architecture.startswith(ONE_AT_A_TIME):
            reporter.one_at_a_time(config.model, architecture, self.url, config.jobs)
            server.turns.watching = False  # said already, with the cause
        if self.think not in (False, None) and not (config.think or config.think_level):
            reporter.cannot_stop_thinking(config.model, self.url, self.think)
        for key in sorted(config.model_options.keys() & OLLAMA_DEPRECATED_OPTIONS.keys()):
            reporter.option_deprecated(key, OLLAMA_DEPRECATED_OPTIONS[key], self.url)
        return ""

    def think_to_send(self, config: Config) -> bool | str | None:
        """What each request sends as "think": nothing to a model that cannot think, else what
        the run asks for in the values the model takes (thinking off where it can be)."""
        option = "--think-level" if config.think_level else "--think"
        if not self.thinks:
            if config.think or config.think_level:
                # Ollama answers every such request 400 "... does not support thinking".
                raise CannotStart(f"model {config.model} on {self.url} cannot think; run without {option}")
            return None
        if self.thinking is None:  # an Ollama before PR #18473: its capabilities alone, as always
            if config.think_level:
                raise CannotStart(
                    f"{self.url} does not say which thinking levels {config.model} takes (Ollama shows them "
                    "since September 2026, PR #18473): update Ollama, or run with --think instead"
                )
            return config.think
        think = self.thinking.asked(config.think, config.think_level)
        if think is None:
            raise CannotStart(
                f"model {config.model} on {self.url} takes no thinking level {config.think_level}: "
                f"{self.thinking.named()}"
            )
        return think

    def show_model(self, config: Config, reporter: Reporter, stop: Stop) -> tuple[Any, Thinking | None]:
        try:
            with self.errors():
                return self.show(config.model)
        except TryFailed as failure:
            if failure.fault is not Fault.MODEL_GONE:
                raise CannotStart(f"{self.url} could not show model {config.model}: {failure}") from None
            if not config.pull:
                raise CannotStart(
                    f"model {config.model} is not on {self.url}; run 'ollama pull {config.model}' or add --pull"
                ) from None
        self.pull_model(config.model, reporter, stop)
        try:
            with self.errors():
                return self.show(config.model)
        except TryFailed as failure:
            raise CannotStart(f"{self.url} could not show model {config.model}: {failure}") from None

    def show(self, model: str) -> tuple[Any, Thinking | None]:
        """The model's /api/show: what the official client reads of it (an ollama.ShowResponse,
        validated as the client validates it), and how the model takes "think". The client's
        ShowResponse (0.6.3) drops "thinking" (PR #18473, 2026-09-15), so this one request is sent
        by the httpx.Client the ollama client itself sends with (BaseClient._client in
        ollama/_client.py, 0.6.0 to 0.6.3: its transport, timeouts, headers and OLLAMA_API_KEY), and
        an error answer is a ServerSaid, as ResponseError would be (its error, its status)."""
        response = self.quick._client.post("/api/show", json={"model": model})
        if not response.is_success:
            raise ServerSaid(response.status_code, error_said(response), retry_after(response))
        shown = response.json()
        if not isinstance(shown, dict):
            raise ValueError("no JSON object")  # noqa: TRY004 - what the client raises for bad JSON
        return ollama.ShowResponse.model_validate(shown), Thinking.shown(shown)

    def pull_model(self, model: str, reporter: Reporter, stop: Stop) -> None:
        try:
            # No deadline: a pull of gigabytes takes as long as the network does.
            with self.errors(), self.connect(self.patient) as puller:
                for update in puller.pull(model, stream=True):
                    reporter.pulling(model, update.status or "", update.completed, update.total)
                    if stop.asked.is_set():  # a pull takes minutes: it must not outlast a Ctrl-C
                        raise CannotStart(f"interrupted while pulling {model}")
        except TryFailed as failure:
            raise CannotStart(f"could not pull {model}: {failure}") from None
        finally:
            reporter.end_live_line()

    def request(self, server: Server, config: Config, task: Task, seed: int | None) -> Answer:
        message = {"role": "user", "content": task.prompt, "images": [task.payload]}
        options = {**config.options(), **config.model_options}
        options = options if seed is None else {**options, "seed": seed}
        gathered = Gathered(config.max_tokens)
        with self.errors():
            # Streamed, so the read timeout bounds the silence before and between tokens rather
            # than the whole answer, an answer cut off mid-way is told from a complete one, and a
            # looping answer can be stopped as it loops.
            stream = self.client.chat(
                model=server.model,
                messages=[*system_messages(config, task), message],
                stream=True,
                options=options,
                keep_alive=config.keep_alive,  # resets the unload timer with every request
                # Since Ollama 0.12.4 a model that can think does so unless told not to: hundreds of
                # tokens before every caption. Sent only to such models (others answer 400); chosen
                # by the preflight (think_to_send()).
                think=self.think,
            )
            with closing(stream):  # closing the stream hangs up; Ollama then stops generating
                for part in stream:
                    gathered.add(part.message.content or "", part.message.thinking or "")
                    if part.done:
                        refuse_cut_prompt(part.prompt_eval_count or 0, config.num_ctx)
                        answer = gathered.answer(
                            part.done_reason or "", part.eval_count or 0, part.eval_duration or 0
                        )
                        answer.prompt_tokens = part.prompt_eval_count or 0
                        answer.thinking_asked = self.think not in (False, None)
                        return answer
        raise TryFailed(Fault.SERVER_STRUGGLING, "the answer broke off before the model finished")


@dataclass(frozen=True)
class Thinking:
    """How a model takes "think", as Ollama's /api/show says since PR #18473 (merged 2026-09-15):
    "values" are true/false and/or levels of THINK_LEVELS (gemma4: [true, false]; Qwen 3.8: the
    four levels, no false), "default" what the model does when "think" is left out."""

    values: tuple[bool | str, ...]
    default: bool | str | None

    @classmethod
    def shown(cls, answer: dict) -> Thinking | None:
        """None where /api/show says nothing of it (an Ollama before PR #18473) or says it in a
        shape this version does not know: the capabilities decide then, as they did before."""
        said = answer.get("thinking")
        values = said.get("values") if isinstance(said, dict) else None
        if not isinstance(values, list) or not values or not all(isinstance(v, (bool, str)) for v in values):
            return None
        default = said.get("default")
        return cls(tuple(values), default if isinstance(default, (bool, str)) else None)

    @property
    def levels(self) -> list[str]:
        return sorted((value for value in self.values if isinstance(value, str)), key=level_rank)

    def asked(self, think: bool, level: str) -> bool | str | None:
        """The value to send: the level asked for (None when the model does not take it); with
        --think the model's own default; else thinking off, or where the model cannot turn it off
        its lowest level."""
        if level:
            return level if level in self.levels else None
        if think:
            # Its default as it lists it (Qwen 3.8: "high"); else true, as before (Ollama takes a
            # value the model does not list as its default: Thinking.Supports in types/model).
            return self.default if self.default is not False and self.default in self.values else True
        if False in self.values or not self.levels:
            return False
        return self.levels[0]

    def named(self) -> str:
        """The levels the model takes, for a refusal of another."""
        if not self.levels:
            return "it thinks or not, at no level; run with --think instead"
        return f"it takes {', '.join(self.levels)}"


def level_rank(level: str) -> int:
    # A level of no known rank (a later Ollama's) comes after the known ones.
    return THINK_LEVELS.index(level) if level in THINK_LEVELS else len(THINK_LEVELS)


def can_see(details: ollama.ShowResponse) -> bool:
    # Ollama does not refuse images sent to a text model: it ignores them and the model
    # invents a caption (ollama/ollama#7791). "vision" is listed for projector models such as
    # llava only from 0.6.8 (PR #10509): before, capabilities is absent (< 0.6.4) or just
    # ["completion"] (0.6.4-0.6.7), and a vision model shows itself by its "clip" projector
    # family or by <arch>.vision.* keys, as Ollama's own CLI checks (cmd/cmd.go).
    families = (details.details.families if details.details else None) or []
    vision_keys = any(".vision." in key for key in (details.modelinfo or {}))
    return "vision" in (details.capabilities or []) or "clip" in families or vision_keys


# Ollama's options and the type each takes (api/types.go, Options and Runner, v0.33). Options.FromMap
# skips an option it does not know with nothing but a line in the server's log ("invalid option
# provided"), so one mistyped would be lost without a word: it is refused. A value of another type
# fails every request (500 `option "top_k" must be of type integer`), and a fraction given for an
# integer is cut: both are refused too.
OLLAMA_OPTION_TYPES = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx"), "integer"),
    **dict.fromkeys(("num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict"), "integer"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty"), "float32"),
    **dict.fromkeys(("presence_penalty", "frequency_penalty"), "float32"),
    "use_mmap": "boolean",
    "stop": "array",
}
# Options a flag sets (and request fields that are no options): given as --option, refused with
# the flag's name, so that the flag and the option never disagree.
OLLAMA_SET_BY_FLAGS = {
    "num_ctx": "set it with --num-ctx",
    "num_predict": "set it with --max-tokens",
    "temperature": "set it with --temperature",
    "seed": "set it with --seed",
    "keep_alive": "set it with --keep-alive",
    "think": "set it with --think",
}
# Sent as given, with a warning: Ollama 0.35 deprecated typical_p (its release notes).
OLLAMA_DEPRECATED_OPTIONS = {"typical_p": "Ollama 0.35"}
# What the types hold. Options.FromMap converts a JSON number (a float64) with int64() for an
# integer option, whose result beyond 2**63 the Go spec leaves to the implementation, and with
# reflect's SetFloat for a float32 one, which makes a number beyond float32's largest
# (3.4028235e38) infinite. Whole numbers past 2**53 already lose digits as a float64; no option of
# Ollama's means anything near either bound.
OLLAMA_INTEGER_LIMIT = 2**63
FLOAT32_MAX = 3.4028234663852886e38


def ollama_option_refusal(key: str, value: Any) -> str:
    """Why Ollama would not take --option key=value as given, or ""."""
    if key in OLLAMA_SET_BY_FLAGS:
        return OLLAMA_SET_BY_FLAGS[key]
    kind = OLLAMA_OPTION_TYPES.get(key)
    if kind is None:
        known = sorted(name for name in OLLAMA_OPTION_TYPES if name not in OLLAMA_SET_BY_FLAGS)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (
            "Ollama has no such option and would skip it, saying so only in its log; "
            f"{hint}its options: {', '.join(known)}"
        )
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("integer", "float32") and not number:
        return not_a_number_refusal(key, value, kind)
    if kind == "integer" and abs(value) >= OLLAMA_INTEGER_LIMIT:
        return "it takes a whole number under 2**63 (Go's int, which Ollama keeps it in), and over -2**63"
    if kind == "integer" and isinstance(value, float) and not value.is_integer():
        return f"it takes a whole number: Ollama would cut {value} to {int(value)}"
    if kind == "float32" and abs(value) > FLOAT32_MAX:
        return (
            "it is beyond float32's range (3.4e38 either side of 0), which Ollama keeps it in: it would be "
            "infinity"
        )
    if kind == "boolean" and not isinstance(value, bool):
        return "it takes true or false"
    if kind == "array" and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        return f"""it takes a JSON list of strings, such as {key}='["###"]'"""
    return ""


def not_a_number_refusal(key: str, value: Any, kind: str) -> str:
    """Why a numeric option's value that JSON did not read as a number is refused: a number in
    another spelling (.9, +5, 1., a decimal comma) is told JSON's."""
    text = value if isinstance(value, str) else ""
    number = python_number(text)
    # One comma is a decimal comma (1,1), unless three digits follow it: 1,000 may be a thousand.
    decimal_comma = text.count(",") == 1 and not re.search(r",\d{3}$", text)
    with_point = python_number(text.replace(",", ".")) if decimal_comma else None
    if number is not None and not math.isfinite(number):
        return "not a finite number"  # NaN, Infinity, as Python spells them
    if number is not None:
        return f"write numbers as JSON does: {key}={json_spelling(number, kind)}"
    if with_point is not None and math.isfinite(with_point):
        return f"write numbers as JSON does, with a decimal point: {key}={json_spelling(with_point, kind)}"
    if python_number(text.replace(",", "")) is not None:
        return "write numbers as JSON does, with a decimal point and no thousands separator (1000, 1.5)"
    return f'it takes a number; Ollama would answer every request: option "{key}" must be of type {kind}'


def python_number(text: str) -> float | None:
    """text as Python reads a number (which JSON may not: .9, +5, 1., 1_000), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def json_spelling(number: float, kind: str) -> str:
    return str(int(number)) if kind == "integer" and number.is_integer() else json.dumps(number)


def in_ollamas_type(key: str, value: Any) -> Any:
    """An option's value in the type Ollama keeps it in (api/types.go): 40.0 for top_k is 40, 1
    for repeat_penalty is 1.0, one value to Ollama and so one value sent and one pass."""
    kind = OLLAMA_OPTION_TYPES.get(key)
    if kind == "integer":
        return int(value)
    if kind == "float32":
        return float(value)
    return value


def option_text(key: str, value: Any) -> str:
    """--option as given: KEY=VALUE, the value as text, or as JSON where it parsed."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def system_messages(config: Config, task: Task) -> list[dict]:
    """--system for this image, as the first message (role "system", on both APIs). Sent first, it
    takes the place of the SYSTEM of an Ollama model's Modelfile, which Ollama adds only before a
    conversation that does not start with one (server/routes.go, ChatHandler)."""
    if not config.system.text:
        return []
    return [{"role": "system", "content": config.system.fill(task.image, task.existing)}]


class OpenAiApi(Api):
    """The OpenAI-compatible API (POST /v1/chat/completions, streamed as server-sent events) of
    vLLM, SGLang, llama.cpp's llama-server, LM Studio and Ollama's /v1: a few dozen lines over
    httpx, which the ollama client brings anyway (docs/development.md, "Dependencies")."""

    name = "openai"
    server_kind = "server"
    said_by = "the server"
    reached_as = "a server at"
    start_advice = "start it, or point --host (or OPENAI_BASE_URL) at it"
    answers_like = "an OpenAI-compatible server (GET /v1/models)"
    answer_format = "the API's JSON"
    key_advice = "the key in OPENAI_API_KEY or --api-key-env"
    refused_advice = " or key"
    sends_system = True
    one_at_a_time_causes = (
        "it may have one slot (llama-server -np 1; Ollama's OLLAMA_NUM_PARALLEL, which falls back to 1 for "
        "lack of memory: ollama/ollama#17556), or run the model one at a time"
    )
    context_fix = (
        "image, prompt and --max-tokens do not fit the model's context: start the server with a longer one "
        "(vLLM --max-model-len, llama-server -c, SGLang --context-length) or lower --max-tokens"
    )

    def __init__(self, url: str, timeout: float, key: str = "") -> None:
        super().__init__(url, timeout, key)
        self.thinking_off: dict = {}  # what this server reads as "do not think"
        self.prefix = "/v1"  # where the API lives: a hosted provider's path (Gemini's /v1beta/openai)
        self.provider: Provider | None = None
        # A field of the captioner's own that the server refused in the preflight, and what it is
        # sent as for the rest of the run: another name, or None for not at all.
        self.adapted: dict[str, str | None] = {}
        self.adapting = False  # the preflight's probe: a refusal naming a field is adapted to
        self.reasoning: dict = {}  # a hosted provider's reasoning field: thinking off, or --think-level

    @classmethod
    def settings(cls, args: argparse.Namespace) -> dict:
        refused = {
            "--num-ctx": (
                args.num_ctx,
                "the context is set as the server starts (vLLM --max-model-len, llama-server -c)",
            ),
            "--keep-alive": (args.keep_alive, "the server keeps its model loaded as long as it runs"),
            "--pull": (args.pull or None, "the server loads the model it was started with"),
        }
        for option, (value, why) in refused.items():
            if value is not None:
                raise CannotStart(f"{option} is Ollama's: {why}; run without {option}")
        # Never OLLAMA_HOST: an OpenAI-compatible server is another server.
        given = args.hosts or [os.environ.get("OPENAI_BASE_URL", "")]
        if not given[0] and args.dry_run:  # sends nothing: needs no server
            given = []
        elif not given[0]:
            raise CannotStart(
                "--api openai needs the server's address: --host http://HOST:PORT (or OPENAI_BASE_URL)"
            )
        hosts = server_urls(given, "--host" if args.hosts else "OPENAI_BASE_URL", ollama_port=False)
        provider = hosted_provider(hosts, args.provider)
        if args.think_level and not (provider and args.think_level in provider.levels):
            raise CannotStart(think_level_refusal(provider, args.think_level))
        if args.detail and not (provider and provider.detail):
            where = provider.title if provider else "a server of your own"
            raise CannotStart(
                f"--detail is OpenAI's image_url.detail, which {where} is not known to take; run without it"
            )
        return {
            "hosts": [hosted_root(url, provider) for url in hosts] if provider else hosts,
            "model": args.model or "",
            "api_key": api_key(args, provider),
            "num_ctx": 0,
            "provider": provider.name if provider else "",
            "detail": args.detail or "",
        }

    @classmethod
    def options_to_send(cls, given: dict) -> dict:
        for key, value in given.items():
            if key in OPENAI_SET_BY_THE_CAPTIONER:
                raise CannotStart(f"--option {option_text(key, value)}: {OPENAI_SET_BY_THE_CAPTIONER[key]}")
        # As typed: a field's type is the server's (vLLM's top_k is an int, llama-server's a number),
        # which no API of theirs tells, so 40 and 40.0 are two values and two passes.
        return given

    def models(self) -> list[dict]:
        response = self.quick.get(f"{self.prefix}/models")
        if response.status_code != 200:
            raise ServerSaid(response.status_code, error_said(response), retry_after(response))
        listed = response.json()
        entries = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(entries, list):
            raise ValueError("no list of models")  # noqa: TRY004 - what the client raises for bad JSON
        return [
            {"name": str(entry.get("id")), "owner": str(entry.get("owned_by", ""))}
            for entry in entries
            if isinstance(entry, dict)
        ]

    def preflight(self, server: Server, config: Config, reporter: Reporter, stop: Stop) -> str:
        """It answers GET /v1/models, serves the model, and the model takes a picture. No API of
        these servers says whether a model can see, so a small picture is sent (64 px a side:
        some vision encoders crash the runner on tinier ones). It loads the model, which can
        take minutes, so it may take up to --timeout."""
        self.provider = PROVIDERS.get(config.provider)
        self.prefix = self.provider.path if self.provider else "/v1"
        served, trouble = self.first_contact(
            server, lambda: patiently(self.models, server, config, reporter, stop)
        )
        if trouble:
            return trouble
        server.model = self.served_model(config, [model["name"] for model in served])
        if self.provider:
            return self.hosted_preflight(server, config, reporter, stop)
        ollama_v1 = self.is_ollama()
        self.refuse_options_passed_over(config, {model["owner"] for model in served}, ollama_v1)
        host = urlsplit(self.url).hostname or ""
        if (
            config.api_key
            and self.url.startswith("http://")
            and host not in ("127.0.0.1", "::1", "localhost")
        ):
            reporter.key_unencrypted(self.url)
        # Each server has its own switch for thinking: vLLM, SGLang and llama-server read the
        # chat template's enable_thinking; Ollama's /v1 reads only reasoning_effort "none",
        # which vLLM would refuse.
        self.thinking_off = {"chat_template_kwargs": {"enable_thinking": False}}
        if ollama_v1:
            self.thinking_off = {"reasoning_effort": "none"}
            self.refuse_blind_ollama_model(server.model)
            reporter.ollama_behind_openai(self.url)
        probe = probe_task()
        try:
            self.probe_answer = patiently(
                lambda: self.send(server, config, probe, None, max_tokens=1),
                server,
                config,
                reporter,
                stop,
                paced=True,
            )
        except TryFailed as failure:
            if failure.fault in (Fault.SERVER_DOWN, Fault.CONNECTION_BROKE):
                return f"{self.url} stopped answering when asked to look at a picture: {failure}"
            raise CannotStart(probe_refused(failure, server, self.url, config)) from None
        return ""

    def hosted_preflight(self, server: Server, config: Config, reporter: Reporter, stop: Stop) -> str:
        """A hosted provider is sent the standard fields alone, thinking set in its own words. A
        model may still refuse one of them (OpenAI's reasoning models: max_tokens, a temperature
        but 1; the others: reasoning_effort): the probe picture meets that refusal, once per
        field, and the run sends the field as the server asked from then on, so no image does.
        What the user asked for is never dropped: it stops the run in the provider's words."""
        provider = self.provider
        assert provider is not None  # preflight() calls this for a provider only
        effort = provider.levels.get(config.think_level) if config.think_level else None
        effort = effort or (None if config.think else provider.thinking_off)
        self.thinking_off = {}
        self.reasoning = self.effort_sent(effort)  # None for --think: the model's default
        probe = probe_task()
        self.adapting = True
        try:
            for _ in range(len(HOSTED_ADAPTABLE) + 1):
                try:
                    patiently(
                        lambda: self.send(server, config, probe, None, max_tokens=1),
                        server,
                        config,
                        reporter,
                        stop,
                    )
                    return ""
                except Refusal as refusal:
                    self.adapt(refusal, config, reporter, server.model)
        except TryFailed as failure:
            if failure.fault in (Fault.SERVER_DOWN, Fault.CONNECTION_BROKE):
                return f"{self.url} stopped answering when asked to look at a picture: {failure}"
            raise CannotStart(probe_refused(failure, server, self.url, config)) from None
        finally:
            self.adapting = False
        raise CannotStart(f"{provider.title} refused every way of asking {server.model} for a caption")

    def adapt(self, refusal: Refusal, config: Config, reporter: Reporter, model: str) -> None:
        """Send a refused field as the server asked, for the rest of the run; CannotStart where
        the user gave it, or where it was refused before."""
        given = {
            **dict.fromkeys(config.model_options, "--option"),
            **({"temperature": "--temperature"} if config.temperature is not None else {}),
        }
        if config.think_level and self.provider:
            given[self.provider.effort_field] = "--think-level"
        least = next((effort for effort in EFFORTS_LEAST_FIRST if effort in refusal.values), None)
        if refusal.name in given or refusal.name in self.adapted or refusal.name not in HOSTED_ADAPTABLE:
            asked = f" ({given[refusal.name]})" if refusal.name in given else ""
            raise CannotStart(f"{self.url} refuses {refusal.name}{asked} for {model}: {refusal.said}")
        if refusal.values and (least is None or least == self.reasoning_effort()):
            raise CannotStart(f"{self.url} refuses {refusal.name} for {model}: {refusal.said}")
        if refusal.values:  # thinking off, as the least effort this model takes
            self.reasoning = self.effort_sent(least)
            reporter.value_adapted(self.url, refusal.name, least)
            return
        self.adapted[refusal.name] = refusal.instead
        reporter.field_adapted(self.url, refusal.name, refusal.instead)

    def effort_sent(self, effort: str | None) -> dict:
        """The reasoning field in the provider's words: none for --think (the model's default)."""
        assert self.provider is not None
        if effort is None:
            return {}
        if self.provider.effort_field == "reasoning":
            return {"reasoning": {"effort": effort}}
        return {self.provider.effort_field: effort}

    def reasoning_effort(self) -> str | None:
        effort = self.reasoning.get("reasoning")
        return effort.get("effort") if isinstance(effort, dict) else self.reasoning.get("reasoning_effort")

    def refuse_options_passed_over(self, config: Config, owners: set[str], ollama_v1: bool) -> None:
        """Refuse an --option the server is known to pass over without a word. Ollama's /v1 reads
        only the fields of its ChatCompletionRequest (openai/openai.go; Go's encoding/json skips
        the others); vLLM has no field for most of Ollama's options, and ignores a field it does
        not know, saying so only in its log (OpenAIBaseModel.__log_extra_fields__,
        vllm/entrypoints/openai/protocol.py). Of any other field a server does not read, no
        server says a word in its answer: that goes unnoticed (docs/servers-and-models.md)."""
        if ollama_v1:
            dropped = [key for key in config.model_options if key not in OLLAMA_V1_FIELDS]
            if dropped:
                raise CannotStart(
                    f"{self.url} is Ollama, whose OpenAI-compatible API would pass over --option "
                    f"{', '.join(dropped)} without a word: run with --api ollama, where Ollama's options go"
                )
        elif "vllm" in owners:  # vLLM's model cards say owned_by "vllm" (ModelCard)
            for key in config.model_options:
                if key in OLLAMA_OPTION_TYPES and key not in VLLM_READS_TOO:
                    spelt = "; vLLM spells it repetition_penalty" if key == "repeat_penalty" else ""
                    raise CannotStart(
                        f"{self.url} is vLLM, which has no field {key} (an option of Ollama's) and would "
                        f"pass over it, saying so only in its log{spelt}"
                    )

    def served_model(self, config: Config, names: list[str]) -> str:
        """The model the run asks for: the one named, which the server must serve, or else the
        one model it serves."""
        listed = ", ".join(names) or "none"
        if not config.model and len(names) != 1:
            raise CannotStart(f"{self.url} serves {len(names)} models ({listed}): choose one with --model")
        if config.model and config.model not in names:
            raise CannotStart(f"{self.url} does not serve {config.model}; it serves: {listed}")
        if not config.model and SECRETS.found_in(names[0]):  # it would name the captions' model
            raise CannotStart(
                f"{self.url} names its one model with the {SECRETS.found_in(names[0])} sent to it"
            )
        return config.model or names[0]

    def is_ollama(self) -> bool:
        # Ollama answers GET /api/version with its version; the other servers with 404 (LM
        # Studio: 200 and an error body).
        try:
            answer = self.quick.get("/api/version")
            return answer.status_code == 200 and isinstance(answer.json().get("version"), str)
        except (httpx.HTTPError, ValueError, AttributeError, TryFailed):  # TryFailed: a bound broken
            return False

    def refuse_blind_ollama_model(self, model: str) -> None:
        """Ollama does not refuse a picture sent to a model that cannot see (the probe would
        pass): its own /api/show says whether the model can."""
        ollama_api = OllamaApi(self.url, QUICK_TIMEOUT)
        try:
            with ollama_api.errors():
                details = ollama_api.quick.show(model)
        except TryFailed:
            return  # the probe picture and the run say what is wrong
        finally:
            ollama_api.close()
        if not can_see(details):
            raise CannotStart(
                f"model {model} on {self.url} cannot see images (it lacks the 'vision' capability); "
                "choose a vision model such as llava"
            )

    def request(self, server: Server, config: Config, task: Task, seed: int | None) -> Answer:
        return self.send(server, config, task, seed, config.max_tokens)

    def send(self, server: Server, config: Config, task: Task, seed: int | None, max_tokens: int) -> Answer:
        image_url = {"url": data_uri(task.payload), **({"detail": config.detail} if config.detail else {})}
        content = [{"type": "text", "text": task.prompt}, {"type": "image_url", "image_url": image_url}]
        body = {
            # The server's own top-level fields (--option), in its words: vLLM's repetition_penalty,
            # top_k, min_p. None of the fields below: refuse_options() refused those.
            **config.model_options,
            "model": server.model,
            "messages": [*system_messages(config, task), {"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,  # the one limit every server reads (Ollama's /v1 reads only it)
            "temperature": OPENAI_TEMPERATURE if config.temperature is None else config.temperature,
            **({} if seed is None else {"seed": seed}),
            **({} if config.think else self.thinking_off),
        }
        if self.provider:
            body = self.hosted_body(body)
        gathered = Gathered(max_tokens)
        started = time.monotonic()
        finish, usage = "", Usage()
        with (
            self.errors(),
            self.client.stream("POST", f"{self.prefix}/chat/completions", json=body) as response,
        ):
            server.pacer.heard(rate_limits(response.headers))
            if response.status_code != 200:
                said = error_said(response)
                refusal = self.refusal(said) if self.adapting and response.status_code == 400 else None
                if refusal:
                    raise refusal
                raise ServerSaid(response.status_code, said, retry_after(response))
            if not response.headers.get("content-type", "").lower().startswith("text/event-stream"):
                raise ServerSaid(-1, error_message(response.read()))  # LM Studio: an error body with 200
            for line in response.iter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if data == "[DONE]":
                    break
                if data:  # else a comment, a keep-alive or the blank line between events
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict) or chunk.get("error"):  # an error mid-answer
                        raise ServerSaid(-1, error_message(data.encode()))
                    finish = stream_choice(chunk, gathered) or finish
                    usage = Usage.of(chunk) or usage
        if not finish:
            raise TryFailed(Fault.SERVER_STRUGGLING, "the answer broke off before the model finished")
        # No server says how long it generated: the time from sending to the end stands in for it.
        spent = int((time.monotonic() - started) * 1e9)
        answer = gathered.answer("length" if finish == "length" else "stop", usage.completion, spent)
        answer.prompt_tokens, answer.reasoning_tokens = usage.prompt, usage.reasoning
        if finish == "content_filter":
            # A hosted provider's filter withheld the answer (finish_reason "content_filter":
            # platform.openai.com/docs/api-reference/chat/object; Azure OpenAI's filter the same).
            # It says so again for the same picture, and every try is paid for.
            refused = TryFailed(Fault.REQUEST_REFUSED, CONTENT_FILTERED)
            refused.spent = answer
            raise refused
        return answer

    def refusal(self, said: str) -> Refusal | None:
        """What a 400 of the probe says the server does not take: a field, or the reasoning effort
        sent (with the efforts it does take); None for any other 400."""
        field_refused = refused_field(said)
        if field_refused:
            return Refusal(*field_refused, said)
        value = refused_value(said)
        if not (self.provider and value) or value[1] != self.reasoning_effort():
            return None
        if value[0] not in (None, self.provider.effort_field):
            return None
        return Refusal(self.provider.effort_field, None, said, value[2])

    def hosted_body(self, body: dict) -> dict:
        """Today's body in the provider's words: its token limit's field, thinking as preflight
        set it (already in), and each field the preflight adapted sent as the server asked."""
        assert self.provider is not None  # send() calls this for a provider only
        sent = {key: value for key, value in body.items() if key != "max_tokens"}
        sent[self.provider.limit_field] = body["max_tokens"]
        sent.update(self.reasoning)
        for name, instead in self.adapted.items():
            if name in sent:
                value = sent.pop(name)
                if instead:
                    sent[instead] = value
        return sent


class Refusal(Exception):
    """A 400 of the preflight's probe naming a field the server does not take, or a value of it
    with the values it does take (not a TryFailed: the preflight adapts to it)."""

    def __init__(self, name: str, instead: str | None, said: str, values: tuple[str, ...] = ()) -> None:
        super().__init__(said)
        self.name, self.instead, self.said, self.values = name, instead, said, values


# What the captioner sends of its own and may send otherwise, when a server refuses it: by
# another name (OpenAI's reasoning models: max_completion_tokens), or not at all (the default
# temperature; reasoning_effort to a model that does not reason, which has nothing to turn off).
HOSTED_ADAPTABLE = ("max_tokens", "temperature", "reasoning_effort", "reasoning", "seed", "stream_options")
# OpenAI's words for a field or value a model does not take (platform.openai.com error codes;
# TutteInstitute/toponymy#148, koosoli/ESPHomeDesigner#379): the field, and its other name.
REFUSED_FIELD = (
    (re.compile(r"Unrecognized request argument supplied: (\w+)"), None),
    (re.compile(r"Unsupported parameter: '(\w+)' is not supported with this model\. Use '(\w+)' instead"), 2),
    (
        re.compile(
            r"Unsupported value: '(\w+)' does not support .* Only the default \(.*\) value is supported"
        ),
        None,
    ),
)


# OpenAI's words for a value a model does not take, with those it does: the value alone ("Invalid
# value: 'none'. Supported values are: ...", GPT-5 and the o-series), with the model ("Unsupported
# value: 'minimal' is not supported with the 'gpt-5.1' model. Supported values are: 'none', ...":
# GPT-5.1 and later, anomalyco/opencode#4451), or with the field (an OpenAI-compatible API refusing
# "none": Kilo-Org/cloud#3807).
REFUSED_VALUE = (
    re.compile(r"Invalid value: '(?P<value>[\w-]+)'\. Supported values are: (?P<values>.*)"),
    re.compile(
        r"Unsupported value: '(?P<value>[\w-]+)' is not supported with the .*Supported values are: (?P<values>.*)"
    ),
    re.compile(
        r"Unsupported value: '(?P<field>\w+)' does not support '(?P<value>[\w-]+)'.*Supported values are: (?P<values>.*)"
    ),
)
# The reasoning efforts of the providers, least first: thinking off is sent as the least a model takes.
EFFORTS_LEAST_FIRST = ("none", "minimal", "low", "medium", "high", "xhigh")


def refused_value(said: str) -> tuple[str | None, str, tuple[str, ...]] | None:
    """The field (where the server names it), the value a server's 400 refuses, and the values it
    says it takes."""
    for pattern in REFUSED_VALUE:
        match = pattern.search(said)
        if match:
            values = tuple(re.findall(r"'([\w-]+)'", match["values"]))
            return match.groupdict().get("field"), match["value"], values
    return None


def probe_refused(failure: TryFailed, server: Server, url: str, config: Config) -> str:
    """Why the picture sent before the run got no caption, told as the model's doing only where
    it is: a spent quota or a server that stayed busy is no fault of the model's."""
    if failure.fault is Fault.QUOTA_SPENT:
        return f"{url}: {failure}"
    if failure.fault is Fault.SERVER_BUSY:
        return f"{url} stayed busy or rate-limited for longer than --wait-server {config.wait_server:g}s: {failure}"
    return f"model {server.model} on {url} cannot take a picture{sent_with(config)}: {failure}"


def refused_field(said: str) -> tuple[str, str | None] | None:
    """The field a server's 400 says it does not take, and the name to send it by instead."""
    for pattern, instead in REFUSED_FIELD:
        match = pattern.search(said)
        if match:
            return match[1], match[instead] if instead else None
    return None


def hosted_provider(hosts: list[str], asked: str) -> Provider | None:
    """The hosted service the servers are: the one --provider names, else the one whose host the
    base URL names (a gateway or proxy in front of one is named with --provider). A hosted service
    is reached over https only: its key must not cross the network in the clear (a gateway on
    this machine, at a loopback address, may speak plain http)."""
    by_host = {provider.host: provider.name for provider in PROVIDERS.values()}
    found = {by_host.get(host_of(url), "") for url in hosts}
    provider = PROVIDERS.get(asked) or (PROVIDERS.get(found.pop(), None) if len(found) == 1 else None)
    if asked == "auto" and len(found) > 1:
        raise CannotStart(
            "--host: one run speaks to one kind of server; give the hosts of one provider, or of none"
        )
    for url in hosts if provider else []:
        host = host_of(url)
        if url.startswith("http://") and (host in by_host or host not in ("127.0.0.1", "::1", "localhost")):
            raise CannotStart(
                f"{provider.title} is reached over https only (the API key would cross the network in the "
                f"clear): --host https://{urlsplit(url).netloc}{provider.path}"
            )
    return provider


def host_of(url: str) -> str:
    # "api.openai.com." names the same host as "api.openai.com" (a fully qualified name).
    return (urlsplit(url).hostname or "").rstrip(".")


def hosted_root(url: str, provider: Provider) -> str:
    """The URL the provider's path goes under: its documented base URL (https://openrouter.ai/api/v1)
    or the host alone (https://openrouter.ai) give the same."""
    for suffix in (provider.path, provider.path.removesuffix("/v1")):
        if suffix and url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def think_level_refusal(provider: Provider | None, level: str) -> str:
    if provider is None:
        return (
            "--think-level is Ollama's: an OpenAI-compatible server does not say which thinking levels its model "
            "takes, and each names them its own way (reasoning_effort, chat_template_kwargs); --think lets it "
            "think as it does by default; run without --think-level"
        )
    return (
        f"--think-level {level}: {provider.title}'s {provider.effort_field} has no such level; it takes "
        f"{', '.join(provider.levels)}"
    )


def api_key(args: argparse.Namespace, provider: Provider | None = None) -> str:
    key_name = args.api_key_env or (provider.key_env if provider else "OPENAI_API_KEY")
    if args.api_key_env and args.api_key_env not in os.environ:
        raise CannotStart(f"--api-key-env: the environment variable {args.api_key_env} is not set")
    if provider and not os.environ.get(key_name) and not args.dry_run:
        raise CannotStart(
            f"{provider.title} needs an API key: set {key_name} (or name another variable with --api-key-env)"
        )
    key = os.environ.get(key_name, "")
    if key and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise CannotStart(
            f"the API key in {key_name} holds characters an HTTP header cannot carry (spaces, line breaks, accents)"
        )
    return key


# The top-level fields the captioner sets itself, or a flag does: given as --option, refused with
# the reason, so that the two never disagree.
OPENAI_SET_BY_THE_CAPTIONER = {
    "model": "set it with --model",
    "messages": "the prompt file and --system make the messages",
    "max_tokens": "set it with --max-tokens",
    "max_completion_tokens": "set it with --max-tokens",
    "num_predict": "set it with --max-tokens",
    "temperature": "set it with --temperature",
    "seed": "set it with --seed",
    "stream": "the captioner streams every answer",
    "stream_options": "the captioner streams every answer",
    "n": "the captioner reads one answer per image",
    "chat_template_kwargs": "the captioner turns thinking off with it: set thinking with --think",
    "reasoning_effort": "the captioner turns thinking off with it: set thinking with --think",
    "num_ctx": "the context is set as the server starts (vLLM --max-model-len, llama-server -c)",
}
# The fields of Ollama's /v1 an option may set (openai/openai.go, ChatCompletionRequest).
OLLAMA_V1_FIELDS = frozenset(("top_p", "stop", "frequency_penalty", "presence_penalty", "response_format"))
# Ollama's options that vLLM reads under the same name (vllm/entrypoints/openai/protocol.py,
# ChatCompletionRequest).
VLLM_READS_TOO = frozenset(("top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "stop"))


def sent_with(config: Config) -> str:
    """What of the user's own a request carries (--option, --system), to name it where a server
    refuses the request: " sent with --option top_k=40 and --system", or ""."""
    given = [f"--option {option_text(key, value)}" for key, value in config.model_options.items()]
    given += ["--system"] if config.system.text else []
    if not given:
        return ""
    return " sent with " + (given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}")


# The APIs by the name --api gives them.
APIS: dict[str, type[Api]] = {api.name: api for api in (OllamaApi, OpenAiApi)}


def stream_choice(chunk: dict, gathered: Gathered) -> str:
    """Take in one chunk's choice; its finish_reason, or "". A field of another type than the API's
    is read as absent: servers differ, and one odd chunk must not fail an image."""
    finish = ""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        delta = delta if isinstance(delta, dict) else {}
        # vLLM and Ollama call the thinking "reasoning", llama-server "reasoning_content".
        thinking = delta.get("reasoning") or delta.get("reasoning_content")
        gathered.add(text_of(delta.get("content")), text_of(thinking))
        finish = text_of(choice.get("finish_reason") if isinstance(choice, dict) else None) or finish
    return finish


def text_of(value: object) -> str:
    return value if isinstance(value, str) else ""


def image_tokens(width: int, height: int) -> int:
    """The tokens OpenAI bills for a picture of this size at detail "high" (OPENAI_IMAGE_TOKENS)."""
    facts = OPENAI_IMAGE_TOKENS
    scale = min(1.0, facts["fit"] / max(width, height, 1))
    scale *= min(1.0, facts["shortest"] / max(min(width, height) * scale, 1))
    side = facts["tile_side"]
    tiles = math.ceil(width * scale / side) * math.ceil(height * scale / side)
    return facts["base"] + facts["tile"] * tiles


def text_tokens(text: str) -> int:
    # Some four characters a token in English, as OpenAI's tokenizer guide says (help.openai.com,
    # "What are tokens and how to count them?"): an estimate, as exact as the text is English.
    return math.ceil(len(text) / 4)


def estimated_prompt_tokens(task: Task, config: Config) -> int:
    """A request's prompt tokens before it is sent: its picture as sent (OpenAI's count), its
    prompt and --system."""
    try:
        with Image.open(io.BytesIO(task.payload)) as picture:
            width, height = picture.size
    except (OSError, ValueError):
        width = height = config.max_size
    texts = [task.prompt, *(message["content"] for message in system_messages(config, task))]
    return image_tokens(width, height) + sum(text_tokens(text) for text in texts)


class Usage(NamedTuple):
    """The tokens an OpenAI-compatible answer reports in its last chunk (stream_options
    include_usage): completion_tokens includes the reasoning tokens, which OpenAI details in
    completion_tokens_details.reasoning_tokens (platform.openai.com/docs/api-reference/chat/object,
    "usage"). A field of another type is read as absent."""

    prompt: int = 0
    completion: int = 0
    reasoning: int = 0

    @classmethod
    def of(cls, chunk: dict) -> Usage | None:
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return None
        details = usage.get("completion_tokens_details")
        details = details if isinstance(details, dict) else {}
        counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"), details.get("reasoning_tokens"))
        return cls(*(count if isinstance(count, int) and count >= 0 else 0 for count in counts))


def data_uri(payload: bytes) -> str:
    kind = "png" if payload.startswith(b"\x89PNG") else "jpeg"  # what preparation sends
    return f"data:image/{kind};base64,{base64.b64encode(payload).decode('ascii')}"


def error_message(body: bytes) -> str:
    """The message in an error body, whichever server wrote it: vLLM's flat {"object": "error",
    "message": ...} (before 0.10.1) or nested {"error": {"message": ...}} (also llama-server's and
    Ollama's /v1), LM Studio's {"error": "..."}, Google's list of one [{"error": {...}}] (Gemini's
    endpoint: google-gemini/gemini-cli#4635), or a proxy's text or HTML page."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def error_said(response: httpx.Response) -> str:
    """What an answer with an error status says; a redirect's with where it points, as this
    client follows none."""
    said = error_message(response.read())
    location = response.headers.get("Location")
    return f"{server_message(said)} (to {location})" if response.is_redirect and location else said


def rate_limits(headers: httpx.Headers) -> RateLimits:
    """What a hosted API says of its rate limits with each answer: the requests and tokens its
    window has left and the seconds until each resets (x-ratelimit-remaining-requests, -tokens,
    x-ratelimit-reset-requests, -tokens, a reset as a duration such as "1s", "6m0s", "20ms": OpenAI's
    rate-limits guide, platform.openai.com/docs/guides/rate-limits, as stored on 2026-06-26). None
    for what an answer does not say, as a server that limits nothing."""

    def number(name: str) -> int | None:
        try:
            return int(headers.get(f"x-ratelimit-remaining-{name}", ""))
        except ValueError:
            return None

    def reset(name: str) -> float:
        said = headers.get(f"x-ratelimit-reset-{name}", "").strip()
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", said)
        seconds = sum(float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit] for value, unit in parts)
        return min(seconds, RETRY_AFTER_LONGEST)

    return RateLimits(number("requests"), reset("requests"), number("tokens"), reset("tokens"))


def retry_after(response: httpx.Response) -> float:
    # Seconds only: these servers send no HTTP dates, and without a number the backoff decides.
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.0), RETRY_AFTER_LONGEST)
    except ValueError:
        return 0.0


def refuse_cut_prompt(prompt_tokens: int, num_ctx: int) -> None:
    # Before Ollama 0.30 a prompt longer than the context was cut silently (a log line,
    # "truncating input prompt", and the image chunk dropped): the model captioned a picture
    # it never saw. A prompt that fills the whole context is the only sign.
    if prompt_tokens >= num_ctx:
        raise TryFailed(
            Fault.MODEL_UNUSABLE,
            f"the prompt filled the whole context ({prompt_tokens} tokens), so the model did not see all "
            f"of the image: raise --num-ctx to {context_for(prompt_tokens)}",
        )


# ---------------------------------------------------------------------------
# Network: the proxy each request goes through, and the bounds on what a server sends
# ---------------------------------------------------------------------------
# The transport under every client: proxies chosen as the clients choose them, TLS, and
# the limits on an answer's lines and time; secrets kept out of every message.


# Every client of the run (the ollama client passes its keyword arguments on to httpx.Client)
# sends through a Transport of ours. httpx then reads no proxy variable itself (it does only
# without a transport: httpx/_client.py, allow_env_proxies), so the choice below is the run's
# one: made per request from the variables, as httpx makes it, with the proxy named when it is
# the one that fails, and a proxy variable that cannot be used refused before anything is sent.


class Secrets:
    """What the run sends that no one else may read: the API key (OPENAI_API_KEY, or the variable
    --api-key-env names; OLLAMA_API_KEY, which the ollama client sends as a bearer token whenever
    it is set: ollama/_client.py, BaseClient.__init__), a proxy's password. A server or a proxy
    may say them back (in an error page, an error mid-answer, an answer), so no text the run
    prints or writes may hold them: reasons, the Reporter and the review page pass through
    redacted(), and an answer that holds one is not written (ask())."""

    # Shorter values keep nothing secret (they are guessed in a moment), and taking them out
    # would garble every message that holds those letters.
    SHORTEST = 4

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}  # value: what it is, as redacted text names it

    def add(self, value: str, label: str) -> None:
        if len(value) >= self.SHORTEST and value not in self.labels:
            # A new dict, not a changed one: other threads read it without a lock.
            self.labels = {**self.labels, value: label}

    def redacted(self, text: str) -> str:
        labels = self.labels
        if not labels:  # a run that sends no key: the review page of 20,000 images stays quick
            return text
        for value, label in sorted(labels.items(), key=lambda item: -len(item[0])):
            text = text.replace(value, f"[{label}]")
        return text

    def found_in(self, text: str) -> str:
        """What secret the text holds ("" if none)."""
        return next((label for value, label in self.labels.items() if value in text), "")


SECRETS = Secrets()


def redacted(text: str) -> str:
    return SECRETS.redacted(text)


def redacted_data(value: Any) -> Any:
    """JSON-like data with every string redacted."""
    if isinstance(value, str):
        return redacted(value)
    if isinstance(value, list):
        return [redacted_data(item) for item in value]
    if isinstance(value, dict):
        return {key: redacted_data(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class ProxySetting:
    url: str  # as the variable gives it (credentials included), with http:// if it has no scheme
    variable: str  # the variable it came from: HTTP_PROXY, https_proxy, ALL_PROXY ...

    @property
    def shown(self) -> str:
        """The proxy's address without its credentials, as messages name it."""
        return re.sub(r"(?<=://)[^@/]*@", "", self.url)


def environment_proxies() -> dict[str, ProxySetting]:
    """The proxies the environment sets for "http", "https" and "all" (every scheme), read as
    httpx reads them (httpx/_utils.py, get_environment_proxies): urllib's getproxies(), which
    prefers lower-case variables and falls back on the system's settings on macOS and Windows;
    an address without a scheme is http://."""
    from urllib.request import getproxies  # loaded with httpx, which reads it too

    found = getproxies()
    return {
        scheme: ProxySetting(
            found[scheme] if "://" in found[scheme] else f"http://{found[scheme]}", proxy_variable(scheme)
        )
        for scheme in ("http", "https", "all")
        if found.get(scheme)
    }


def proxy_variable(scheme: str) -> str:
    # urllib reads the lower-case variable first, as curl does.
    names = sorted((name for name in os.environ if name.lower() == f"{scheme}_proxy"), key=str.isupper)
    return next((name for name in names if os.environ[name]), "the system's proxy settings")


def proxy_for(url: httpx.URL) -> ProxySetting | None:
    """The proxy a request to url goes through: none for a host NO_PROXY names, else the proxy of
    the URL's scheme (HTTP_PROXY, HTTPS_PROXY), else ALL_PROXY, as httpx and curl choose."""
    from urllib.request import getproxies

    no_proxy = getproxies().get("no", "")
    if any(no_proxy_names(entry.strip(), url) for entry in no_proxy.split(",") if entry.strip()):
        return None
    proxies = environment_proxies()
    return proxies.get(url.scheme) or proxies.get("all")


DEFAULT_PORTS = {"http": 80, "https": 443}


def no_proxy_names(entry: str, url: httpx.URL) -> bool:
    """Whether one NO_PROXY entry names url's host, as httpx reads it: * names every host; an
    address names itself (and a network, 10.0.0.0/8, its addresses, as curl and Go read it); a
    name names itself and the names below it (.example.com only those below it); a port or a
    scheme (http://gpu1:11434) narrows it."""
    if entry == "*":
        return True
    scheme, _, place = entry.lower().rpartition("://")
    if scheme not in ("", "all", url.scheme):
        return False
    host = url.host.lower()
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(place.strip("[]"), strict=False)
    except ValueError:
        pass  # a name, or a place with a port
    name, colon, port = place.rpartition(":") if re.search(r":\d+$", place) else (place, "", "")
    if colon and int(port) != (url.port or DEFAULT_PORTS.get(url.scheme)):
        return False
    name = name.strip("[]").lstrip("*")
    if name.startswith("."):
        return host.endswith(name)
    return host == name or host.endswith(f".{name}")


def refuse_unusable_proxies(url: str) -> None:
    """Stop the run on a proxy variable httpx cannot use, naming it: the official client would
    refuse the whole environment (its first client raises as it is made). A SOCKS proxy needs
    httpx's SOCKS support only where a server of the run goes through it."""
    for proxy in environment_proxies().values():
        problem = proxy_address_problem(proxy.url)
        if problem:
            raise CannotStart(
                f"{proxy.variable} is not a proxy address ({proxy.shown}: {problem}); correct it or unset it"
            )
    proxy = proxy_for(httpx.URL(url))
    if proxy and proxy.url.lower().startswith("socks") and importlib.util.find_spec("socksio") is None:
        raise CannotStart(
            f"{proxy.variable} names a SOCKS proxy ({proxy.shown}) for {url}, which needs httpx's SOCKS "
            'support: pip install "httpx[socks]"'
        )


def proxy_address_problem(url: str) -> str:
    """What is wrong with a proxy's address, or "" if httpx can use it."""
    try:
        parsed = httpx.Proxy(url).url
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        if url.partition("://")[0].lower() not in ("http", "https", "socks5", "socks5h"):
            return "its scheme must be http, https, socks5 or socks5h"
        return reason_of(exc)
    if not parsed.host:
        return "it names no host"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return "the port must be 1-65535"
    return ""


class Transport:
    """What every request of the run goes through: httpx's own transport, directly or through
    the proxy the environment names for the request's URL (one transport each, made as needed),
    and the proxy named when it is what cannot be reached. It bounds what a server can send,
    which httpx does not: each line of an answer (LONGEST_LINE), and the time from sending a
    request to the last byte of its answer (deadline, explained by over_deadline when passed)."""

    def __init__(self, server: str, deadline: float = math.inf, over_deadline: str = "") -> None:
        self.server = server
        self.deadline = deadline
        self.over_deadline = over_deadline
        self.routes: dict[ProxySetting | None, Any] = {}
        self.chosen: dict[tuple[str, str, int | None], ProxySetting | None] = {}  # by scheme, host, port
        self.lock = threading.Lock()  # the clients are shared between threads

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self.deadline
        # Uncompressed: a compressed answer would grow a thousandfold past what the bounds see.
        request.headers["Accept-Encoding"] = "identity"
        proxy = self.proxy_for(request.url)
        try:
            response = self.route(proxy).handle_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as exc:
            if proxy is None:
                raise
            raise httpx.ProxyError(proxy_failure(proxy, request.url, exc), request=request) from exc
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise TryFailed(
                Fault.MODEL_UNUSABLE,
                f"it compressed its answer ({encoding}) although asked not to, so its size cannot be bounded",
            )
        response.stream = bounded_stream_class()(response.stream, self, deadline)
        return response

    def proxy_for(self, url: httpx.URL) -> ProxySetting | None:
        # Chosen once for each place: reading the environment for every request costs more than
        # a request to a server that answers at once.
        place = (url.scheme, url.host, url.port)
        with self.lock:
            if place not in self.chosen:
                self.chosen[place] = proxy_for(url)
            return self.chosen[place]

    def route(self, proxy: ProxySetting | None) -> Any:
        with self.lock:
            if proxy not in self.routes:
                self.routes[proxy] = httpx.HTTPTransport(
                    verify=tls_context(self.server, proxy), proxy=proxy and proxy_with_secrets_kept(proxy)
                )
            return self.routes[proxy]

    def close(self) -> None:
        with self.lock:
            for route in self.routes.values():
                route.close()
            self.routes.clear()


def tls_context(server: str, proxy: ProxySetting | None) -> ssl.SSLContext:
    """What a route checks certificates with. Without https, in the server's address or the
    proxy's, it makes no TLS connection (redirects are not followed), and is given a context
    that trusts no certificate instead of reading the system's: reading them costs 30 ms of CPU
    (measured, httpx 0.29), more than a caption from a local server, and httpx reads them for
    every transport it makes."""
    if server.lower().startswith("https:") or (proxy and proxy.url.lower().startswith("https:")):
        return trusted_certificates()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, with nothing to trust: fails closed


@functools.cache
def trusted_certificates() -> ssl.SSLContext:
    """httpx's own choice (SSL_CERT_FILE, SSL_CERT_DIR, else certifi's), read once a run."""
    return httpx.create_ssl_context()


class BoundedStream:
    """A response's bytes as they come, cut off where the server breaks a bound: a line longer
    than any answer of its API holds, or the request's deadline. httpx reads a response only
    from an httpx.SyncByteStream, which bounded_stream_class() makes of it."""

    def __init__(self, inner: Any, transport: Transport, deadline: float) -> None:
        self.inner = inner
        self.transport = transport
        self.deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        line = 0  # bytes since the last line break
        for chunk in self.inner:
            end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
            line = line + len(chunk) if end < 0 else len(chunk) - end - 1
            if line > LONGEST_LINE:
                raise TryFailed(
                    Fault.MODEL_UNUSABLE,
                    f"it sent a line longer than {LONGEST_LINE // 2**20} MiB, which no answer of its API "
                    "holds: a broken server, or a proxy in front of it",
                )
            if time.monotonic() > self.deadline:
                raise TryFailed(
                    Fault.SERVER_STRUGGLING,
                    f"{self.transport.server} sent no whole answer within "
                    f"{duration(self.transport.deadline)}{self.transport.over_deadline}",
                )
            yield chunk

    def close(self) -> None:
        self.inner.close()


@functools.cache
def bounded_stream_class() -> type:
    # Made once httpx is loaded: only a run that sends images loads it.
    return type("BoundedStream", (BoundedStream, httpx.SyncByteStream), {})


def proxy_with_secrets_kept(proxy: ProxySetting) -> httpx.Proxy:
    """httpx's Proxy, its password kept from what the run prints: httpcore sends it in a
    Proxy-Authorization header (Basic, base64 of user:password)."""
    made = httpx.Proxy(proxy.url)
    if made.auth:
        user, password = made.auth
        SECRETS.add(password, "proxy password")
        SECRETS.add(base64.b64encode(f"{user}:{password}".encode()).decode("ascii"), "proxy password")
    return made


def proxy_failure(proxy: ProxySetting, url: httpx.URL, exc: Exception) -> str:
    """Why a request could not pass the proxy, and what to do."""
    if isinstance(exc, httpx.ProxyError):  # the proxy answered CONNECT with an error status
        return f"the proxy {proxy.shown} ({proxy.variable}) could not reach {url.host}: {reason_of(exc)}"
    return (
        f"cannot reach the proxy {proxy.shown} ({proxy.variable}): {reason_of(root_cause(exc))}; start it, "
        f"or add {url.host} to NO_PROXY"
    )


def root_cause(exc: BaseException) -> BaseException:
    """The error at the bottom of a chain: httpx raises its own from httpcore's, which raises its
    own from the socket's (ConnectionRefusedError, ssl.SSLError)."""
    return causes(exc)[-1]


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling, down the chain."""
    chain = [exc]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    return chain


# ---------------------------------------------------------------------------
# Image preparation: read, decode, orient, shrink, encode
# ---------------------------------------------------------------------------
# Each image as the model is sent it, on a pool of threads; what cannot be read fails
# here with the reason.


# Measured with Pillow 13 on 2 cores (6000x4000 JPEG): a full decode + LANCZOS takes ~330 ms
# and 118 MB; decoding at reduced DCT scale first takes ~105 ms and 16 MB.

EXIF_ORIENTATION = 0x0112
UNDO_ORIENTATION = {  # EXIF orientation: the Image.Transpose that makes the picture upright
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def read_png_metadata_of_any_size() -> None:
    """Pillow 13 refuses a PNG whose zTXt, iTXt or iCCP chunk inflates to more than 1 MB
    (PngImagePlugin.MAX_TEXT_CHUNK, "Decompressed data too large"), while it takes 64 MB of plain
    tEXt (MAX_TEXT_MEMORY): a large ComfyUI workflow or colour profile is metadata, not the
    picture. A compressed chunk may now be as large as all the text together may."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)


def estimated_tokens_of(image: str, prompt: str, config: Config) -> int | None:
    """A dry run's estimate of the input tokens of an image's request: the picture at the size it
    would be sent (read from its header alone), as OpenAI counts it, and the prompt and --system;
    None where the file cannot be opened (the run would fail it, unpaid)."""
    import_run_libraries()
    try:
        with Image.open(image) as picture:
            size = picture.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if config.max_size and max(size) > config.max_size:
        size = fitted_size(size, config.max_size)
    system = config.system.fill(image, "") if config.system.text else ""
    return image_tokens(*size) + text_tokens(prompt) + text_tokens(system)


def prepare_styles(styles: ImageStyles, config: Config) -> ImageStyles:
    """Prepare an image once for every style it is asked in (its picture decoded, shrunk and
    encoded once, the same bytes sent with each request), and read the captions its prompts
    ask for that this run does not write ({caption:EXT}) from their files."""
    first = prepare_task(styles.tasks[0], config)
    for task in styles.tasks[1:]:
        task.payload, task.thumbnail = first.payload, first.thumbnail
    return captions_asked_from_disk(styles, config)


def captions_asked_from_disk(styles: ImageStyles, config: Config) -> ImageStyles:
    """Read the captions the image's prompts ask for ({caption:EXT}) that this run does not write."""
    first = styles.tasks[0]
    asked = {config.style(task.style).caption_ext for task in styles.tasks}
    for ext in {ext for task in styles.tasks for ext in task.template.captions} - asked:
        styles.caption_on_disk(ext, os.path.splitext(first.image)[0] + ext)
    return styles


def prepare_task(task: Task, config: Config) -> Task:
    """Fill in the task's prompt and the bytes to send; TryFailed if the file is unusable."""
    task.prompt = task.template.fill(task.image, task.existing)
    task.payload = prepare_image(task.image, config.max_size)
    if config.review:  # from the picture as prepared: no second decode of a 24 MP original
        task.thumbnail = thumbnail_of(io.BytesIO(task.payload))
    return task


def prepare_image(path: str, max_size: int) -> bytes:
    """The bytes to send: the file itself when already fit, else an upright, shrunk RGB JPEG."""
    import_run_libraries()
    try:
        file = open_regular_file(path)
    except OSError as exc:
        raise TryFailed(Fault.IMAGE_UNREADABLE, f"cannot read: {reason_of(exc)}") from None
    # Pillow reads from the file what it needs, so a huge file is never held whole in memory.
    with file:
        if not os.fstat(file.fileno()).st_size:
            raise TryFailed(Fault.IMAGE_UNREADABLE, "empty file")
        if max_size == 0:
            return file.read()
        return payload_of(file, max_size)


def payload_of(file: BinaryIO, max_size: int) -> bytes:
    try:
        with Image.open(file) as picture:
            refuse_bombs(picture)
            orientation = picture.getexif().get(EXIF_ORIENTATION, 1) if picture.format == "JPEG" else None
            as_it_is = sendable_as_it_is(picture, file, max_size, orientation)
            return as_it_is or encode_jpeg(padded(shrink_upright_rgb(picture, max_size, orientation)))
    except TryFailed:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TryFailed(Fault.IMAGE_UNREADABLE, bomb_reason()) from None
    except UnidentifiedImageError:
        raise TryFailed(Fault.IMAGE_UNREADABLE, "not an image (or a format Pillow cannot read)") from None
    except Exception as exc:  # noqa: BLE001
        # On malformed data Pillow's plugins raise OSError, ValueError, SyntaxError, but also
        # struct.error, IndexError, EOFError...: each is this file's failure, not the run's.
        raise TryFailed(Fault.IMAGE_UNREADABLE, f"cannot decode: {reason_of(exc)}") from None


def refuse_bombs(picture: Image.Image) -> None:
    # Pillow only warns between 1x and 2x its pixel limit, and then inflates a 632-byte
    # JPEG into 645 MB. Checked here from the header, whatever the warnings filter says.
    if picture.width * picture.height > (Image.MAX_IMAGE_PIXELS or math.inf):
        raise TryFailed(Fault.IMAGE_UNREADABLE, bomb_reason())


def bomb_reason() -> str:
    return (
        f"refused: more pixels than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} "
        "(a possible decompression bomb)"
    )


def sendable_as_it_is(picture: Image.Image, file: BinaryIO, max_size: int, orientation: int | None) -> bytes:
    """The file's bytes where they are fit to send as they are, else b""."""
    if os.fstat(file.fileno()).st_size > PASS_THROUGH_MAX_BYTES or max(picture.size) > max_size:
        return b""
    if padded_size(picture.size) != picture.size:
        return b""
    position = file.tell()
    file.seek(0)
    data = file.read()
    file.seek(position)
    if picture.format == "JPEG":
        upright = orientation == 1
        complete = data.rstrip(b"\0").endswith(b"\xff\xd9")
    elif picture.format == "PNG":
        # A PNG's EXIF costs a full decode to read (~23 ms for 1200x800), so a PNG that has
        # EXIF at all is re-encoded instead.
        upright = "exif" not in picture.info
        complete = data.endswith(PNG_TRAILER)
    else:
        return b""
    plain = picture.mode in ("RGB", "L") and "transparency" not in picture.info
    still = not getattr(picture, "is_animated", False)
    return data if upright and complete and plain and still else b""


def shrink_upright_rgb(picture: Image.Image, max_size: int, orientation: int | None) -> Image.Image:
    if orientation is None:  # not JPEG: its EXIF, if any, is read from the decoded picture
        orientation = picture.getexif().get(EXIF_ORIENTATION, 1)
    target = fitted_size(picture.size, max_size)
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale. Asked for the fitted size, not a square
    # such as thumbnail_of() asks for, or a 3:2 photo is decoded whole.
    picture.draft(picture.mode, target)
    rgb = flatten_to_rgb(picture)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=1.0)
    # Rotating after shrinking touches 20x fewer pixels (105 ms against 265 ms for 24 MP).
    if orientation in UNDO_ORIENTATION:
        rgb = rgb.transpose(getattr(Image.Transpose, UNDO_ORIENTATION[orientation]))
    return rgb


def padded(picture: Image.Image) -> Image.Image:
    """The picture centred on white, where it is too small or too thin for vision encoders."""
    size = padded_size(picture.size)
    if size == picture.size:
        return picture
    canvas = Image.new("RGB", size, "white")
    canvas.paste(picture, ((size[0] - picture.width) // 2, (size[1] - picture.height) // 2))
    return canvas


def padded_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    return (
        max(width, SMALLEST_SIDE, math.ceil(height / WIDEST_ASPECT)),
        max(height, SMALLEST_SIDE, math.ceil(width / WIDEST_ASPECT)),
    )


def fitted_size(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    width, height = size
    scale = max_size / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def flatten_to_rgb(picture: Image.Image) -> Image.Image:
    if picture.mode.startswith("I;16") or picture.mode == "I":
        # 16-bit values would clip to white if converted directly.
        picture = picture.convert("I").point(lambda value: value / 256).convert("L")
    if picture.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in picture.info:
        rgba = picture.convert("RGBA")
        white = Image.new("RGB", rgba.size, "white")
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return picture if picture.mode == "RGB" else picture.convert("RGB")


def encode_jpeg(picture: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    # The picture alone: Pillow carries the source's comment (a PNG's or GIF's text "comment")
    # into a JPEG unless given one, and one over 65,533 bytes fails ("Comment is too long").
    # A colour profile, EXIF or XMP it writes only when asked to.
    picture.save(buffer, "JPEG", quality=quality, comment=b"")
    return buffer.getvalue()


def usable_cpus() -> int:
    # The CPUs this process may run on (taskset, containers), not the machine's.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Asking: one try at one image, whichever the API
# ---------------------------------------------------------------------------
# A request, its answer cleaned up and checked; a retry's new seed.


def ask(server: Server, config: Config, task: Task) -> tuple[str, Answer]:
    """One try (on a worker thread): the caption, cleaned up, and the answer it came in."""
    with server.turns.timed():
        answer = server.api.request(server, config, task, seed_for(config.seed, task.tries))
    try:
        return checked(answer, server, config, task)
    except TryFailed as failure:
        failure.spent = answer  # refused here, but paid for all the same
        raise


def checked(answer: Answer, server: Server, config: Config, task: Task) -> tuple[str, Answer]:
    """The caption of an answer, cleaned up, or why it is unfit to train on."""
    # With a line break joining captions (--join), a line is a caption: an answer is one line,
    # --raw's included.
    caption = without_invisibles(answer.text, keep_lines=config.raw and not config.line_per_caption).strip()
    if not config.raw:
        caption = tidy(caption)
    problem = caption_problem(answer, caption) or script_problem(caption, task, config)
    if problem:
        raise unfit_answer(problem, answer, caption, server, config)
    secret = SECRETS.found_in(caption)
    if secret:  # the server says back what it was sent: no training set may hold it
        # Not asked again: a key comes back from what the server or a proxy echoes of the request
        # (the model is never shown it), which it will echo again, each try paid for.
        raise TryFailed(
            Fault.REQUEST_REFUSED, f"the answer holds the {secret} sent to the server, so it is not written"
        )
    return caption, answer


def seed_for(seed: int | None, tries: int) -> int | None:
    # A retry needs a seed of its own, or a seeded model says the same thing again; a fixed
    # --seed still makes the whole run, retries included, reproducible.
    if tries == 0:
        return seed
    return (seed if seed is not None else random.randrange(2**31)) + tries


# ---------------------------------------------------------------------------
# Faults: what every error means, in one place
# ---------------------------------------------------------------------------
# Each error of a server, a connection or the disk becomes a Fault here, with the reason a
# user reads.


# An error of a server, a connection or the disk gets its Fault here (the checks of an answer
# as it streams, in Gathered and caption_problem, name the fault they find); the retry
# policy below says what follows each.


def classified(exc: Exception, api: Api) -> TryFailed:
    """What an exception of a client means: the one place where errors get their fault."""
    if isinstance(exc, answer_errors()):
        pause = getattr(exc, "retry_after", 0.0)
        error = inner_message(exc.error)
        fault = status_fault(exc.status_code, error)
        return TryFailed(fault, explain(exc.status_code, error, api), pause, exc.status_code)
    if isinstance(exc, httpx.ProxyError):  # raised by our Transport, naming the proxy
        return TryFailed(Fault.SERVER_DOWN, reason_of(exc), cause=reason_of(exc))
    if isinstance(exc, (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout)):
        cause = connection_cause(exc)
        return TryFailed(
            Fault.SERVER_DOWN,
            f"cannot reach the {api.server_kind}" + (f": {cause}" if cause else ""),
            cause=cause,
        )
    if isinstance(exc, httpx.TimeoutException):
        return TryFailed(
            Fault.SERVER_STRUGGLING,
            "no answer within the timeout (raise --timeout if the server is only busy)",
        )
    if isinstance(exc, httpx.TransportError):
        return TryFailed(Fault.CONNECTION_BROKE, f"the connection to {api.said_by} broke: {reason_of(exc)}")
    if isinstance(exc, ValueError):
        return TryFailed(
            Fault.REQUEST_REFUSED,
            f"the server's answer is not {api.answer_format}",
        )
    return TryFailed(Fault.REQUEST_REFUSED, reason_of(exc))


def connection_cause(exc: Exception) -> str:
    """What stood in the way of a connection, in the words of the error below the client's; ""
    when nothing listened or the connection timed out, which the usual message covers. (The
    ollama client raises ConnectionError('Failed to connect to Ollama...') in place of httpx's
    ConnectError, `from None`, which keeps it as __context__: ollama/_client.py, _request_raw.)"""
    chain = causes(exc)
    if any(isinstance(link, (ConnectionRefusedError, httpx.ConnectTimeout)) for link in chain):
        return ""
    if isinstance(exc, ConnectionError) and len(chain) == 1:
        return ""
    tls = next((link for link in chain if isinstance(link, ssl.SSLError)), None)
    if isinstance(tls, ssl.SSLCertVerificationError):  # no server that is down: its words say so
        return f"its TLS certificate is not trusted ({tls.verify_message or reason_of(tls)})"
    if tls:  # most often https:// to a port that answers in plain HTTP, as Ollama's does
        said = re.sub(r"\s*\(_ssl\.c:\d+\)", "", reason_of(tls))
        return f"the TLS handshake failed ({said}): does the port speak plain HTTP? use http://"
    return reason_of(root_cause(exc))


# OpenAI's 429 for an account whose credit or quota is spent: code insufficient_quota, "You
# exceeded your current quota, please check your plan and billing details." (its error-codes
# guide, platform.openai.com/docs/guides/error-codes). The message is what reaches us (error_message()).
QUOTA_SPENT = re.compile(r"insufficient_quota|exceeded your current quota", re.IGNORECASE)


def status_fault(status: int, error: str) -> Fault:
    if unusable_model_fix(error):
        return Fault.MODEL_UNUSABLE
    if status == 404:
        return Fault.MODEL_GONE
    if status in (401, 403):
        return Fault.ACCESS_DENIED
    if status in (502, 504):  # a reverse proxy whose server is restarting
        return Fault.SERVER_DOWN
    if status in (400, 413, 422) or UNDECODABLE.search(error):
        return Fault.REQUEST_REFUSED
    if status == 429 and QUOTA_SPENT.search(error):
        return Fault.QUOTA_SPENT
    if status in (429, 503):
        return Fault.SERVER_BUSY
    return Fault.SERVER_STRUGGLING  # 500 (runner crashed), -1 (error mid-answer)


def explain(status: int, error: str, api: Api) -> str:
    server = api.said_by
    said = shown(server_message(error))
    fix = unusable_model_fix(error, api)
    if fix:
        return f"{fix} ({server} said: {said})"
    if status == -1:
        return f"{server} failed mid-answer: {said}"
    advice = {
        401: f"; the server or a proxy in front of it wants credentials ({api.key_advice} is sent when set)",
        403: f"; the server or a proxy in front of it refuses this client{api.refused_advice}",
        413: "; the image is too large for this server: lower --max-size",
    }.get(status, "")
    if status == 429 and QUOTA_SPENT.search(error):
        advice = "; the quota is spent: check your plan and billing"
    return f"{server[0].upper()}{server[1:]} answered {status}: {said}{advice}"


def inner_message(error: object) -> str:
    """What a server's error says. Since Ollama 0.30 an error of llama-server reaches /api/chat
    as llama-server's own JSON body, a string inside Ollama's {"error": ...} (llm/llama_server.go,
    statusErrorMessage): the client decodes one level of it, two for an error mid-answer (a
    dict). Its message is what the server said, shown and matched without the JSON around it."""
    text = error if isinstance(error, str) else json.dumps(error)
    return error_message(text.encode()) if text.lstrip().startswith("{") else text


def unusable_model_fix(error: str, api: type[Api] | Api = OllamaApi) -> str:
    for pattern, fix in UNUSABLE_MODEL:
        found = pattern.search(error)
        if found:
            if "--num-ctx to {" in fix and api.context_fix:  # the context is the server's, set as it starts
                return api.context_fix
            needed = int(found.group(1)) if found.group(1).isdigit() else 0
            return fix.format(*found.groups(), context_for(needed))
    return ""


def context_for(tokens: int) -> int:
    # Room for the prompt and a caption's tokens, rounded up to a multiple of 1024.
    return math.ceil((tokens + DEFAULT_MAX_TOKENS) / 1024) * 1024


# What a hosted provider's content filter refusing an image is told; asked again it refuses
# again, and each try is paid for, so the image fails at once (REQUEST_REFUSED).
CONTENT_FILTERED = "the provider's content filter refused the image (finish_reason content_filter)"

# How an empty answer of a model told not to think is told (FailureWatch gives it its fix).
EMPTY_WITHOUT_THINKING = "the model answered with an empty caption, with thinking off"
EMPTY_CAPTION = "the model answered with an empty caption"
EMPTY_ANSWERS = (EMPTY_CAPTION, EMPTY_WITHOUT_THINKING)


def unfit_answer(problem: str, answer: Answer, caption: str, server: Server, config: Config) -> TryFailed:
    """An answer unfit to train on, for `problem`. An empty one of a model told not to think is
    told as such; of a model known to answer nothing so (SILENT_WITHOUT_THINKING), before its
    server has answered well, it is every answer to come: the server cannot be used as asked."""
    # The answer as the model sent it: "The image shows." cleaned to nothing is no silence.
    if answer.text.strip() or answer.thought or answer.done_reason == "length":
        return TryFailed(Fault.UNFIT_ANSWER, problem)
    if not thinking_sent_off(server.api, config):
        return TryFailed(Fault.UNFIT_ANSWER, problem)
    if server.api.architecture in SILENT_WITHOUT_THINKING and not server.watch.answered:
        return TryFailed(Fault.MODEL_UNUSABLE, f"an empty answer: {silence_fix(server.api)}")
    return TryFailed(Fault.UNFIT_ANSWER, EMPTY_WITHOUT_THINKING)


def thinking_sent_off(api: Api, config: Config) -> bool:
    # A model that can think is sent think:false unless --think, where its thinking values (if
    # the server lists them) allow false.
    return api.thinks and not config.think and (not api.thinking_values or False in api.thinking_values)


def silence_fix(api: Api) -> str:
    """The fix for a model that answers nothing with thinking off: to think, as little as it can."""
    if "low" in api.thinking_values:
        return f"{SILENT_WITHOUT_THINKING_CAUSE}: try --think-level low"
    return f"{SILENT_WITHOUT_THINKING_CAUSE}: run with --think (thinking on)"


def failing_alike(failure: TryFailed, watch: FailureWatch, api: Api) -> TryFailed:
    """What takes out a server whose answers so far all failed as `failure` did: why, and the
    most likely fix."""
    fix = alike_fix(failure, api)
    return TryFailed(
        Fault.FAILING_ALIKE,
        f"its first {len(watch.images)} images failed alike, after all their tries, and none has "
        f"succeeded: {failure}" + (f"; {fix}" if fix else ""),
        status=failure.status,
    )


def alike_fix(failure: TryFailed, api: Api) -> str:
    """The most likely fix for a server whose every answer fails as `failure` did, from what it
    said; "" where the reason names its own (raise --max-tokens)."""
    if str(failure) == EMPTY_WITHOUT_THINKING:
        return silence_fix(api)
    if failure.fault is not Fault.UNFIT_ANSWER:
        return (
            f"the {api.server_kind} fails so whatever the image: its log says why; update it, or "
            "choose another model"
        )
    if re.search(r"--\w", QUOTED.sub("", str(failure))):
        return ""
    return "the model gives no usable answer with this prompt and these settings: try another prompt or model"


# Text a reason quotes (the model's answer, as shortened() gives it; a name in a server's words).
# A quote opens only where no letter stands before it: "couldn't decode 'x'" quotes x alone.
QUOTED = re.compile(r"(?<!\w)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`|\u00ab[^\u00bb]*\u00bb)")


def alike_key(failure: TryFailed, image: str) -> tuple[Fault, int, str]:
    """What failures that fail alike share, whichever image each came from: the fault, the status,
    and the reason without what changes from image to image: the image's name, what the model
    said, and every word with a digit (token counts, sizes, positions, ids)."""
    reason = QUOTED.sub("<quoted>", str(failure).replace(os.path.basename(image), "<image>"))
    reason = re.sub(r"\S*\d\S*", "<n>", reason)
    return failure.fault, failure.status, " ".join(reason.lower().split())


def write_fault(exc: OSError) -> Fault:
    if exc.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return Fault.DISK_UNWRITABLE
    return Fault.CAPTION_UNWRITABLE


def server_message(text: str) -> str:
    """A server's error body as one line: an HTML error page (nginx's 502, say) is reduced to
    its title. What the run sends is taken out first, before cutting could leave part of it."""
    text = redacted(text)
    if re.search(r"<html|<!doctype", text, re.IGNORECASE):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", text)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= 300 else text[:299] + "\u2026"


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Retry policy: what follows each fault, in one place
# ---------------------------------------------------------------------------
# POLICY maps each Fault to what happens next (the table in docs/when-things-go-wrong.md is checked against it).


class Action(enum.Enum):
    RETRY_NOW_NEW_SEED = "ask again at once, with a new seed"
    RETRY_AFTER_PAUSE = (
        "ask again after a pause that doubles each time (or as long as the server's `Retry-After` asks, "
        "if longer)"
    )
    WAIT_FOR_SERVER = "back to the queue; the server is probed, more and more slowly, until it answers"
    WAIT_FOR_PACE = (
        "back to the queue; the server is sent nothing until its `Retry-After` (or a pause that doubles "
        "each time) is over; refusing for longer than `--wait-server`, it is taken out"
    )
    TAKE_SERVER_OUT = "back to the queue; that server gets no more requests"
    STOP_RUN = "end the run: summary, exit 1; what is left waits for a rerun"
    FAIL_IMAGE = "the image fails with the reason"
    SEND_AGAIN = (
        "back to the queue, to be sent from another worker (none of its tries is used the first twice)"
    )


@dataclass(frozen=True)
class Rule:
    action: Action
    uses_a_try: bool  # counts against --retries; past them the image fails
    free_times: int = 0  # times it happens to an image before it starts to use its tries
    # Before the first image: the server's listing and the OpenAI probe picture are asked
    # again, for up to --wait-server, instead of the server being left out.
    waited_for_at_start: bool = False
    # The server may be to blame: when its answers so far all failed alike, it is taken out
    # (FailureWatch). Not so of the image's faults (a picture it cannot decode) nor of those
    # waited out (a busy server, one down, a broken connection).
    server_may_be_to_blame: bool = False


POLICY = {
    Fault.UNFIT_ANSWER: Rule(Action.RETRY_NOW_NEW_SEED, uses_a_try=True, server_may_be_to_blame=True),
    # A rate limit or a server that is busy or loading its model says nothing of the image: the
    # server is paced (Pacer), and --wait-server bounds one that never stops refusing.
    Fault.SERVER_BUSY: Rule(Action.WAIT_FOR_PACE, uses_a_try=False, waited_for_at_start=True),
    Fault.SERVER_STRUGGLING: Rule(Action.RETRY_AFTER_PAUSE, uses_a_try=True, server_may_be_to_blame=True),
    # The image may be to blame, so it uses a try; asking the server is pause enough.
    Fault.CONNECTION_BROKE: Rule(Action.WAIT_FOR_SERVER, uses_a_try=True),
    # The server is to blame, not the image: waiting uses none of its tries. But an image the
    # server went down on five times (a proxy's 504 for it alone, a server that crashes on it)
    # is suspected: without a bound it would be sent forever.
    Fault.SERVER_DOWN: Rule(Action.WAIT_FOR_SERVER, uses_a_try=True, free_times=5),
    Fault.MODEL_GONE: Rule(Action.TAKE_SERVER_OUT, uses_a_try=False),
    # Every further request to that server would fail the same way: a night of nothing.
    Fault.MODEL_UNUSABLE: Rule(Action.TAKE_SERVER_OUT, uses_a_try=False),
    Fault.FAILING_ALIKE: Rule(Action.TAKE_SERVER_OUT, uses_a_try=False),
    Fault.ACCESS_DENIED: Rule(Action.STOP_RUN, uses_a_try=False),
    # No request will be answered until someone pays: every one would be refused alike.
    Fault.QUOTA_SPENT: Rule(Action.STOP_RUN, uses_a_try=False),
    Fault.REQUEST_REFUSED: Rule(Action.FAIL_IMAGE, uses_a_try=False),
    Fault.IMAGE_UNREADABLE: Rule(Action.FAIL_IMAGE, uses_a_try=False),
    # Every further caption would fail the same way while the server works for nothing.
    Fault.DISK_UNWRITABLE: Rule(Action.STOP_RUN, uses_a_try=False),
    Fault.CAPTION_UNWRITABLE: Rule(Action.FAIL_IMAGE, uses_a_try=False),
    # A worker killed (by the kernel's OOM killer, a node lost) says nothing of the image, but an
    # image that kills every worker it is sent to (a decoder's crash) must not be sent forever.
    Fault.WORKER_LOST: Rule(Action.SEND_AGAIN, uses_a_try=True, free_times=2),
}


def decide(fault: Fault, tries: int, retries: int, times: int = 1) -> tuple[Action, int]:
    """What follows a fault that has now happened `times` times to an image that had already
    failed `tries` counted tries; and its count of tries after this one."""
    rule = POLICY[fault]
    if not rule.uses_a_try or times <= rule.free_times:
        return rule.action, tries
    if tries + 1 > retries:
        return Action.FAIL_IMAGE, tries + 1
    return rule.action, tries + 1


def backoff(tries: int) -> float:
    # Exponential, with jitter so that the workers of several runs do not retry in step.
    return min(BACKOFF_LONGEST, BACKOFF_FIRST * 2 ** (tries - 1)) * random.uniform(0.5, 1.5)


# A server whose answers all fail alike, one image after another, fails every image: a
# template that cannot render, a model that answers nothing, the next bug nobody has listed.
# Image by image, each using its tries, that is a night of nothing. So a server none of whose
# answers has succeeded is taken out once ALIKE_IMAGES images in a row have failed on it for
# good, alike. Only images that used all their tries count: a server that fails for a while (a
# model loading, a runner restarting) answers one of the retries, and its failures before were
# nothing. One image failing for good is as often the image's doing (a picture that crashes the
# runner every time): it fails alone, as it always did. A second one failing exactly as the first
# did, before any success, is the server's. The stop costs two images' tries (8 requests at the
# default --retries 3), where no stop costs every image's.
ALIKE_IMAGES = 2


class FailureWatch:
    """A server's images that failed for good until its first good answer: whether they all
    failed alike."""

    def __init__(self) -> None:
        self.answered = False  # one of its answers was fit to train on
        self.kind: tuple = ()  # what the failures in a row share (alike_key())
        self.images: list[str] = []  # the images that failed so, in a row

    def answered_well(self) -> None:
        self.answered = True

    def fails_alike(self, failure: TryFailed, image: str) -> bool:
        """Take in an image that failed for good on the server; whether the server's images so
        far failed alike enough for it to be taken out."""
        if self.answered or not the_servers_doing(failure):
            return False
        kind = alike_key(failure, image)
        if kind != self.kind:
            self.kind, self.images = kind, []
        self.images.append(image)
        return len(self.images) >= ALIKE_IMAGES


def the_servers_doing(failure: TryFailed) -> bool:
    # An error the server answered with (a status), or an empty answer: not its silence (a
    # timeout, an answer that broke off: the retry policy waits them out), and not what the model
    # made of a picture (a refusal, a loop, an answer cut off at the limit), which depends on the
    # picture: a folder that starts with two hard pictures must not stop every rerun.
    said = failure.status or str(failure) in EMPTY_ANSWERS
    return bool(said) and POLICY[failure.fault].server_may_be_to_blame


# ---------------------------------------------------------------------------
# Scheduling: images prepared a few ahead, --jobs requests in flight on every server
# ---------------------------------------------------------------------------
# One thread makes every decision; the others compute and hand back futures.


# One thread (the caller's) owns every queue and counter and makes every decision; the other
# threads only compute and hand back a future: a pool prepares images (Pillow releases the
# GIL while it decodes and resizes: 1.8-2.0x on 2 cores), and each request runs on a thread
# of its own (the official sync client is safe to share between threads). Futures say this
# with less machinery than the worker loops they replaced: no locks, no events, and nothing
# in flight that the end of the run cannot see. The benchmark measured the same share of a
# server's capacity for both (docs/speed.md).


def in_the_background(work: Callable[..., object], *args: object) -> Future:
    """Run work on a thread of its own and return its future. A request can wait minutes for an
    answer nobody will read any more (after a Ctrl-C, a 401, a lost server): its thread is a
    daemon, so it never keeps the process alive, where a ThreadPoolExecutor's threads are
    joined at exit. A thread costs some 50 microseconds against seconds of inference."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(work(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


class RateLimits(NamedTuple):
    """What an answer said of the server's rate limits (rate_limits()); None: nothing."""

    requests_left: int | None
    requests_reset: float  # seconds until the requests' window resets
    tokens_left: int | None
    tokens_reset: float


class Pacer:
    """When a server may be sent its next request: at the user's --rpm and --tpm, and within what
    the server said of its own limits (the x-ratelimit-* headers of its answers, a 429's
    Retry-After). The scheduler asks it before each request; the requests' threads tell it what
    each answer said, so it holds a lock.

    --rpm R and --tpm T space the requests evenly, one at a time (a burst of 1): two requests
    are at least max(60/R, 60*E/T) seconds apart, E being a request's tokens as the limit counts
    them (--max-tokens + PROMPT_TOKENS_GUESS). So any t seconds hold at most 1 + R*t/60 requests,
    and the pace never outruns a provider that counts its minute in shorter slices, as OpenAI
    says it may (its rate-limits guide). A server that says its window has no requests left, or
    fewer tokens than a request, is sent nothing until the window resets."""

    def __init__(self, rpm: float = 0.0, tpm: int = 0, tokens: int = 0) -> None:
        self.tokens = tokens  # a request's tokens, as the limit counts them
        spacings = ([60.0 / rpm] if rpm else []) + ([60.0 * tokens / tpm] if tpm else [])
        self.spacing = max(spacings, default=0.0)
        self.given = ", ".join(
            [f"--rpm {rpm:g}"] * bool(rpm) + [f"--tpm {tpm} at ~{tokens} tokens a request"] * bool(tpm)
        )
        self.lock = threading.Lock()
        self.next_at = 0.0  # the user's limit: no request before this
        self.held_until = 0.0  # the server's limit: no request before this
        self.why = ""  # what holds the next request back: the user's limit, or the server's
        self.count = 0  # requests sent so far
        self.flying = 0  # of them, those whose answer has not come back
        self.left: int | None = None  # requests the server's window still has for us, as last said
        self.left_until = 0.0  # and when that window resets
        self.waiting_since = 0.0  # since when work that had a free slot has waited for the pace
        self.waited = 0.0  # seconds work with a free slot waited for the pace, in all
        self.told = ""  # what the run said sets the pace ("" until it did)

    def due(self) -> float:
        """When the next request may be sent (time.monotonic())."""
        with self.lock:
            return max(self.next_at, self.held_until)

    def sent(self, now: float) -> None:
        """A request goes now."""
        with self.lock:
            self.next_at = now + self.spacing
            self.count += 1
            self.flying += 1
            if self.left is not None and now < self.left_until:
                self.left -= 1
                if self.left <= 0:
                    self.hold_until(
                        self.left_until, "its x-ratelimit-* headers: no requests left in the window"
                    )
            if self.waiting_since:
                self.waited += now - self.waiting_since
                self.waiting_since = 0.0

    def heard(self, limits: RateLimits) -> None:
        """Take in what an answer said of the server's limits. The other requests still in
        flight may not be counted in it yet (threads send in any order): they are taken off
        what is left, which at worst paces a little slow."""
        now = time.monotonic()
        with self.lock:
            if limits.requests_left is not None:
                others = max(0, self.flying - 1)
                self.left, self.left_until = limits.requests_left - others, now + limits.requests_reset
                if self.left <= 0:
                    self.hold_until(
                        self.left_until, "its x-ratelimit-* headers: no requests left in the window"
                    )
            if limits.tokens_left is not None and limits.tokens_left < self.tokens:
                self.hold_until(
                    now + limits.tokens_reset, "its x-ratelimit-* headers: too few tokens left in the window"
                )

    def landed(self) -> None:
        """A request sent is over (answered, failed or given up on)."""
        with self.lock:
            self.flying = max(0, self.flying - 1)

    def refused(self, pause: float, status: int) -> None:
        """The server refused as busy (429, 503): nothing more for `pause` seconds. A 429 is its
        rate limit; a 503 a server busy or loading its model, whose own speed sets the pace."""
        with self.lock:
            self.hold_until(time.monotonic() + pause, "it answered 429" if status == 429 else "")

    def hold_until(self, when: float, why: str) -> None:
        if when > self.held_until:
            self.held_until, self.why = when, why

    def holds_back(self, now: float) -> str:
        """Called while work with a free slot waits for the pace: what holds it back."""
        with self.lock:
            self.waiting_since = self.waiting_since or now
            if self.held_until > now and self.held_until >= self.next_at:
                return self.why
            return self.given


class Placement:
    """Where an image is prepared and its request sent: the one seam between the scheduler, which
    decides what is sent to which server and when, and the machines that do the work."""

    def prepare(self, styles: ImageStyles, config: Config) -> Future:
        """The image read and made ready to send for each of its styles, a few ahead; its future
        holds the ImageStyles."""
        raise NotImplementedError

    def send(self, server: Server, config: Config, task: Task) -> Future:
        """One try at the image on the server; its future holds ask()'s result."""
        raise NotImplementedError

    def probe(self, server: Server) -> Future:
        return in_the_background(server.probe)

    def gone(self, server: Server) -> str:
        """Why nothing can be sent to the server any more from where the work runs; "" if it can."""
        return ""

    def close(self) -> None:
        pass


class OnThisMachine(Placement):
    """Preparation on a pool of this process's threads, each request on a thread of its own."""

    def __init__(self) -> None:
        self.preparers = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="prepare")

    def prepare(self, styles: ImageStyles, config: Config) -> Future:
        return self.preparers.submit(prepare_styles, styles, config)

    def send(self, server: Server, config: Config, task: Task) -> Future:
        return in_the_background(ask, server, config, task)

    def close(self) -> None:
        self.preparers.shutdown(wait=False, cancel_futures=True)


@dataclass
class Outcome:
    task: Task
    text: str = ""  # the caption as written
    failure: str = ""
    answer: Answer = field(default_factory=lambda: Answer("", "", 0, 0))
    server: str = ""
    seconds: float = 0.0


# The longest caption a prompt may ask for ({caption:EXT}): a caption is some 60-250 tokens; a
# 50,000-character one a person wrote is still far under it.
LONGEST_ASKED_CAPTION = 256 * 1024


class ImageStyles:
    """One image and its captions this run asks for, a Task per style in the order they are asked
    (asking_order()): prepared once (prepare_styles()), then each style sent as soon as the
    captions its prompt asks for ({caption:EXT}) are known, back to back; a style whose prompt
    asks for a caption that failed fails too, with the reason."""

    def __init__(self, tasks: list[Task], config: Config) -> None:
        self.tasks = tasks
        self.exts = {id(task): config.style(task.style).caption_ext for task in tasks}
        self.captions: dict[str, str] = {}  # by extension: on disk, or written by this run
        self.missing: dict[str, str] = {}  # by extension: why the caption cannot be had
        self.waiting = list(tasks)  # prepared or not, not yet sent
        for task in tasks:
            task.image_styles = self

    def caption_on_disk(self, ext: str, path: str) -> None:
        # What is read here is sent to the server: a link in a downloaded dataset must not send a
        # file from outside it, and no caption is longer than a prompt may sensibly be.
        try:
            if os.path.islink(path):
                raise OSError(
                    errno.ELOOP, "it is a link; a caption a prompt asks for is read only from a file"
                )
            if os.stat(path).st_size > LONGEST_ASKED_CAPTION:
                raise OSError(errno.EFBIG, f"longer than {LONGEST_ASKED_CAPTION:,} bytes, no caption")
            text = readable_text(read_regular_file(path))
        except OSError as exc:
            text = "" if isinstance(exc, FileNotFoundError) else None
            if text is None:
                self.missing[ext] = f"cannot be read: {reason_of(exc)}"
                return
        if is_blank(text.encode()):
            self.missing[ext] = "is missing (none on disk, and this run did not ask for it)"
        else:
            self.captions[ext] = text

    def settled(self, task: Task, text: str, failure: str) -> None:
        """One of its styles ended: its caption is written (text), or failed."""
        self.waiting = [each for each in self.waiting if each is not task]
        if failure:
            self.missing[self.exts[id(task)]] = f"failed: {failure}"
        else:
            self.captions[self.exts[id(task)]] = text

    def to_send(self) -> list[tuple[Task, str]]:
        """The styles that can go now, each with why it fails instead ("" if it goes), in order;
        their prompts filled in."""
        going = []
        for task in list(self.waiting):
            asked = task.template.captions
            lacking = next((ext for ext in asked if ext in self.missing), "")
            if not lacking and not all(ext in self.captions for ext in asked):
                continue  # its caption comes later in this run
            self.waiting = [each for each in self.waiting if each is not task]
            if lacking:
                going.append(
                    (task, f"its prompt asks for the {lacking} caption, which {self.missing[lacking]}")
                )
                continue
            task.prompt = task.template.fill(task.image, task.existing, self.captions)
            going.append((task, ""))
        return going


class Pipeline:
    """Images flow: planned -> preparing -> ready -> sent to any server with a free slot ->
    writing -> done.

    Every server takes from the one ready queue, so a faster server does more. At most one
    image per request slot is prepared or being prepared: memory stays flat however large the
    folder, and the next image is ready the moment a request finishes. While discovery has
    folders left to plan, it takes a step between two looks at the work in flight.
    """

    def __init__(
        self,
        discovery: Discovery,
        writer: Writer,
        servers: list[Server],
        config: Config,
        stop: Stop,
        reporter: Reporter,
        summary: Summary,
        placement: Placement | None = None,
    ) -> None:
        self.discovery = discovery
        self.summary = summary  # counts the tokens paid for, which --max-cost holds to
        self.writer = writer
        self.config = config
        self.servers = servers
        self.stop = stop
        self.reporter = reporter
        self.ready: deque[Task] = deque()  # prepared, to be sent
        self.delayed: list[Task] = []  # to be sent again once their pause is over
        self.preparing: dict[Future, ImageStyles] = {}
        self.due: deque[Outcome] = deque()  # outcomes to yield: those of an image's other styles
        self.sending: dict[Future, tuple[Server, Task, float]] = {}
        self.writing: dict[Future, Outcome] = {}
        self.probing: dict[Future, Server] = {}
        self.halted = ""  # why the run must end early (the retry policy said so)
        self.placement = placement or OnThisMachine()

    def outcomes(self) -> Iterator[Outcome]:
        """Each image's outcome as it comes. Ends when every image has one, when no server is
        left, or after a stop, once the answers already on their way are in."""
        while self.has_work():
            if self.stop.asked.is_set() or self.halted:
                yield from self.drain()
                return
            self.start_work()
            planning = not self.discovery.finished
            if planning:
                self.discovery.step()
            for future in self.wait_for_any(at_once=planning):
                yield from self.settled(future)

    def close(self) -> None:
        """Cancel the preparation that has not started. A request still in flight is left to its
        daemon thread, which holds up nothing (on a cluster, its work is cancelled)."""
        self.placement.close()

    def halt(self, why: str) -> None:
        self.halted = self.halted or why

    def stopped_because(self, summary: Summary) -> str:
        if not summary.left and summary.listed:
            return ""
        if self.stop.asked.is_set() and not self.halted:
            return ""  # interrupted: the summary says so
        why = self.halted or f"no {APIS[self.config.api].server_kind} left to ask"
        return f"{why}; {left_for_a_rerun(summary)}"

    def has_work(self) -> bool:
        if self.sending or self.preparing or self.writing:
            return True
        if not (self.discovery.waiting or self.ready or self.delayed or not self.discovery.finished):
            return False
        # Images are left, but once every server is out of rotation nobody can take them.
        return any(server.in_rotation for server in self.servers)

    def start_work(self) -> None:
        now = time.monotonic()
        for task in [task for task in self.delayed if task.not_before <= now]:
            self.delayed.remove(task)
            self.ready.append(task)
        for server in self.servers:
            if server.probe_due() and server not in self.probing.values():
                self.probing[self.placement.probe(server)] = server
        for server in self.servers:
            gone = self.placement.gone(server)
            if gone:
                server.take_out(gone)
            while server.free_slots() > 0 and self.ready and self.affordable(self.ready[0]):
                if server.pacer.due() > now:
                    self.paced(server, now)
                    break
                task = self.ready.popleft()
                server.pacer.sent(now)
                server.in_flight += 1
                self.sending[self.placement.send(server, self.config.style(task.style), task)] = (
                    server,
                    task,
                    now,
                )
        slots = sum(server.jobs for server in self.servers if server.in_rotation)
        waiting = self.discovery.waiting
        while waiting and len(self.ready) + sum(len(each.tasks) for each in self.preparing.values()) < max(
            1, slots
        ):
            styles = ImageStyles(self.next_image(waiting), self.config)
            self.preparing[self.placement.prepare(styles, self.config)] = styles

    def next_image(self, waiting: deque[Planned]) -> list[Task]:
        """The next image's Tasks, one per style it is asked in (planned together)."""
        first = waiting.popleft()
        planned = [first]
        while waiting and waiting[0].listing is first.listing and waiting[0].name == first.name:
            planned.append(waiting.popleft())
        return [Task.of(each, self.config) for each in planned]

    def settled(self, future: Future) -> Iterator[Outcome]:
        """The outcomes a finished piece of work gives: its image's, and those of the image's other
        styles that fail with it; the styles it lets go are sent next."""
        outcome = self.settle(future)
        if outcome:
            self.due.append(outcome)
        while self.due:
            outcome = self.due.popleft()
            styles = outcome.task.image_styles
            if outcome.failure and styles and len(styles.tasks) > 1:
                styles.settled(outcome.task, outcome.text, outcome.failure)
                self.send_next(styles)
            yield outcome

    def send_next(self, styles: ImageStyles) -> None:
        """An image's styles that can be sent now go next, back to back, ahead of other images."""
        going = styles.to_send()
        self.ready.extendleft(reversed([task for task, why in going if not why]))
        self.due.extend(Outcome(task, failure=why) for task, why in going if why)

    def unreported(self, answer: Answer, task: Task) -> tuple[int, int] | None:
        """With --price, the estimated (input, output) tokens of an answer that said none (a
        server that sends no usage, the OpenAI API's being optional): never free, or --max-cost
        would never stop. None for an answer that said."""
        if answer.prompt_tokens or not self.config.price:
            return None
        return estimated_prompt_tokens(task, self.config), max(answer.tokens, text_tokens(answer.text))

    def affordable(self, task: Task) -> bool:
        """Whether --max-cost leaves room for one more request: what was paid, and the worst case
        of each request in flight and of this one (its prompt, as the largest yet or as estimated
        from its picture, and --max-tokens of output), within the budget. Where it does not and
        nothing is in flight, the run ends: the rest is left for a rerun."""
        if self.config.max_cost is None:
            return True
        if not self.summary.answers_paid and self.sending:
            # Until an image's answer says what a picture costs here, the estimate may be far
            # below it (gpt-4.1-mini counts 32-px patches, Gemini tiles): requests in flight on an
            # estimate could pass the budget together, so one goes at a time.
            return False
        prompt = max(self.summary.most_prompt_tokens, estimated_prompt_tokens(task, self.config))
        worst = self.summary.cost_of(prompt, self.config.max_tokens)
        if self.summary.cost + worst * (len(self.sending) + 1) <= self.config.max_cost:
            return True
        if not self.sending:
            self.halt(
                f"--max-cost {self.config.max_cost:g} would be passed by one more request "
                f"({money(self.summary.cost)} spent)"
            )
        return False

    def paced(self, server: Server, now: float) -> None:
        """Work with a free slot waits for the server's pace: the run says once what sets it."""
        why = server.pacer.holds_back(now)
        if why and not server.pacer.told:
            server.pacer.told = why
            self.reporter.paced(server.url, why)
        self.reporter.pace_sets(bool(why))

    def wait_for_any(self, at_once: bool = False) -> set[Future]:
        """The work that finished, waiting for some unless at_once; a stop is noticed within
        POLL_SECONDS."""
        running = [*self.preparing, *self.sending, *self.writing, *self.probing]
        due = [task.not_before for task in self.delayed]
        due += [server.next_probe for server in self.servers if server.state is State.QUIET]
        if self.ready:
            due += [server.pacer.due() for server in self.servers if server.free_slots() > 0]
        timeout = (
            0.0 if at_once else min([POLL_SECONDS] + [max(0.0, when - time.monotonic()) for when in due])
        )
        if not running:
            self.stop.asked.wait(timeout)
            return set()
        return wait(running, timeout=timeout, return_when=FIRST_COMPLETED)[0]

    def settle(self, future: Future) -> Outcome | None:
        """Take in one finished piece of work; an image's outcome if it has one now."""
        if future in self.probing:
            server = self.probing.pop(future)
            server.probed(future.result(), self.config.wait_server)
            if server.state is State.ANSWERING:
                self.reporter.answers(server.url, again=True)
            return None
        if future in self.writing:
            return self.caption_written(future)
        if future in self.preparing:
            self.prepared(future)
            return None
        server, task, started = self.sending.pop(future)
        server.in_flight -= 1
        server.pacer.landed()
        self.tell_if_one_at_a_time(server)
        try:
            result = future.result()
        except TryFailed as failure:
            if failure.spent:
                self.summary.answer_paid(failure.spent, estimated=self.unreported(failure.spent, task))
            return self.after_failure(server, task, failure)
        except Exception as exc:  # noqa: BLE001 - a defect must fail its image, never lose it
            return Outcome(task, failure=f"unexpected error: {exc!r}")
        caption, answer = result
        self.summary.answer_paid(answer, estimated=self.unreported(answer, task))
        server.watch.answered_well()
        server.busy_since, server.busy_times = 0.0, 0
        self.reporter.pace_sets(any(server.pacer.waiting_since for server in self.servers))
        outcome = Outcome(task, answer=answer, server=server.url, seconds=time.monotonic() - started)
        journal = None if self.config.dry_run else self.discovery.journal_of(task)
        config = self.config.style(task.style)
        self.writing[self.writer.submit(write_answer, task, caption, config, journal)] = outcome
        styles = task.image_styles
        if styles and len(styles.tasks) > 1:
            # The styles that ask for this caption go now, back to back with it, with the text
            # being written: waiting for the write would let other images' requests in between.
            styles.settled(task, finished_caption(caption, task, config)[0], "")
            self.send_next(styles)
        return None

    def prepared(self, future: Future) -> None:
        """An image is prepared: its styles that can go are ready, in order; or each fails."""
        styles = self.preparing.pop(future)
        try:
            future.result()
        except TryFailed as failure:
            if self.prepared_again(styles, failure):
                return
            styles.waiting = []  # each style fails here, once
            self.due.extend(filter(None, (self.after_failure(None, task, failure) for task in styles.tasks)))
            return
        except Exception as exc:  # noqa: BLE001 - a defect must fail its image, never lose it
            styles.waiting = []
            self.due.extend(Outcome(task, failure=f"unexpected error: {exc!r}") for task in styles.tasks)
            return
        going = styles.to_send()
        self.ready.extend(task for task, why in going if not why)
        self.due.extend(Outcome(task, failure=why) for task, why in going if why)

    def prepared_again(self, styles: ImageStyles, failure: TryFailed) -> bool:
        """A preparation lost with its worker (--ray) is done again while the policy allows, for
        every style of the image at once (counted on its first)."""
        if failure.fault is not Fault.WORKER_LOST:
            return False
        first = styles.tasks[0]
        times = first.faults.get(failure.fault, 0) + 1
        action, tries = decide(failure.fault, first.tries, self.config.retries, times)
        if action is not Action.SEND_AGAIN:
            return False
        first.faults[failure.fault], first.tries = times, tries
        self.preparing[self.placement.prepare(styles, self.config)] = styles
        return True

    def tell_if_one_at_a_time(self, server: Server) -> None:
        if server.turns.one_at_a_time and not server.turns.told:
            server.turns.told = True
            self.reporter.answers_one_at_a_time(server.url, server.jobs, server.api.one_at_a_time_causes)

    def caption_written(self, future: Future) -> Outcome:
        outcome = self.writing.pop(future)
        try:
            outcome.text = future.result()
        except TryFailed as failure:
            outcome.failure = str(failure)
            if decide(failure.fault, 0, self.config.retries)[0] is Action.STOP_RUN:
                self.halt(outcome.failure)
        except Exception as exc:  # noqa: BLE001 - a defect must fail its image, never lose it
            outcome.failure = f"unexpected error: {exc!r}"
        return outcome

    def after_failure(self, server: Server | None, task: Task, failure: TryFailed) -> Outcome | None:
        """Carry out the retry policy's decision for one failed try."""
        if server is not None and failure.fault is Fault.SERVER_BUSY:
            server.busy_times += 1
            server.busy_since = server.busy_since or time.monotonic()
        task.faults[failure.fault] = task.faults.get(failure.fault, 0) + 1
        action, task.tries = decide(
            failure.fault, task.tries, self.config.retries, task.faults[failure.fault]
        )
        if action is Action.FAIL_IMAGE:
            if server and server.watch.fails_alike(failure, task.image):
                alike = failing_alike(failure, server.watch, server.api)
                self.act_on_server(server, decide(alike.fault, 0, self.config.retries)[0], alike)
            tries = f" (after {task.tries} tries)" if task.tries > 1 else ""
            return Outcome(task, failure=f"{failure}{tries}")
        if action is Action.RETRY_AFTER_PAUSE:
            task.not_before = time.monotonic() + max(backoff(task.tries), failure.pause)
            self.delayed.append(task)
            return None
        self.ready.appendleft(task)
        if server is not None:
            self.act_on_server(server, action, failure)
        return None

    def act_on_server(self, server: Server, action: Action, failure: TryFailed) -> None:
        """What the policy's action does to the server a try failed on."""
        if action is Action.WAIT_FOR_SERVER and server.state is State.ANSWERING:
            server.went_quiet(str(failure))
            self.reporter.stopped_answering(server.url, str(failure), self.config.wait_server)
        elif action is Action.WAIT_FOR_PACE:
            if time.monotonic() - server.busy_since > self.config.wait_server:
                server.take_out(
                    f"{failure}, refusing for more than {duration(self.config.wait_server)} (--wait-server)"
                )
            else:
                server.pacer.refused(max(backoff(server.busy_times), failure.pause), failure.status)
        elif action is Action.TAKE_SERVER_OUT:
            server.take_out(str(failure))
        elif action is Action.STOP_RUN:
            self.halt(f"{server.url}: {failure}")

    def drain(self) -> Iterator[Outcome]:
        """After a stop: start nothing more; the answers already on their way (for at most
        DRAIN_SECONDS) are still written, unless the run was halted. A caption being written
        is always waited for: it takes milliseconds."""
        for future in self.preparing:
            future.cancel()
        if self.sending and not self.halted:
            self.reporter.stopping(DRAIN_SECONDS)
        deadline = time.monotonic() + DRAIN_SECONDS
        while True:
            awaited = list(self.writing)
            # After a halt (401, a full disk) the answers on their way are not waited for: they
            # are left for the rerun, with the rest.
            if time.monotonic() < deadline and not (self.stop.hurried.is_set() or self.halted):
                awaited += self.sending
            if not awaited:
                return
            for future in wait(awaited, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)[0]:
                yield from self.settled(future)


# ---------------------------------------------------------------------------
# Ray: the same run on a cluster's workers (--ray)
# ---------------------------------------------------------------------------
# With --ray the driver (this process) keeps every decision, as the scheduler above makes it:
# discovery, planning, the locks, the journal, writing, the retry policy, each server's health,
# pace, cost and failures alike. Only the work moves: on each node, worker processes prepare an
# image and send its request with the same prepare_task() and ask() as a local run, and hand back
# what came of it. So the state a run shares lives in one place, the driver's Server objects and
# Summary, which every request is decided from; the workers keep none. One judgement needs the
# requests' times as they happen, not when the answers come back: whether a server answers one
# request at a time is decided by a Ray actor of the run (TurnJudge), whose verdict comes back
# with every answer.

# Tested with Ray 2.60 (Python 3.10 or later); installed only by those who use --ray. Its client
# extra (grpcio) is what a driver outside the cluster (--ray ray://HOST:10001) needs.
RAY_INSTALL = 'pip install "ray[client]>=2.60,<2.61"'
# The name the workers import this file by: its own name has hyphens.
RAY_MODULE = "llava_caption_ollama"
# --host local:PORT: each worker node's own server, at its loopback address, unless the node's
# environment (that of its `ray start`) names another (a container that reaches it elsewhere).
LOCAL_HOST = "local:"
NODE_SERVER_ENV = "LLAVA_CAPTION_NODE_SERVER"
# Where nothing listens there: --host does not name a node's server, its node's environment does.
NODE_SERVER_ADVICE = f"start it on that node, or give that node's `ray start` {NODE_SERVER_ENV}=URL"
# Passed on to the workers, whose environment is their node's: the tests' shorter pauses.
RAY_PASSED_ENV = ("LLAVA_CAPTION_PAUSE_SCALE",)
# Ray's object store holds the images prepared ahead, at most one per request slot (some 300 KB
# each at the default --max-size), so a Ray started by --ray local reserves this, not 30% of memory.
RAY_OBJECT_STORE_BYTES = 128 * 1024**2
# Ray waits this long for a node to start a worker process before it calls it lost.
RAY_START_SECONDS = 120.0


def importable_self(name: str = RAY_MODULE) -> Any:
    """This file as a module of an importable name: the run continues in it, so that whatever is
    pickled for the workers names its classes as the workers import them. Not cloudpickle's copy
    of __main__ by value: the module holds locks and thread-locals (which no pickle takes), and
    each call's Task would carry its class with it. The file is loaded by path from where it is,
    so everything beside it (prompt.txt) stays where the run looks for it."""
    if __name__ == name:
        return sys.modules[__name__]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(__file__))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def unreachable_ray(address: str) -> str:
    """Why a HOST:PORT address has no Ray to join ("" if it may: auto, local and ray:// are Ray's
    to find, and fail in a second). Nothing listening there made ray.init() retry for minutes
    (measured: over 160 s with Ray 2.60 at 127.0.0.1:1)."""
    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return ""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=QUICK_TIMEOUT):
            return ""
    except OSError as exc:
        return f"nothing answers at {address} ({reason_of(exc)})"


def import_ray() -> Any:
    # These machines reach no outside service, and a user's run reports to no one.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError:
        raise CannotStart(f"--ray needs Ray, which is not installed; run: {RAY_INSTALL}") from None
    return ray


def workers_package(directory: Path) -> Path:
    """A copy of this file as the package RAY_MODULE, for Ray to ship to every node (runtime_env
    py_modules): the nodes need Ray and the run's libraries, not a copy of the script."""
    package = directory / RAY_MODULE
    package.mkdir()
    (package / "__init__.py").write_bytes(Path(os.path.abspath(__file__)).read_bytes())
    return package


class Overheard(Pacer):
    """A worker's pacer: what an answer said of the server's rate limits, kept for the driver,
    whose own Pacer of that server decides."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: RateLimits | None = None

    def heard(self, limits: RateLimits) -> None:
        self.limits = limits


# The one piece of shared state that cannot wait for an answer's end: whether a server answers one
# request at a time (TURNS_IN_A_ROW). A turn is "together" when another answer streamed beside it,
# which is known only from first tokens as they come; the driver hears of a request only when it has
# ended, so it could judge a turn only once every request in flight beside it had ended too (with
# --jobs 5 on a server that answers one at a time, four turns late). So the workers tell a Ray actor
# of the run, the TurnJudge, of each request's first token and end as they happen, and its
# TurnTaking of the server (per node with --host local:PORT) decides, as a local run's does; the
# driver reads the verdict with each answer. The times are the workers' wall clocks (time.time()):
# a monotonic clock counts from each machine's boot, while NTP keeps nodes' wall clocks within
# milliseconds of each other, against turns that last seconds. A call reaches the judge within a few
# milliseconds (a request's two took 2.5-3 ms, 1.3 ms of its worker's CPU, with Ray 2.60 on 2 cores
# under a load of 40), so it takes them in the order they happen: on a server answering one at a
# time the next answer begins an image's prompt processing after the last one ended. A request's
# turn is named by the driver, which tells the judge to drop it when its worker is lost: an answer
# that never ends would stream beside every other, and the server would never be named.


class TurnJudge:
    """The run's Ray actor that tells, from the times the workers send it, which servers answer one
    request at a time: a TurnTaking per server name. It takes one call at a time (Ray's default
    for an actor), in the order each worker made them."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.servers: dict[str, TurnTaking] = {}
        self.turns: dict[str, Turn] = {}  # the answers streaming, by the names the driver gave them

    def began(self, server: str, turn: str, sent: float, first: float) -> None:
        taking = self.servers.setdefault(server, TurnTaking(self.jobs))
        self.turns[turn] = Turn(taking, sent)
        taking.began(self.turns[turn], first)

    def ended(self, server: str, turn: str, end: float) -> bool:
        """Whether the server answers one request at a time, now that this answer has ended."""
        taking = self.servers.setdefault(server, TurnTaking(self.jobs))
        if turn in self.turns:
            taking.ended(self.turns.pop(turn), end)
        return taking.one_at_a_time

    def lost(self, turn: str) -> None:
        if turn in self.turns:
            self.turns[turn].taking.dropped(self.turns.pop(turn))


class TurnsTold(TurnTaking):
    """A worker's TurnTaking of one request (Worker.caption makes one for each), named by the
    driver ("": not watched): its times, told to the run's TurnJudge, which decides."""

    def __init__(self, ray: Any, judge: Any, server: str, turn: str) -> None:
        super().__init__(LEAST_JOBS_WATCHED)
        self.watching = bool(turn)
        self.ray, self.judge, self.server, self.turn = ray, judge, server, turn

    def now(self) -> float:
        return time.time()  # comparable between nodes (see TurnJudge)

    def began(self, turn: Turn, now: float) -> None:
        self.judge.began.remote(self.server, self.turn, turn.sent, now)  # its answer is not waited for

    def ended(self, turn: Turn, now: float) -> None:
        try:
            self.one_at_a_time = self.ray.get(self.judge.ended.remote(self.server, self.turn, now))
        except self.ray.exceptions.RayError:
            pass  # the judge was lost with its node: a note the run does without, no image's fault


def node_server_name(url: str, node: str) -> str:
    """How the run names a node's own server (--host local:PORT): every node's may have the same
    loopback address."""
    return f"{url} on {node}"


class NodeCheck(NamedTuple):
    """A node's own server (--host local:PORT) as its preflight on that node found it."""

    url: str  # its address on its node
    trouble: str  # why it does not answer, or ""
    model: str
    api: Api | None  # as checked, where it answers
    said: list  # what the preflight had to say: the Reporter's calls, to make on the driver
    watching: bool  # still to be watched for answering one request at a time
    down_sign: str  # how it showed that it may be restarting (down_sign()), or ""


def take_in_node_check(server: Server, checked: NodeCheck) -> None:
    """The driver's Server of a node's own server, as its check on that node found it."""
    server.api = checked.api or server.api
    server.model, server.turns.watching, server.down_sign = checked.model, checked.watching, checked.down_sign
    server.state, server.why = (State.DEAD, checked.trouble) if checked.trouble else (State.ANSWERING, "")


class Worker:
    """One worker process on a node (a Ray actor, threaded): prepares images and asks servers,
    one request a thread, with the servers as the driver checked them."""

    def __init__(self, config: Config, judge: Any) -> None:
        self.config = config
        self.judge = judge
        self.ray = import_ray()
        self.checked: dict[str, tuple[Api, str]] = {}  # server name: its API and model
        import_run_libraries()

    def sees(self, folders: list[Path]) -> list[str]:
        return locks_seen(folders)

    def check(self, port: int, node: str) -> NodeCheck:
        """The preflight of this node's own server (--host local:PORT), as a local run checks a
        server. What it says names the server as the run does, its address on its node's, as every
        node's may be the same loopback address."""
        url = server_url(os.environ.get(NODE_SERVER_ENV) or f"http://127.0.0.1:{port}")
        name = node_server_name(url, node)
        server = server_for(url, self.config)
        server.api.start_advice = NODE_SERVER_ADVICE
        said = Recorded()
        try:
            trouble = server.api.preflight(server, self.config, said, Stop())  # type: ignore[arg-type]
        except CannotStart as refusal:
            raise CannotStart(str(refusal).replace(url, name)) from None
        api = None if trouble else server.api
        calls = [(call, tuple(name if arg == url else arg for arg in args)) for call, args in said.calls]
        return NodeCheck(
            url, trouble.replace(url, name), server.model, api, calls, server.turns.watching, server.down_sign
        )

    def use(self, checked: dict[str, tuple[Api, str]]) -> None:
        self.checked = checked

    def prepare(self, task: Task) -> tuple[Any, bytes]:
        """(The prompt and thumbnail, or the TryFailed; the payload), the payload to stay in the
        object store of this node until a worker sends it."""
        try:
            prepare_task(task, self.config)
        except TryFailed as failure:
            return failure, b""
        return (task.prompt, task.thumbnail), task.payload

    def caption(
        self, name: str, task: Task, payload: bytes | None, turn: str
    ) -> tuple[Any, RateLimits | None, bool]:
        """One try at the image on the server named, timed for the TurnJudge as the turn named
        (unless ""): ((caption, answer) or the TryFailed, the rate limits its answer said, whether
        the server answers one request at a time as far as the judge knows). Prepared here where
        its payload was lost."""
        api, model = self.checked[name]
        server = Server(api.url, self.config.jobs, api)
        server.model, server.pacer = model, Overheard()
        server.turns = TurnsTold(self.ray, self.judge, name, turn)
        try:
            # The prompt came filled in from the driver (with the captions it asks for): only the
            # picture is prepared again where its payload was lost.
            task.payload = prepare_image(task.image, self.config.max_size) if payload is None else payload
            result: Any = ask(server, self.config.style(task.style), task)
        except TryFailed as failure:
            result = failure
        return result, server.pacer.limits, server.turns.one_at_a_time

    def probe(self, name: str) -> str:
        api = self.checked[name][0]
        return Server(api.url, self.config.jobs, api).probe()


def locks_seen(folders: list[Path]) -> list[str]:
    """Each folder's lock file as this machine reads it (the driver holds them), or why it cannot:
    a node that reads the same sees the same folders."""
    seen = []
    for folder in folders:
        try:
            seen.append((folder / LOCK_NAME).read_text("utf-8", "replace"))
        except OSError as exc:
            seen.append(f"cannot read {folder}: {reason_of(exc)}")
    return seen


class Recorded:
    """A reporter on a worker: what it was told, for the driver's reporter to say."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: self.calls.append((name, args))


@functools.lru_cache(maxsize=64)
def absolute_folder(folder: Path) -> Path:
    # Once for each folder given, not for each image sent: see Listing.path_of().
    return Path(os.path.abspath(folder))


class Cluster(Placement):
    """The run's workers on a Ray cluster: a few per node (as many as the node has CPUs: each a
    process of its own, so preparation is not held to one interpreter's lock), and the node of
    each --host local:PORT server."""

    def __init__(self, config: Config, reporter: Reporter, stop: Stop) -> None:
        self.ray = ray = import_ray()
        self.config = config
        unreachable = unreachable_ray(config.ray)
        if unreachable:
            raise CannotStart(f"--ray {config.ray}: cannot join the Ray cluster: {unreachable}")
        import tempfile

        self.temporary = Path(tempfile.mkdtemp(prefix="llava-caption-ray-"))
        self.lock = threading.Lock()
        self.flying: dict[Any, int] = {}  # worker: its requests in flight
        self.node_of: dict[Any, str] = {}  # worker: its node's id
        self.node_servers: dict[str, str] = {}  # server name: its node's id (--host local:PORT)
        self.node_checks: dict[str, Callable[[], NodeCheck]] = {}  # server name: its check on its node
        self.lost: set[Any] = set()
        self.judge: Any = None  # the TurnJudge
        passed = {name: os.environ[name] for name in RAY_PASSED_ENV if name in os.environ}
        local = config.ray == "local"
        # ray.init() installs signal handlers of its own (SIGTERM's, in the driver): the run's stay.
        # While it joins, a signal ends the run at once, by the signal: nothing is sent yet, and
        # ray.init() retries a silent address for minutes without looking at the run's stop.
        handlers = {number: signal.getsignal(number) for number in Signals.numbers()}
        if threading.current_thread() is threading.main_thread():
            for number in handlers:
                signal.signal(number, signal.SIG_DFL)
        try:
            ray.init(
                address=config.ray,
                runtime_env={"py_modules": [str(workers_package(self.temporary))], "env_vars": passed},
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                **({"object_store_memory": RAY_OBJECT_STORE_BYTES} if local else {}),
            )
        except Exception as exc:  # noqa: BLE001 - Ray's ConnectionError, ValueError, RuntimeError...
            self.remove_package()
            raise CannotStart(f"--ray {config.ray}: cannot join the Ray cluster: {reason_of(exc)}") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for number, handler in handlers.items():
                    signal.signal(number, handler)  # type: ignore[arg-type]
        # ray.init() has uploaded the package to the cluster (Ray 2.60: upload_py_modules_if_needed
        # in ray.init, or in the client's connect): removed now, a driver killed later (kill -9,
        # the OOM killer) leaves no copy of it behind in the temporary folder.
        self.remove_package()
        try:
            self.start_workers(config, stop)
            reporter.ray_workers(len(self.flying), len(set(self.node_of.values())))
        except BaseException:
            self.close()
            raise

    def start_workers(self, config: Config, stop: Stop) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        remote_worker = ray.remote(Worker)
        slots = config.jobs * len(config.hosts) + 1
        # Anywhere (it needs no CPU), killed with the workers (close()), no record of its calls kept.
        judge = ray.remote(TurnJudge).options(num_cpus=0, max_restarts=0, enable_task_events=False)
        self.judge = judge.remote(config.jobs)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        for node in nodes:
            for _ in range(int(node["Resources"].get("CPU", 0))):
                worker = remote_worker.options(
                    num_cpus=0,
                    max_concurrency=slots,
                    max_restarts=0,
                    max_task_retries=0,  # the retry policy decides, not Ray
                    # No record of each call kept by the driver for Ray's state API and dashboard,
                    # which the run does not use: its memory stays flat per image (measured, 2 cores:
                    # 128.2 MB after 2,000 images of 40,000 written, 128.6 MB after 30,000).
                    enable_task_events=False,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                ).remote(config, self.judge)
                self.flying[worker], self.node_of[worker] = 0, node["NodeID"]
        if not self.flying:
            raise CannotStart(f"--ray {config.ray}: no node of the cluster has a CPU to run workers on")
        self.check_shared_folders(config, nodes, stop)

    def check_shared_folders(self, config: Config, nodes: list[dict], stop: Stop) -> None:
        """Every node sees the folders as this machine does: each reads the locks this run holds."""
        folders = [Path(os.path.abspath(folder)) for folder in config.folders]
        here = locks_seen(folders)
        address = {node["NodeID"]: node["NodeManagerAddress"] for node in nodes}
        asked = {worker.sees.remote(folders): worker for worker in self.flying}
        for ref, worker in asked.items():
            seen = self.answer(ref, stop, f"the Ray node {address[self.node_of[worker]]}")
            for folder, mine, theirs in zip(config.folders, here, seen):
                if theirs != mine:
                    raise CannotStart(
                        f"the Ray node {address[self.node_of[worker]]} does not see {folder} as this machine "
                        f"does ({theirs.strip() or 'another folder of that name'}): the images must be on a "
                        "filesystem every node sees, at the same path"
                    )

    def answer(self, ref: Any, stop: Stop, who: str) -> Any:
        """A worker's answer to a call made before the first image, interruptible."""
        deadline = time.monotonic() + RAY_START_SECONDS
        while not self.ray.wait([ref], timeout=POLL_SECONDS)[0]:
            if stop.asked.is_set():
                raise CannotStart("interrupted while starting the Ray workers")
            if time.monotonic() > deadline:
                raise CannotStart(f"{who} started no worker in {duration(RAY_START_SECONDS)}")
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
        except self.ray.exceptions.RayError as exc:
            raise CannotStart(f"{who}: its worker was lost ({reason_of(exc)})") from None

    def node_servers_for(self, config: Config, port: int, reporter: Reporter, stop: Stop) -> list[Server]:
        """--host local:PORT: a server on each node, checked from that node."""
        servers = []
        nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in self.ray.nodes() if node["Alive"]}
        first = {}
        for worker, node in self.node_of.items():
            first.setdefault(node, worker)
        for node, worker in first.items():
            check = functools.partial(self.check_node_server, worker, port, nodes[node], reporter, stop)
            checked = check()
            api = checked.api or server_for(checked.url, config).api  # the clients of one, made once
            server = Server(node_server_name(checked.url, nodes[node]), config.jobs, api)
            take_in_node_check(server, checked)
            self.node_servers[server.url], self.node_checks[server.url] = node, check
            servers.append(server)
        return servers

    def check_node_server(
        self, worker: Any, port: int, node: str, reporter: Reporter, stop: Stop
    ) -> NodeCheck:
        checked = NodeCheck(*self.answer(worker.check.remote(port, node), stop, f"the Ray node {node}"))
        for name, args in checked.said:
            getattr(reporter, name)(*args)
        return checked

    def check_servers(self, servers: list[Server], config: Config, reporter: Reporter, stop: Stop) -> None:
        """check_servers(), with each node's own server checked again on its node."""
        check_servers(
            [server for server in servers if server.url not in self.node_checks], config, reporter, stop
        )
        for server in servers:
            if server.url in self.node_checks:
                take_in_node_check(server, self.node_checks[server.url]())

    def use(self, servers: list[Server]) -> None:
        checked = {server.url: (server.api, server.model) for server in servers if server.in_rotation}
        self.ray.get([worker.use.remote(checked) for worker in self.flying])

    def worker_for(self, server: Server | None) -> Any:
        """The least busy worker that may send to the server (any, for None)."""
        node = self.node_servers.get(server.url) if server else None
        with self.lock:
            workers = [
                worker
                for worker in self.flying
                if worker not in self.lost and (node is None or self.node_of[worker] == node)
            ]
            return min(workers, key=self.flying.__getitem__, default=None)

    def gone(self, server: Server) -> str:
        if self.worker_for(server) is not None:
            return ""
        if server.url in self.node_servers:
            return "its Ray node has no worker left"
        return "no Ray worker is left"

    def prepare(self, styles: ImageStyles, config: Config) -> Future:
        """On the least busy worker, once for all the image's styles; the payload stays in the
        cluster's object store, and the driver holds its reference alone."""
        worker = self.worker_for(None)
        if worker is None:  # the servers are taken out too (gone()): the run ends
            lost: Future = Future()
            lost.set_exception(TryFailed(Fault.WORKER_LOST, "no Ray worker is left"))
            return lost
        with self.lock:
            self.flying[worker] += 1
        said, payload = worker.prepare.options(num_returns=2).remote(self.as_sent(styles.tasks[0]))
        return in_the_background(self.prepared, worker, styles, said, payload, config)

    def prepared(
        self, worker: Any, styles: ImageStyles, said: Any, payload: Any, config: Config
    ) -> ImageStyles:
        result = self.result_of(worker, said)
        if isinstance(result, TryFailed):
            raise result
        first = styles.tasks[0]
        first.prompt, first.thumbnail = result
        for task in styles.tasks:
            task.thumbnail, task.prepared = first.thumbnail, payload
        return captions_asked_from_disk(styles, config)  # the driver reads them: it sees the folders

    def send(self, server: Server, config: Config, task: Task) -> Future:
        worker = self.worker_for(server)
        with self.lock:
            self.flying[worker] += 1
        watched = server.turns.watching and not server.turns.one_at_a_time
        turn = uuid.uuid4().hex if watched else ""
        ref = worker.caption.remote(server.url, self.as_sent(task), task.prepared, turn)
        return in_the_background(self.caption, worker, server, task, ref, turn)

    @staticmethod
    def as_sent(task: Task) -> Task:
        # The workers' working folders are not this one: they read the images by absolute path.
        image, root = os.path.abspath(task.image), absolute_folder(task.root)
        # Its image's other styles stay on the driver, which decides when each is sent.
        return replace(task, image=image, root=root, prepared=None, thumbnail=b"", image_styles=None)

    def caption(self, worker: Any, server: Server, task: Task, ref: Any, turn: str) -> tuple[str, Answer]:
        """On a thread of the driver: the worker's result, as ask() would have given it."""
        try:
            result, limits, one_at_a_time = self.result_of(worker, ref)
        except TryFailed:
            task.prepared = None  # the next try prepares it again, in case it was its payload that was lost
            if turn:
                self.judge.lost.remote(turn)
            raise
        server.turns.one_at_a_time = server.turns.one_at_a_time or one_at_a_time
        if limits:
            server.pacer.heard(limits)
        if isinstance(result, TryFailed):
            raise result
        task.prepared = None  # its object is freed
        return result

    def result_of(self, worker: Any, ref: Any) -> Any:
        """What a worker's call returned; TryFailed(WORKER_LOST) where it, or its node, was lost."""
        errors = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except errors.RayError as exc:
            # The worker's own exception comes wrapped (a defect: the image fails with it); Ray's
            # (a process, a node or an object lost) means the work is to be done again.
            cause = exc.cause if isinstance(exc, errors.RayTaskError) else exc
            if not isinstance(cause, errors.RayError):
                raise cause from None
            if isinstance(cause, errors.RayActorError):
                with self.lock:
                    self.lost.add(worker)
            raise TryFailed(Fault.WORKER_LOST, f"its Ray worker was lost ({reason_of(cause)})") from None
        finally:
            with self.lock:
                self.flying[worker] -= 1

    def probe(self, server: Server) -> Future:
        if server.url not in self.node_servers:
            return super().probe(server)
        worker = self.worker_for(server)
        return in_the_background(lambda: self.ray.get(worker.probe.remote(server.url)))

    def close(self) -> None:
        """The cluster's work ends with the run: every worker is killed, with its requests."""
        if self.ray.is_initialized():
            for actor in [*self.flying, *([self.judge] if self.judge else [])]:
                self.ray.kill(actor, no_restart=True)
            self.ray.shutdown()
        self.remove_package()

    def remove_package(self) -> None:
        import shutil

        shutil.rmtree(self.temporary, ignore_errors=True)


# ---------------------------------------------------------------------------
# Caption: the cleanup rules, and answers that are no caption
# ---------------------------------------------------------------------------
# What is written of a model's answer (docs/how-it-works.md, "Cleanup"), and what is refused.


# The cleanup rules, few on purpose so that a user can predict them (docs/how-it-works.md, "Cleanup").
LABEL = re.compile(r"^(?:caption|description)\s*:\s*", re.IGNORECASE)
PICTURE = "(?:image|picture|photo|photograph)"
# Lead-ins dropped from the start of an answer (only one), each a habit of a model:
LEAD_INS = [
    rf"(?:the|this) {PICTURE} (?:shows|depicts|features|captures|is of)",  # llava, "The image shows ..."
    rf"in (?:the|this) {PICTURE}",  # "In this image, a fox ..."
    rf"this is (?:an? )?{PICTURE} of",  # "This is a photograph of ..."
]
LEAD_IN = re.compile(rf"^(?:{'|'.join(LEAD_INS)})\b[\s,:]*", re.IGNORECASE)
# Thinking written inline, at the start of the content (Ollama 0.9-0.12.3 without "think",
# custom-imported models today); an unclosed block was cut off while the model still thought.
THINK_BLOCK = re.compile(r"^\s*<think>.*?(?:</think>|$)", re.DOTALL)
QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
NOT_A_CAPTION_START = [(re.compile(rf"^(?:{pattern})", re.IGNORECASE), why) for pattern, why in NOT_A_CAPTION]
# A loop is a runaway, not emphasis: a phrase of 3 to 80 characters said three or more times
# in a row, the repeats spanning at least LOOP_SPAN characters. "a very very very very good
# dog" is not one; "a red car, a red car, a red car, ..." until the token limit is.
REPEATS = re.compile(r"\b(\w.{2,79}?)(?:[\s,;.]+\1\b){2,}", re.IGNORECASE | re.DOTALL)


def tidy(answer: str) -> str:
    caption = " ".join(answer.split())  # one line: trainers read a caption file as one prompt
    caption = unquote(LABEL.sub("", caption, count=1))
    return LEAD_IN.sub("", caption, count=1)


def unquote(text: str) -> str:
    if len(text) >= 2 and QUOTE_PAIRS.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    return text


def without_invisibles(text: str, keep_lines: bool) -> str:
    """The text without control and format characters (escape sequences, zero-width spaces,
    byte-order marks): a caption file holds only what a trainer should read. Other white space
    becomes a space, but for line breaks and tabs where keep_lines says so."""
    return "".join(visible(char, keep_lines) for char in text)


def visible(char: str, keep_lines: bool) -> str:
    if char in "\n\t" and keep_lines:
        return char
    if char.isspace():
        return " "
    return "" if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn") else char


def is_looping(text: str) -> bool:
    return any(match.end() - match.start() >= LOOP_SPAN for match in REPEATS.finditer(text))


def caption_problem(answer: Answer, caption: str) -> str:
    """Why this caption must not reach a training set, or "" if it may."""
    if answer.done_reason == "length" and answer.thought and not caption:
        return (
            "the model spent its answer thinking (raise --max-tokens, or choose a tag that does not think, "
            "such as an -instruct one)"
        )
    if answer.done_reason == "length":
        return "the answer was cut off at the token limit (raise --max-tokens, or the server's context)"
    if not re.search(r"\w", caption):  # "The image shows." leaves only "."
        return EMPTY_CAPTION
    for pattern, why in NOT_A_CAPTION_START:
        if pattern.match(caption.replace("\u2019", "'")):
            return f"{why}: {shortened(caption)}"
    if is_looping(caption):
        return f"the answer repeats itself: {shortened(caption)}"
    return ""


def script_problem(caption: str, task: Task, config: Config) -> str:
    """Why the caption is refused for its script (see SCRIPTS), or "". Only the model's answer is
    judged: not the prefix, suffix or an existing caption it joins, nor its thinking (a Qwen model
    may think in Chinese), which never reaches a caption."""
    if config.any_script:
        return ""
    trigger_words = [words.fill(task.image, task.existing) for words in (config.prefix, config.suffix)]
    return wrong_script(caption, " ".join([task.prompt, *trigger_words]))


def wrong_script(answer: str, written: str) -> str:
    """Why the answer is in a script that `written` (the prompt and the trigger words) does not
    use: a run long enough to be a drift, or most of its letters (an answer in another language,
    however short: 一只猫); or ""."""
    if answer.isascii():  # most captions: no letter of any script of SCRIPTS
        return ""
    allowed = {script_of(char) for char in written}
    runs = list(foreign_runs(answer, allowed))
    drift = next((run for run in runs if drift_weight(run) >= 1), None)
    foreign = sum(script_of(char) is not None for run in runs for char in run)
    letters = sum(char.isalpha() or script_of(char) is not None for char in answer)
    if not (drift or 2 * foreign > letters):
        return ""
    run = drift or max(runs, key=drift_weight)
    scripts = [script for script in map(script_of, run) if script]
    name = max(scripts, key=scripts.count).name
    how = f"is in {name}" if foreign == letters else f"drifts into {name}"
    return (
        f"the answer {how}, which neither the prompt nor the trigger words are written in: "
        f"{shortened(run, 40)} (--any-script keeps such answers)"
    )


def foreign_runs(text: str, allowed: set[Script | None]) -> Iterator[str]:
    """The stretches of text in scripts of SCRIPTS not allowed, each from a letter of theirs to the
    last before a letter of another script (Latin, or one allowed). Spaces, digits and punctuation
    do not end one: Cyrillic and Hangul put spaces between words, Chinese its own commas."""
    start = end = -1
    for index, char in enumerate(text):
        script = script_of(char)
        if script is not None and script not in allowed:
            start, end = (index if start < 0 else start), index + 1
        elif char.isalpha() and start >= 0:
            yield text[start:end]
            start = -1
    if start >= 0:
        yield text[start:end]


def drift_weight(run: str) -> float:
    # Each letter counts as a share of its script's drift, so a run that mixes scripts (Japanese
    # writes Han and kana) is judged as a whole: 東京の夜景がきれいです is a drift, 東京タワー not.
    return sum(1 / script.drift for script in map(script_of, run) if script)


@functools.lru_cache(maxsize=4096)
def script_of(char: str) -> Script | None:
    code = ord(char)
    return next((script for script in SCRIPTS for low, high in script.ranges if low <= code <= high), None)


def shortened(text: str, length: int = 60) -> str:
    text = redacted(text)  # before cutting, which could leave part of a secret
    return repr(text if len(text) <= length else text[: length - 1] + "\u2026")


def finished_caption(caption: str, task: Task, config: Config) -> tuple[str, tuple[int, int] | None]:
    """The text to write: merged with an existing caption if asked (joined by --join), trigger
    words in place; and where the existing caption stands in it (the journal keeps it, for a
    redo to replace only what this pass added)."""
    old = task.existing
    prefix = config.prefix.fill(task.image, old)
    suffix = config.suffix.fill(task.image, old)
    if config.line_per_caption:
        # Each line a caption of its own: each gets the trigger words, the old lines as the
        # answer's line does.
        old = "\n".join(
            with_trigger_words(line.strip(), prefix, suffix) for line in old.splitlines() if line.strip()
        )
        caption = with_trigger_words(caption, prefix, suffix)
        prefix = suffix = ""
    join = config.join
    kept = None
    if task.mode == "append":
        caption, kept = (f"{old}{join}{caption}" if old else caption), (0, len(old))
    elif task.mode == "prepend":
        start = len(caption) + len(join) if old else len(caption)
        caption, kept = (f"{caption}{join}{old}" if old else caption), (start, start + len(old))
    if prefix and not has_prefix(caption, prefix):
        kept = kept and (kept[0] + len(prefix) + 2, kept[1] + len(prefix) + 2)
    return with_trigger_words(caption, prefix, suffix), kept


def with_trigger_words(caption: str, prefix: str, suffix: str) -> str:
    # A trigger word the model (or an earlier run) already put in place is not repeated; it
    # must be there as whole words: "man" is not in place at the start of "many people".
    if prefix and not has_prefix(caption, prefix):
        caption = f"{prefix}, {caption}"
    if suffix and not re.search(rf"(?<!\w){re.escape(suffix)}[\s.]*$", caption, re.IGNORECASE):
        caption = f"{caption}, {suffix}"
    return caption


def has_prefix(caption: str, prefix: str) -> bool:
    return bool(re.match(rf"{re.escape(prefix)}(?!\w)", caption, re.IGNORECASE))


def captions_in(text: str, config: Config | None) -> list[str]:
    """The captions a caption file holds: one, or with a line break joining them (--join) one
    a line."""
    if config and config.line_per_caption:
        return [line for line in text.splitlines() if line.strip()]
    return [text]


def estimated_clip_tokens(caption: str) -> int:
    # CLIP's BPE gives a common word one token, a long or rare word one per ~6 characters, a
    # CJK character one or more, and each punctuation mark one, plus a start and an end token:
    # close enough to count captions that overflow 77, without a tokenizer dependency.
    words = re.findall(r"[^\W\d_]+|\d+", caption)
    ideographs = sum(1 for char in caption if unicodedata.east_asian_width(char) in ("W", "F"))
    word_tokens = sum(
        max(1, math.ceil(len(word) / 6))
        for word in words
        if not any(unicodedata.east_asian_width(char) in ("W", "F") for char in word)
    )
    return word_tokens + ideographs + len(re.findall(r"[^\w\s]", caption)) + 2


# ---------------------------------------------------------------------------
# Writing: each caption atomically, the JSONL beside it
# ---------------------------------------------------------------------------
# A caption is complete or absent, never written over an edit; the journal line goes
# first; --jsonl kept in memory and rewritten atomically.


def write_answer(task: Task, caption: str, config: Config, journal: Journal | None) -> str:
    """Write one answer's caption (on a writer thread); the text written."""
    text, kept = finished_caption(caption, task, config)
    path = caption_path(task.image, config)
    if task.mode != "skip":
        refuse_if_changed(path, task.before)
    if journal:
        journal.add(task, text, kept)  # before the caption: see Journal
    write_caption(path, text, replace=task.mode != "skip")
    if journal:
        journal.confirm(task, text)
    return text


def refuse_if_changed(path: str, before: str) -> None:
    """A caption changed since it was planned (someone is editing the dataset) is a person's."""
    try:
        now = read_regular_file(path)
    except FileNotFoundError:
        now = b""
    except OSError:
        return  # write_caption() says why it cannot be written
    if text_digest(now) != before:
        raise TryFailed(
            Fault.CAPTION_UNWRITABLE,
            f"left alone: {shown(os.path.basename(path))} was changed during the run",
        )


class Writer:
    """Writes captions on threads of its own, so that answers arriving faster than one thread can
    write them never wait: an fsync waits for the disk, and several overlap. Measured on ext4
    here: one thread writes 2,300 captions/s (temporary file, fsync, rename), four 3,400/s.
    Each caption's content is on disk before its rename; the folders' own fsync, which makes
    the renames durable, is batched: at most once a second, and at the end of the run."""

    THREADS = 4
    SYNC_EVERY = 1.0

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="write")
        self.lock = threading.Lock()
        self.unsynced: set[str] = set()
        self.synced_at = time.monotonic()

    def submit(self, work: Callable[..., str], task: Task, *args: object) -> Future:
        return self.pool.submit(self.written_in, work, task, *args)

    def written_in(self, work: Callable[..., str], task: Task, *args: object) -> str:
        text = work(task, *args)
        with self.lock:
            self.unsynced.add(os.path.dirname(task.image))
            due = time.monotonic() - self.synced_at >= self.SYNC_EVERY
        if due:
            self.sync_folders()
        return text

    def sync_folders(self) -> None:
        with self.lock:
            folders, self.unsynced = self.unsynced, set()
            self.synced_at = time.monotonic()
        for folder in folders:
            sync_folder(folder)

    def close(self) -> None:
        """Wait for the captions being written (milliseconds each), then make them durable."""
        self.pool.shutdown(wait=True)
        self.sync_folders()


def sync_folder(folder: str) -> None:
    # Windows cannot open a folder to fsync it; NTFS journals the rename itself.
    if os.name == "nt":
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (a FUSE mount, say) cannot: the rename is as durable as they make it
    finally:
        os.close(descriptor)


def write_caption(path: str, text: str, replace: bool) -> None:
    try:
        # With --existing skip, a caption that appeared during the run (written by hand, or by
        # another tool) is not ours to replace.
        write_atomically(path, text, replace=replace)
    except FileExistsError:
        raise TryFailed(
            Fault.CAPTION_UNWRITABLE,
            f"left alone: {shown(os.path.basename(path))} appeared beside it during the run",
        ) from None
    except OSError as exc:
        raise TryFailed(
            write_fault(exc), f"cannot write {shown(os.path.basename(path))}: {reason_of(exc)}"
        ) from None


def write_atomically(path: str | Path, text: str | bytes, replace: bool = True) -> None:
    """Readers see the old file or the whole new one, never a part, even after a crash. Without
    replace, FileExistsError if a non-blank file is already there."""
    # A short name of our own, whatever the length of the caption's (255 bytes is the limit,
    # reached by ~80 CJK characters), hidden from discovery and trainers, and found again
    # and removed if a killed run leaves it behind: the pid in it says when (is_stale()).
    temporary = os.path.join(
        os.path.dirname(path), f"{OWN_FILE_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        # 0o666 less the umask, the mode of any file a user creates (mkstemp would give 0o600).
        with open(os.open(temporary, flags, 0o666), "wb") as file:
            file.write(text if isinstance(text, bytes) else text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        if replace or not put_in_place_if_absent(temporary, path):
            os.replace(temporary, path)
    finally:
        try:
            os.unlink(temporary)
        except OSError:
            pass  # renamed into place, or never created


def put_in_place_if_absent(temporary: str, path: str | Path) -> bool:
    """Give the temporary file the name path unless a non-blank file has it (FileExistsError);
    False where the name is blank or the file system has no hard links (FAT, exFAT), and the
    caller may replace it."""
    try:
        os.link(temporary, path)  # atomic: fails if anything has the name
        return True
    except FileExistsError:
        try:
            if not is_blank(read_regular_file(path)):
                raise
        except FileNotFoundError:
            pass
        return False
    except OSError:  # no hard links here: check, then rename (a race of microseconds)
        if os.path.exists(path) and not is_blank(read_regular_file(path)):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        return False


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or not ours to remove


# Written as escapes: a name's bytes that are not UTF-8 (lone surrogates, which json.loads
# gives back as the same name for open()), and what readers that split on every line break
# (Python's splitlines) would take for the end of a line.
JSON_ESCAPES = {code: f"\\u{code:04x}" for code in [0x85, 0x2028, 0x2029, *range(0xDC80, 0xDD00)]}


# The columns of the JSONL's rows; each style (--also) adds one of its own (style_column()).
JSONL_COLUMNS = frozenset(
    [
        "file_name",
        "text",
        "model",
        "seconds",
        "tokens",
        "prompt_tokens",
        "reasoning_tokens",
        "cost",
        "recovered",
    ]
)


def style_column(ext: str, style: int = 1) -> str:
    """A style's column in the JSONL: its extension without the dot (".tags": "tags"); the main
    caption's is "text", as imagefolder reads it."""
    return ext[1:] if style else "text"


class Metadata:
    """The --jsonl file: one JSON object a line (Hugging Face imagefolder's metadata.jsonl).
    Kept in memory by file name, so a caption written again replaces its line, and rewritten
    whole and atomically, so it is never half-written. The caption files are the truth: as a run
    plans each image, one whose caption file has no line, or a different text, gets a line
    rebuilt from the file, marked "recovered"."""

    SAVE_EVERY = 10.0  # seconds: what a crash can cost the JSONL until the next run mends it

    def __init__(self, path: Path, model: str, caption_ext: str) -> None:
        self.path = path
        self.model = model
        self.caption_ext = caption_ext
        self.entries = self.load(path)
        self.saved_at = time.monotonic()
        self.unsaved = False

    @staticmethod
    def load(path: Path) -> dict[str, dict]:
        try:
            # utf-8-sig: a file saved by Notepad starts with a byte-order mark. Lines end at
            # "\n" alone, as JSON Lines says: U+2028 in a caption is no line break.
            lines = read_regular_file(path).decode("utf-8-sig").split("\n")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise CannotStart(f"cannot read {path}: {reason_of(exc)}") from None
        entries = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["file_name"]] = entry
            except (ValueError, TypeError, KeyError):
                raise CannotStart(f"{path} line {number} is not a metadata entry; fix or remove it") from None
        return entries

    def for_model(self, model: str) -> Metadata:
        self.model = model
        return self

    def file_name(self, image: str | Path) -> str:
        return os.path.relpath(image, self.path.parent).replace(os.sep, "/")

    def add(self, image: str, text: str, **extra: object) -> None:
        file_name = self.file_name(image)
        styles = self.styles_of(file_name)
        self.entries[file_name] = {
            "file_name": file_name,
            "text": text,
            "model": self.model,
            **extra,
            **styles,
        }
        self.unsaved = True

    def add_style(self, image: str, column: str, text: str) -> None:
        """A style's caption (--also), in its own column of the image's row."""
        file_name = self.file_name(image)
        self.entries.setdefault(file_name, {"file_name": file_name})[column] = text
        self.unsaved = True

    def styles_of(self, file_name: str) -> dict:
        """The styles' columns of an image's row, which the main caption's own do not replace."""
        return {
            key: value for key, value in self.entries.get(file_name, {}).items() if key not in JSONL_COLUMNS
        }

    def save_now_and_then(self, reporter: Reporter) -> None:
        if time.monotonic() - self.saved_at > self.SAVE_EVERY:
            try:
                self.save()
            except OSError as exc:  # the save at the end of the run tries again
                reporter.cannot_write(self.path, reason_of(exc))

    def recover(self, image: str, caption: str, data: bytes, column: str = "text") -> None:
        """A line for the caption beside an image as planning found it, where the JSONL lacks it
        or says otherwise (a crash between saves, an earlier run without --jsonl, an edit). A
        caption this run writes replaces it. column: the style's (see style_column())."""
        file_name = self.file_name(image)
        if file_name.startswith("../"):
            return  # not covered by this JSONL
        try:
            text = caption_text(caption, data)
        except TryFailed:
            return  # not readable: planning names it where it matters
        entry = self.entries.get(file_name)
        if column != "text":
            if (entry or {}).get(column) != (text or None):
                row = self.entries.setdefault(file_name, {"file_name": file_name})
                if text:
                    row[column] = text
                else:
                    row.pop(column, None)
                self.unsaved = True
            return
        styles = self.styles_of(file_name)
        if (
            not text and entry is not None and "text" in entry
        ):  # a caption made blank, or removed: no caption now
            self.entries[file_name] = {"file_name": file_name, **styles}
            if not styles:
                del self.entries[file_name]
            self.unsaved = True
        if text and (entry is None or entry.get("text") != text):
            self.entries[file_name] = {"file_name": file_name, "text": text, "recovered": True, **styles}
            self.unsaved = True

    def save(self) -> None:
        self.saved_at = time.monotonic()  # a failed save is tried again 10 s later, not per image
        if self.unsaved:
            lines = (json.dumps(entry, ensure_ascii=False) + "\n" for entry in self.entries.values())
            write_atomically(self.path, "".join(lines).translate(JSON_ESCAPES))
            self.unsaved = False


# ---------------------------------------------------------------------------
# Review page: every image of the run beside its caption, in one page for a browser
# ---------------------------------------------------------------------------
# The page's data, thumbnails and the template it is written into.


# The page is review-template.html (beside this script) with the run's data in it as JSON: a
# file:// page may not fetch a sidecar JSON file. Thumbnails go to a hidden folder beside the
# page as scripts (chunk-00000.js ...), which a file:// page may load, 100 to a file, so that a
# page of 20,000 images opens at once and loads only what it shows. No image file is written:
# no trainer can take a review thumbnail for a picture of the dataset.

REVIEW_TEMPLATE = Path(__file__).resolve().parent / "review-template.html"
THUMBNAIL_SIZE = 256
THUMBNAIL_QUALITY = 70  # ~10 KB a thumbnail
THUMBNAILS_PER_CHUNK = 100
SHORT_CAPTION_WORDS = 6


class Review:
    """What the review page will show of each image, gathered as the run goes."""

    def __init__(self, page: Path, config: Config) -> None:
        self.page = page
        self.config = config
        self.template = read_review_template()  # at the start: a run must not end without its page
        self.records: dict[str, dict] = {}  # by image
        # Each page has thumbnails of its own, in a folder of this run's: the page a rerun replaces
        # keeps showing its own until the new one is in place, even if the rerun is killed.
        self.thumbnail_folders = page.parent / f".{page.name}-thumbnails"
        self.thumbnails = self.thumbnail_folders / uuid.uuid4().hex[:12]
        self.chunk: list[str] = []  # data URIs of the chunk being filled
        self.chunks_written = 0
        self.broken = ""  # why no more thumbnails can be written

    def image(
        self, image: str, status: str, caption: str = "", reason: str = "", style: str = "", **more: object
    ) -> None:
        """What the card of an image shows: its main caption, or (style: an --also extension) a
        line for its caption in that style."""
        record = self.records.setdefault(image, {"thumb": None})
        if style and style != self.config.caption_ext:
            if "status" not in record:  # the main caption's, until said
                record.update(status="before", caption="", reason="", seconds=None, tokens=None, flags=[])
            record.setdefault("styles", {})[style] = {"status": status, "caption": caption, "reason": reason}
            return
        record.update(status=status, caption=caption, reason=reason, seconds=None, tokens=None, flags=[])
        record.update(more)

    def for_model(self, model: str) -> Review:
        self.config = replace(self.config, model=model)
        return self

    def settled(self, outcome: Outcome, style: str = "") -> None:
        task = outcome.task
        if task.style:
            status = "failed" if outcome.failure else "captioned"
            self.image(task.image, status, outcome.text, outcome.failure, style=style)
        elif outcome.failure:
            self.image(task.image, "failed", reason=outcome.failure)
        else:
            recovered = ["recovered"] if Fault.UNFIT_ANSWER in task.faults else []
            seconds, tokens = round(outcome.seconds, 2), outcome.answer.tokens
            self.image(task.image, "captioned", outcome.text, seconds=seconds, tokens=tokens, flags=recovered)
        self.keep_thumbnail(task.image, task.thumbnail)

    def keep_thumbnail(self, image: str, data: bytes) -> None:
        """Keep the thumbnail of an image whose prepared picture is at hand (JPEG bytes)."""
        if not data or image not in self.records or self.broken or self.records[image]["thumb"] is not None:
            return  # kept already: an image's styles share its picture
        self.records[image]["thumb"] = [self.chunks_written, len(self.chunk)]
        self.chunk.append("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"))
        if len(self.chunk) == THUMBNAILS_PER_CHUNK:
            self.write_chunk()

    def write_chunk(self) -> None:
        if not self.chunk or self.broken:
            return
        script = f"reviewThumbnails({self.chunks_written}, {json.dumps(self.chunk)});\n"
        try:
            self.thumbnails.mkdir(parents=True, exist_ok=True)
            write_atomically(self.thumbnails / f"chunk-{self.chunks_written:05d}.js", script)
        except OSError as exc:  # the page goes without thumbnails; the captions matter more
            self.broken = f"cannot write the review's thumbnails in {self.thumbnails}: {reason_of(exc)}"
            for record in self.records.values():
                record["thumb"] = None
            self.remove_thumbnails()
        self.chunk = []
        self.chunks_written += 1

    def write(self, summary: Summary, stop: Stop) -> None:
        """Make the thumbnails the run did not have at hand (not after a Ctrl-C), then write the
        page, then remove the thumbnails of the page it replaced."""
        missing = [image for image, record in self.records.items() if record["thumb"] is None]
        if not stop.asked.is_set() and not self.broken:
            with ThreadPoolExecutor(usable_cpus(), thread_name_prefix="thumbnail") as pool:
                for image, data in zip(missing, pool.map(thumbnail_of_file, missing)):
                    if stop.asked.is_set():
                        break
                    self.keep_thumbnail(image, data)
        self.write_chunk()
        self.keep_captions_of_failures()
        # Redacted as a last line of defence: a page people share must not hold what the run sends.
        data = redacted_data(
            {
                "run": self.run_data(summary),
                "images": [self.entry(image) for image in sorted(self.records, key=path_order)],
            }
        )
        text = json.dumps(data, ensure_ascii=False).translate(SCRIPT_SAFE)
        try:
            write_atomically(self.page, self.template.replace("__REVIEW_DATA__", text, 1))
        except OSError:
            self.remove_thumbnails()
            raise
        for older in self.thumbnail_folders.glob("*/"):
            if older != self.thumbnails:
                remove_thumbnail_chunks(older)
        remove_empty_folder(self.thumbnail_folders)

    def keep_captions_of_failures(self) -> None:
        """What the caption file of each caption that failed (the main one's, a style's) holds as
        the page is written (a failed redo keeps the caption before it): the text a person edits on the page, and the text the
        edit is checked against when applied (--apply-edits)."""
        for image, record in self.records.items():
            lines = [record, *record.get("styles", {}).values()]
            exts = [self.config.caption_ext, *record.get("styles", {})]
            for line, ext in zip(lines, exts):
                if line["status"] == "failed":
                    try:
                        caption = os.path.splitext(image)[0] + ext
                        line["kept"] = readable_text(existing_caption(caption, listed=True))
                    except TryFailed:
                        line["kept"] = ""

    def remove_thumbnails(self) -> None:
        """Remove this run's thumbnails, which no page will show (some could not be written, or
        the page could not), and the folder of thumbnail folders if nothing else is in it: a
        full disk must not be left with empty folders."""
        remove_thumbnail_chunks(self.thumbnails)
        remove_empty_folder(self.thumbnail_folders)

    def run_data(self, summary: Summary) -> dict:
        config = self.config
        return {
            "model": config.model,
            "api": config.api,
            "prompt": config.prompt.text,
            "created": time.strftime("%Y-%m-%d %H:%M"),
            "prefix": config.prefix.text,
            "suffix": config.suffix.text,
            "tokens_per_second": round(summary.tokens / (summary.generation_ns / 1e9), 1)
            if summary.generation_ns
            else 0.0,
            "seconds": round(summary.seconds, 1),
            # What the run paid for (every try and the preflight's picture), and at --price its cost.
            "input_tokens": summary.prompt_tokens,
            "output_tokens": summary.output_tokens,
            "reasoning_tokens": summary.reasoning_tokens,
            "cost": round(summary.cost, 8) if summary.price else None,
            "dry_run": config.dry_run,
            # The caption each card shows is the file of this extension beside its image: an edit
            # made on the page names its caption by the two (--apply-edits).
            "caption_ext": config.caption_ext,
            "thumbnails": self.relative(self.thumbnails) if self.chunks_written and not self.broken else "",
            "chunk_size": THUMBNAILS_PER_CHUNK,
        }

    def entry(self, image: str) -> dict:
        record = self.records[image]
        caption = record["caption"]
        clip_tokens, words = (estimated_clip_tokens(caption), len(caption.split())) if caption else (0, 0)
        flags = list(record["flags"])
        if caption:
            flags += ["over_clip"] if clip_tokens > CLIP_TOKENS else []
            flags += ["short"] if words < SHORT_CAPTION_WORDS else []
            flags += ["no_trigger"] if not has_trigger_words(caption, image, self.config) else []
        path = self.relative(image)
        styles = [{"ext": ext, **line} for ext, line in record.get("styles", {}).items()]
        return {
            **record,
            **({"styles": styles} if styles else {}),
            "path": path,
            "folder": path.rpartition("/")[0],
            "clip_tokens": clip_tokens,
            "words": words,
            "flags": flags,
        }

    def relative(self, path: str | Path) -> str:
        try:
            return readable_name(os.path.relpath(path, self.page.parent).replace(os.sep, "/"))
        except ValueError:  # Windows: the page on another drive than the image
            return readable_name(Path(path).resolve().as_uri())


# Inside <script>, "</script>" would end the data early and "<!--" change how it is parsed;
# U+2028 and U+2029 end a line in older JavaScript. Escaped, JSON.parse gives the same text.
SCRIPT_SAFE = {
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def read_review_template() -> str:
    try:
        return REVIEW_TEMPLATE.read_text(encoding="utf-8")
    except OSError as exc:
        raise CannotStart(
            f"cannot read {REVIEW_TEMPLATE}: {reason_of(exc)}; it belongs beside the script"
        ) from None


def remove_thumbnail_chunks(folder: Path) -> None:
    for chunk in folder.glob("chunk-*.js"):
        remove_quietly(str(chunk))
    remove_empty_folder(folder)


def remove_empty_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # something not ours is in it (or it is not a folder, or not there): left alone


def has_trigger_words(caption: str, image: str, config: Config) -> bool:
    prefix, suffix = config.prefix.fill(image, ""), config.suffix.fill(image, "")
    return all(
        re.search(rf"(?<!\w){re.escape(words)}(?!\w)", caption, re.IGNORECASE)
        for words in (prefix, suffix)
        if words
    )


def thumbnail_of(source: BinaryIO) -> bytes:
    """A small JPEG of a picture (its prepared form, or the file), or b"" if it cannot be read."""
    try:
        with Image.open(source) as picture:
            refuse_bombs(picture)
            return encode_jpeg(shrink_upright_rgb(picture, THUMBNAIL_SIZE, None), THUMBNAIL_QUALITY)
    except Exception:  # noqa: BLE001 - a picture that cannot be shown has no thumbnail, nothing more
        return b""


def thumbnail_of_file(image: Path) -> bytes:
    import_run_libraries()
    try:
        with open_regular_file(image) as file:
            return thumbnail_of(file)
    except OSError:
        return b""


def read_image_list(path: Path) -> set[str]:
    """--only: the images a list names, one a line (the review page's redo list, or a --failed-list),
    relative to the list's folder or absolute; lines starting with "# " are comments. A line is
    a name as it is, spaces included, and a name's bytes that are not UTF-8 are read back as they
    were written. A list of names each ended by a NUL byte, as find -print0 writes it, is read too."""
    try:
        data = read_regular_file(path)
    except OSError as exc:
        raise CannotStart(f"cannot read {path}: {reason_of(exc)}") from None
    names = names_between_nuls(data, path) if b"\0" in data else names_on_lines(data)
    return {os.path.realpath(path.parent / name) for name in names if name}


def names_on_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return [line for line in lines if not line.startswith("# ")]


def names_between_nuls(data: bytes, path: Path) -> list[str]:
    """The names of a NUL-separated list. Read rather than refused: find -print0 (git ls-files -z,
    grep -lZ) is how a shell lists names safely, and the only way to list a name with a line
    break, which a list of lines cannot hold. Such a list ends each name with one NUL, and has no
    empty name. Any other file with a NUL is binary (an image given by mistake: a PNG's header
    has NUL pairs, a BMP's padded rows end with one), and its bytes read as names would make
    thousands of failures, so it is refused."""
    names = data[:-1].split(b"\0")
    if not data.endswith(b"\0") or not all(names):
        raise CannotStart(
            f"--only {path}: not a list of images: it holds NUL bytes, but not as a NUL-separated list "
            "does (find -print0 ends each name with one)"
        )
    return [name.decode("utf-8", "surrogateescape") for name in names]


def write_image_list(path: Path, images: list[str], what: str) -> None:
    """--failed-list: the images, relative to the list's folder, in the form --only reads. Both
    folders real: --only resolves a link in the list's folder before the ".." that climb out of
    it, so a name relative to the link's own place would name another file wherever the link
    and its target are not as deep (and --only's entries kept are real paths already)."""
    lines = [f"# {what}, {time.strftime('%Y-%m-%d %H:%M')}; caption them again with --only {path.name}"]
    folder = os.path.realpath(path.parent)
    for image in sorted(images, key=path_order):
        image_folder, image_name = os.path.split(image)
        name = os.path.relpath(os.path.join(os.path.realpath(image_folder), image_name), folder)
        broken = "\n" in name or "\r" in name or name.startswith("# ")
        lines.append(f"# not listed, as its name cannot be one line: {name!r}" if broken else name)
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------
# Applying edits: a person's captions from the review page, written back
# ---------------------------------------------------------------------------
# --apply-edits FILE, a run of its own: read the edits the page downloaded, claim the folders,
# check that each caption still holds what the page showed, write it, say what became of each.


EDITS_FORMAT = "llava-caption-edits"  # the edits file's mark; its value is the file's version
EDITS_VERSION = 1
# The page's edits of 20,000 captions of a few hundred characters, each with the text it showed,
# take some 20 MB; a file many times that is no page's, and json.loads holds it several times over.
MAX_EDITS_FILE_BYTES = 128 * 1024 * 1024
# A caption is a line or a few paragraphs (T5, the longest text encoder trainers use, reads 512
# tokens, some 2,000 characters); a megabyte is no caption, whatever a file says.
MAX_EDIT_BYTES = 1024 * 1024
# A person's text is written as it is (the cleanup rules are for models' answers), line breaks
# and tabs included: a caption of several lines is how some trainers take several captions
# (kohya-ss/sd-scripts reads only the first line of a caption file unless --enable_wildcard,
# library/train_util.py read_caption; OneTrainer picks a line). Other control characters (NUL,
# escape sequences) are no text a trainer's tokenizer should read, and no textarea types them.
EDIT_LINE_BREAKS = "\n\r"
EDIT_CONTROLS_KEPT = "\n\r\t"
# The command line's settings that have a part in --apply-edits: the folders, how they are named,
# the caption extensions (--ext, and each --also's EXT), --dry-run, how much is said, the JSONL
# to mend. Any other given with it (--model, --review...) is refused rather than ignored: a
# person who gives it expects it to do something.
EDIT_RUN_SETTINGS = frozenset(
    ["paths", "recursive", "caption_ext", "also", "dry_run", "quiet", "verbose", "apply_edits", "jsonl"]
)


class Edit(NamedTuple):
    """One edit of the file, checked: the caption (image, caption extension) and its texts."""

    number: int  # its place in the file's list, from 1
    root: Path  # the folder given that holds the image
    image: Path  # resolved
    caption: Path
    ext: str  # the caption's extension: the pass (--ext or an --also style) whose journal lines it joins
    shown: str  # the text the page showed
    text: str  # the text to write


@dataclass
class EditsSummary:
    dry_run: bool = False
    applied: list[Path] = field(default_factory=list)  # written (with --dry-run: would be)
    already: list[Path] = field(default_factory=list)  # the caption holds the edit's text already
    changed: list[Path] = field(default_factory=list)  # no longer what the page showed: left alone
    refused: list[tuple[str, str]] = field(default_factory=list)  # (the edit, why): not applied
    unwritten: list[tuple[Path, str]] = field(default_factory=list)  # could not be read or written
    with_line_breaks: int = 0  # of the edits applied
    interrupted: bool = False
    jsonl_unwritten: str = ""  # why the --jsonl could not be written

    @property
    def exit_code(self) -> int:
        trouble = self.changed or self.refused or self.unwritten or self.interrupted or self.jsonl_unwritten
        return EXIT_SOME_FAILED if trouble else EXIT_OK


def apply_edits(
    config: Config, edits_file: Path, reporter: Reporter, stop: Stop | None = None
) -> EditsSummary:
    """Write the edits of a review page's edits file into the captions of config.folders, each
    only where the caption still holds the text the page showed, each recorded in its folder's
    journal as a person's (no later run of any pass touches it); with config.jsonl, the JSONL's
    row of each caption an edit names made to say what its file says. With config.dry_run nothing
    is written and no lock is taken. Raises CannotStart if the file cannot be used at all."""
    stop = stop or Stop()
    reporter.name_relative_to([folder.resolve() for folder in config.folders])  # captions are named resolved
    summary = EditsSummary(dry_run=config.dry_run)
    entries = read_edits_file(edits_file)
    metadata = Metadata(config.jsonl, "", config.caption_ext) if config.jsonl else None
    edits = checked_edits(entries, edits_file, config, summary, reporter)
    runs = {style.caption_ext: RunPass.of(style, main=config) for style in config.styles()}
    with ExitStack() as claimed:
        unwritable = (
            {}
            if config.dry_run
            else {root: claimed.enter_context(folder_lock(root, config.recursive)) for root in config.folders}
        )
        journals: dict[tuple[Path, str], Journal] = {}  # by folder and pass: each folder keeps its own
        try:
            for edit in edits:
                if stop.asked.is_set():
                    summary.interrupted = True
                    break
                journal = journal_of_edit(edit, journals, runs)
                apply_edit(edit, journal, unwritable.get(edit.root, ""), summary, reporter)
                if metadata:
                    mend_the_jsonl(metadata, edit, list(runs).index(edit.ext))
        finally:
            for (folder, _), journal in journals.items():
                journal.close()
                sync_folder(str(folder))  # the renames made durable, as the Writer does
            if metadata and not config.dry_run:
                save_the_jsonl(metadata, summary)
    return summary


def mend_the_jsonl(metadata: Metadata, edit: Edit, style: int) -> None:
    """The JSONL's row of the edit's caption, as its file now is (applied, or left as it was):
    the row a later run with --jsonl would mend it to (Metadata.recover())."""
    try:
        data = existing_caption(edit.caption, listed=True)
        # Named as a run names it, from the folder as given (perhaps a link), not resolved as the
        # edit's image is: a row by another name would be a second row of the same image.
        image = os.path.join(edit.root, edit.image.relative_to(edit.root.resolve()))
    except TryFailed:
        return  # what cannot be read was said of the edit
    except ValueError:
        return  # reached through a link below the folder: the next run with --jsonl mends it
    metadata.recover(image, os.path.splitext(image)[0] + edit.ext, data, style_column(edit.ext, style))


def save_the_jsonl(metadata: Metadata, summary: EditsSummary) -> None:
    try:
        metadata.save()
    except OSError as exc:
        summary.jsonl_unwritten = f"cannot write {metadata.path}: {reason_of(exc)}"


def journal_of_edit(
    edit: Edit, journals: dict[tuple[Path, str], Journal], runs: dict[str, RunPass]
) -> Journal:
    """The journal of the edit's folder, as its caption's pass reads it: a style's edit is recorded
    in that style's lines ("x"), as its captions are, and the main caption's Journal writes them all."""
    folder = edit.image.parent
    main_ext = next(iter(runs))  # the main caption's comes first (Config.styles())
    owner = journals.get((folder, main_ext)) or journals.setdefault(
        (folder, main_ext), Journal(str(folder), runs[main_ext])
    )
    return journals.setdefault((folder, edit.ext), Journal(str(folder), runs[edit.ext], owner))


def read_edits_file(path: Path) -> list:
    """The list of edits an edits file holds; CannotStart for a file that is none."""
    try:
        with open_regular_file(path) as file:
            data = file.read(MAX_EDITS_FILE_BYTES + 1)
    except OSError as exc:
        raise CannotStart(f"cannot read {path}: {reason_of(exc)}") from None
    if len(data) > MAX_EDITS_FILE_BYTES:
        raise CannotStart(
            f"{path} is larger than {MAX_EDITS_FILE_BYTES // 2**20} MiB: no review page's edits are; "
            "is it the right file?"
        )
    not_edits = f"{path} is not an edits file of the review page"
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise CannotStart(f"{not_edits}: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CannotStart(
            f"{not_edits}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):  # digits past Python's limit, nesting past its stack
        raise CannotStart(f"{not_edits}: not JSON this tool can read") from None
    if not isinstance(document, dict) or EDITS_FORMAT not in document:
        raise CannotStart(f'{not_edits} (it has no "{EDITS_FORMAT}" mark)')
    version = document[EDITS_FORMAT]
    if type(version) is not int:
        raise CannotStart(f"{not_edits}: its version is not a number")
    if version != EDITS_VERSION:
        raise CannotStart(
            f"{path} is an edits file of version {version}; this version of the tool reads version {EDITS_VERSION}"
        )
    edits = document.get("edits")
    if not isinstance(edits, list):
        raise CannotStart(f'{not_edits}: its "edits" is not a list')
    return edits


def checked_edits(
    entries: list, edits_file: Path, config: Config, summary: EditsSummary, reporter: Reporter
) -> list[Edit]:
    """The entries that name a caption of the folders given with texts that can be written;
    each other one is refused (named, with why), and so is every edit of a caption named twice."""
    edits: list[Edit] = []
    for number, entry in enumerate(entries, start=1):
        edit = edit_of(number, entry, edits_file.parent, config)
        if isinstance(edit, Edit):
            edits.append(edit)
        else:
            refuse_edit(summary, reporter, edit_named(number, entry), edit)
    named: dict[Path, int] = {}
    for edit in edits:
        named[edit.caption] = named.get(edit.caption, 0) + 1
    for edit in edits:
        if named[edit.caption] > 1:
            why = f"its caption is named {named[edit.caption]} times in {edits_file.name}; none of them is applied"
            refuse_edit(summary, reporter, f"edit {edit.number} ({reporter.name(edit.caption)})", why)
    return [edit for edit in edits if named[edit.caption] == 1]


def edit_named(number: int, entry: object) -> str:
    image = entry.get("image") if isinstance(entry, dict) else None
    return f"edit {number}" + (f" ({shortened(image, 80)})" if isinstance(image, str) else "")


def refuse_edit(summary: EditsSummary, reporter: Reporter, edit: str, why: str) -> None:
    summary.refused.append((edit, why))
    reporter.say(f"  refused {edit}: {why}")


def edit_of(number: int, entry: object, base: Path, config: Config) -> Edit | str:
    """The edit an entry of the file means, or why it cannot be applied. The file comes from a
    browser's downloads, and may have been written by anyone: nothing in it is trusted."""
    keys = ("image", "ext", "shown", "text")
    if not isinstance(entry, dict):
        return "not an edit (an object with " + ", ".join(keys) + ")"
    for key in keys:
        if not isinstance(entry.get(key), str):
            return f"its {key} is {'missing' if entry.get(key) is None else 'not text'}"
    name, ext, shown_text, text = (entry[key] for key in keys)
    # The text shown is whatever the caption file held, control characters and all.
    why = edit_text_refused(text, "text") or edit_text_refused(shown_text, "shown text", controls=True)
    if why:
        return why
    if ext not in caption_extensions(config):
        given = " ".join(caption_extensions(config))
        return (
            f"{shortened(ext, 20)} is not a caption extension of this run ({given}); "
            "give the --ext and --also the page's run had"
        )
    if not name or "\0" in name:
        return "its image is not a path"
    try:
        image = Path(os.path.abspath(base / name))  # relative names: to the edits file's folder
        folder = image.parent.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a loop of links
        return f"its image cannot be found: {reason_of(exc)}"
    root = next(
        (given for given in config.folders if is_captioned_folder(folder, given, config.recursive)), None
    )
    if root is None:
        below = any(is_below(folder, given) for given in config.folders) and not config.recursive
        return "its image is not in the folders given" + (" (it is below one: give -r)" if below else "")
    return edit_of_image(number, root, folder / image.name, ext, shown_text, text)


def edit_of_image(number: int, root: Path, image: Path, ext: str, shown_text: str, text: str) -> Edit | str:
    """The edit of an image of the folders given, if the image is one the run captions and its
    caption is a file of its own."""
    if os.path.splitext(image.name)[1].lower() not in IMAGE_EXTENSIONS or image.name.startswith("."):
        return f"{image.name} is not an image the tool captions"
    if not image.is_file():
        return f"{image.name} is not there (moved or deleted since the page was written)"
    stem = os.path.splitext(image.name)[0]
    caption = image.with_name(stem + ext)
    try:
        twins = [
            name
            for name in os.listdir(image.parent)
            if name != image.name
            and os.path.splitext(name)[0] == stem
            and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    except OSError as exc:
        return f"cannot list {image.parent}: {reason_of(exc)}"
    if twins:
        return f"{image.name} shares {caption.name} with {', '.join(sorted(twins))}; rename one of them"
    what = not_a_regular_file(caption)
    if what:
        return f"its caption {caption.name} is {what}; the tool writes only regular files"
    return Edit(number, root, image, caption, ext, shown_text, text)


def edit_text_refused(text: str, what: str, controls: bool = False) -> str:
    """Why a text of an edit cannot be a caption, or "" (see EDIT_CONTROLS_KEPT; with controls,
    control characters are no reason)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return f"its {what} is not valid text (it holds a lone surrogate, which UTF-8 cannot)"
    if size > MAX_EDIT_BYTES:
        return f"its {what} is {size:,} bytes: longer than any caption ({MAX_EDIT_BYTES:,})"
    if controls:
        return ""
    control = next(
        (char for char in text if unicodedata.category(char) == "Cc" and char not in EDIT_CONTROLS_KEPT), None
    )
    if control is not None:
        return f"its {what} holds a control character (U+{ord(control):04X}); a caption is text"
    return ""


def caption_extensions(config: Config) -> tuple[str, ...]:
    """The caption files of an image the run writes, by their extension (--ext, then each --also
    style's): the edits file names each caption by its image and one of these."""
    return tuple(style.caption_ext for style in config.styles())


def apply_edit(
    edit: Edit, journal: Journal, unwritable: str, summary: EditsSummary, reporter: Reporter
) -> None:
    """Check one caption against the text the page showed, and write the edit where it holds it:
    the journal line first, as for every caption the tool writes (see Journal)."""
    name = reporter.name(edit.caption)
    try:
        now = read_regular_file(edit.caption)
    except FileNotFoundError:
        now = b""
    except OSError as exc:
        edit_unwritten(summary, reporter, edit, f"cannot read it: {reason_of(exc)}")
        return
    data = edit.text.encode("utf-8")
    if now == data:  # applied before (the same file twice), or typed alike
        summary.already.append(edit.caption)
        if not summary.dry_run and not unwritable and not is_blank(now):
            mark_as_a_persons(edit, journal, now, summary, reporter)
        return
    if not holds_what_was_shown(now, edit.shown):
        summary.changed.append(edit.caption)
        reporter.say(f"  changed since the page was written, left alone: {name}")
        return
    if summary.dry_run:
        summary.applied.append(edit.caption)
        summary.with_line_breaks += any(char in EDIT_LINE_BREAKS for char in edit.text)
        reporter.say(f"  would apply {name}")
        return
    if unwritable:
        edit_unwritten(summary, reporter, edit, f"cannot write in {edit.root}: {unwritable}")
        return
    history = journal.history(journal.name(edit.image))
    before = text_digest(now)
    origin = "none" if is_blank(now) else origin_of(history, before)
    try:
        if journal.open_for_writing():
            raise OSError(errno.EIO, journal.unwritable)
        journal.add_edit(edit.image, before, data, origin)  # before the caption: see Journal
        write_atomically(edit.caption, data)
        journal.edit_landed(edit.image, data)
    except (OSError, TryFailed) as exc:
        edit_unwritten(summary, reporter, edit, f"cannot write it: {reason_of(exc)}")
        return
    summary.applied.append(edit.caption)
    summary.with_line_breaks += any(char in EDIT_LINE_BREAKS for char in edit.text)
    if reporter.verbosity > 0:
        reporter.say(f"  applied {name}")


def mark_as_a_persons(
    edit: Edit, journal: Journal, now: bytes, summary: EditsSummary, reporter: Reporter
) -> None:
    """A caption that holds the edit's text already is the person's all the same: recorded so,
    unless its journal says so already."""
    history = journal.history(journal.name(edit.image))
    if origin_of(history, text_digest(now)) == "person":
        return
    try:
        journal.add_edit(edit.image, text_digest(now), now, origin_of(history, text_digest(now)))
        journal.edit_landed(edit.image, now)
    except TryFailed as exc:
        summary.already.remove(edit.caption)
        edit_unwritten(summary, reporter, edit, f"cannot record it: {exc}")


def holds_what_was_shown(data: bytes, shown_text: str) -> bool:
    """Whether a caption file holds the text the page showed of it, as the page shows a caption
    (readable_text()); a blank file, where the page showed nothing visible."""
    return readable_text(data) == shown_text or (is_blank(data) and has_nothing_visible(shown_text))


def edit_unwritten(summary: EditsSummary, reporter: Reporter, edit: Edit, why: str) -> None:
    summary.unwritten.append((edit.caption, why))
    reporter.say(f"  not applied {reporter.name(edit.caption)}: {why}")


def report_edits(summary: EditsSummary, reporter: Reporter) -> None:
    """A line for each outcome that some edit had."""
    applied = "would apply" if summary.dry_run else "applied"
    reporter.say(f"{applied} {counted(len(summary.applied), 'edit')}")
    if summary.with_line_breaks:
        reporter.say(
            f"  {summary.with_line_breaks} of them with line breaks, kept: sd-scripts reads only a caption's "
            "first line unless --enable_wildcard"
        )
    if summary.already:
        reporter.say(f"already on disk: {counted(len(summary.already), 'edit')}")
    if summary.changed:
        reporter.say(
            f"changed since the page was written, left alone: {counted(len(summary.changed), 'caption')}"
        )
    if summary.refused:
        reporter.say(f"refused: {counted(len(summary.refused), 'edit')}")
    if summary.unwritten:
        reporter.say(f"not written: {counted(len(summary.unwritten), 'edit')}")
    if summary.interrupted:
        reporter.say("interrupted: the edits after the last one applied are left for a rerun")
    if summary.jsonl_unwritten:
        reporter.error(summary.jsonl_unwritten)


# ---------------------------------------------------------------------------
# Reporter: everything the run prints
# ---------------------------------------------------------------------------
# Progress, ETA, failures and the summary, worded here; a terminal gets a live line, a
# pipe one line per image.


class Reporter:
    """Everything the run tells a person, on stderr: a live bar on a terminal, lines in a log.
    Every line passes through shown(), so no file name, caption or server message can move
    the cursor, clear the screen or set the window title."""

    BAR_WIDTH = 24

    def __init__(self, verbosity: int = 0, stream: TextIO | None = None) -> None:
        self.verbosity = verbosity  # -1 quiet, 0 normal, 1 captions too
        self.stream = stream or sys.stderr or io.StringIO()  # None when started with 2>&-
        self.live = self.stream.isatty() and verbosity >= 0
        self.base: list[str] = []  # images are named relative to it: its path_parts(), normcase()d
        self.summary = Summary()
        self.done = 0
        self.sending_since = 0.0
        self.live_line_shown = False
        self.pacing = False  # the rate limit, not the servers, sets the pace now
        self.last_pull_status = ""
        self.writing = threading.Lock()  # servers are checked, and may pull, in parallel

    def name_relative_to(self, folders: list[Path]) -> None:
        """Images are named from the folder given, or with several from the folder they share:
        datasets/a and datasets/b give a/x.jpg and b/y.jpg."""
        try:
            self.base = [os.path.normcase(part) for part in path_parts(os.path.commonpath(folders))]
        except ValueError:  # absolute and relative folders, or different Windows drives
            self.base = []

    def name(self, image: str | Path) -> str:
        """A path named from the base, as Path.relative_to() would (else whole), but by os.path:
        pathlib would intern the name of every image said (see Listing.path_of())."""
        parts = path_parts(image)
        if [os.path.normcase(part) for part in parts[: len(self.base)]] == self.base:
            return joined(parts[len(self.base) :])
        return joined(parts)

    def folder_name(self, folder: Path) -> str:
        name = self.name(folder)
        return str(folder) if name == "." else name

    def start(self, summary: Summary) -> None:
        self.summary = summary
        self.sending_since = time.monotonic()
        if summary.listed:
            self.say_plan(summary)
        if self.live:
            self.draw_bar("")

    def listed(self, summary: Summary) -> None:
        """Every folder is listed and planned: the total is known."""
        if summary.orphans:
            names = ", ".join(self.name(orphan) for orphan in summary.orphans[:5])
            more = f" and {len(summary.orphans) - 5} more" if len(summary.orphans) > 5 else ""
            have = "has" if len(summary.orphans) == 1 else "have"
            self.say(
                f"note: {counted(len(summary.orphans), 'caption file')} {have} no image (left untouched): "
                f"{names}{more}"
            )
        if self.sending_since:
            self.say_plan(summary)

    # -- what the run says as it goes, each worded once --------------------

    def prompt_taken(self, source: str) -> None:
        self.say(f"using the {source}")

    def folder_failed(self, folder: Path, why: str) -> None:
        self.say(f"FAILED {self.folder_name(folder)}: {why}")

    def left_out_at_the_start(self, report: str) -> None:
        self.say(f"warning: {report}; captioning with the others")

    def waiting_for_a_restart(self, url: str, sign: str, seconds: float) -> None:
        self.say(f"{url} {sign}; waiting up to {duration(seconds)} in case it is restarting")

    def ray_workers(self, workers: int, nodes: int) -> None:
        self.say(f"ray: {counted(workers, 'worker')} on {counted(nodes, 'node')}")

    def answers(self, url: str, again: bool = False) -> None:
        self.say(f"{url} answers{' again' if again else ''}")

    def busy_at_the_start(self, url: str, failure: str, seconds: float) -> None:
        self.say(f"{url} is busy or loading ({failure}); waiting up to {duration(seconds)}")

    def one_at_a_time(self, model: str, architecture: str, url: str, jobs: int) -> None:
        self.say(
            f"note: {model} ({architecture}) answers one request at a time on {url}, whatever "
            f"OLLAMA_NUM_PARALLEL says: --jobs {jobs} only queues there"
        )

    def option_deprecated(self, key: str, since: str, url: str) -> None:
        self.say(f"warning: --option {key} is deprecated since {since}: {url} may not apply it")

    def answers_one_at_a_time(self, url: str, jobs: int, causes: str) -> None:
        self.say(
            f"note: {url} answers one request at a time although --jobs is {jobs}: {causes}; "
            "--jobs 2 keeps it as busy there, --jobs 1 nearly"
        )

    def field_adapted(self, url: str, name: str, instead: str | None) -> None:
        sent = f"sent as {instead}" if instead else "left out"
        self.say(f"note: {url} does not take {name} for this model: {sent} for the rest of the run")

    def value_adapted(self, url: str, name: str, value: str) -> None:
        self.say(
            f"note: {url} takes another {name} for this model: {value} (its least) for the rest of the run"
        )

    def paced(self, url: str, why: str) -> None:
        self.say(
            f"note: {url} is paced by its rate limit ({why}): the limit, not the server's speed, "
            "sets the pace, and the ETA follows it"
        )

    def pace_sets(self, pacing: bool) -> None:
        self.pacing = pacing

    def key_unencrypted(self, url: str) -> None:
        self.say(f"warning: the API key goes to {url} unencrypted (http://); use https:// to send it")

    def ollama_behind_openai(self, url: str) -> None:
        self.say(f"note: {url} is Ollama: --api ollama is its better path (--num-ctx, --keep-alive)")

    def cannot_stop_thinking(self, model: str, url: str, level: str) -> None:
        self.say(
            f"note: {model} cannot turn thinking off on {url} (its thinking values list no false): it thinks "
            f"at its lowest level, {level}, and each caption costs that thinking time"
        )

    def thinks_anyway(self, model: str) -> None:
        self.say(
            f"warning: {model} thinks although asked not to (a thinking-only tag?): every caption "
            "costs its thinking time; choose a tag that does not think, such as an -instruct one"
        )

    def stopped_answering(self, url: str, failure: str, seconds: float) -> None:
        self.say(f"{url} stopped answering ({failure}); waiting up to {duration(seconds)} for it")

    def stopping(self, seconds: float) -> None:
        self.say(
            f"stopping: waiting up to {seconds:.0f}s for the answers on their way (Ctrl-C again to quit at once)"
        )

    def cannot_write(self, path: Path, why: str) -> None:
        self.say(f"warning: cannot write {path}: {why}")

    def review_written(self, page: Path) -> None:
        self.say(f"review page: {page} (open it in a browser)")

    def error(self, message: str) -> None:
        self.say(f"error: {message}")

    def say_plan(self, summary: Summary) -> None:
        if self.verbosity >= 0:
            self.say(
                f"{summary.to_caption} to caption, {summary.skipped} already captioned"
                f"{edited_since(summary.left_alone)}"
            )

    def position(self) -> str:
        return f"{self.done}/{self.summary.to_caption if self.summary.total_known else '?'}"

    def image_captioned(self, image: str, caption: str, seconds: float) -> None:
        self.done += 1
        if self.verbosity >= 0 and not self.live:
            self.say(
                f"[{self.position()}] {self.name(image)} {seconds:.1f}s, ETA {self.eta()}{self.spending()}"
            )
        if self.verbosity > 0:
            self.say(f"    {caption}")
        if self.live:
            self.draw_bar(f"{self.name(image)} {seconds:.1f}s")

    def image_failed(self, image: str, why: str, counted: bool = True) -> None:
        self.done += counted
        position = f"[{self.position()}] " if counted else ""
        self.say(f"{position}FAILED {self.name(image)}: {why}")
        if self.live and counted:
            self.draw_bar("")

    def eta(self) -> str:
        if not self.summary.total_known:
            return "listing\u2026"
        if not self.done:
            return "unknown"
        per_image = (time.monotonic() - self.sending_since) / self.done
        return duration(per_image * (self.summary.to_caption - self.done))

    def draw_bar(self, current: str) -> None:
        filled = (
            self.BAR_WIDTH * self.done // max(self.summary.to_caption, 1) if self.summary.total_known else 0
        )
        elapsed = time.monotonic() - self.sending_since
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.draw_live_line(
            f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {self.position()} "
            f"{rate:.2f} img/s{' at the rate limit' if self.pacing else ''} ETA {self.eta()}{self.spending()}"
            f"  {current}"
        )

    def spending(self) -> str:
        """With --price: ", $0.0421 so far of ~$1.27" (the estimate once the total is known)."""
        if not self.summary.price:
            return ""
        total = self.summary.estimated_total_cost()
        return f", {money(self.summary.cost)} so far" + (f" of ~{money(total)}" if total is not None else "")

    def draw_live_line(self, line: str) -> None:
        self.write("\r\x1b[K" + shown(line))
        self.live_line_shown = True

    def end_live_line(self) -> None:
        if self.live_line_shown:
            self.write("\n")
            self.live_line_shown = False

    def say(self, line: str) -> None:
        with self.writing:
            if self.live_line_shown:
                self.write("\r\x1b[K")
                self.live_line_shown = False
            self.write(shown(line) + "\n")

    def write(self, text: str) -> None:
        text = redacted(text)  # the last line of defence: every reason is redacted already
        try:
            self.stream.write(text)
            self.stream.flush()
        except UnicodeEncodeError:  # a terminal that is not UTF-8 (a Latin-1 locale): escape
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except (OSError, ValueError):
            # The reader went away (a closed pipe, `| head`): the run goes on, unheard, and
            # still writes its captions and its JSONL.
            self.stream = io.StringIO()

    def pulling(self, model: str, status: str, completed: int | None, total: int | None) -> None:
        if self.live:
            share = f" {100 * completed // total}%" if completed and total else ""
            self.draw_live_line(f"pulling {model}: {status}{share}")
        elif status != self.last_pull_status:
            self.say(f"pulling {model}: {status}")
        self.last_pull_status = status

    def list_planned(self, images: list[str]) -> str:
        """A dry run's listing, on stdout: one image to caption a line. Returns why it could not
        be written (stdout on a full disk), or ""."""
        listing = redacted("".join(shown(self.name(image)) + "\n" for image in images))
        try:
            if sys.stdout and listing:  # None when started with >&-
                sys.stdout.write(
                    listing.encode(sys.stdout.encoding, "backslashreplace").decode(sys.stdout.encoding)
                )
                sys.stdout.flush()
        except OSError as exc:
            # Later writes (Python's own flush at exit) go nowhere instead of printing an error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            if not reader_went_away(exc):  # the list is the dry run's output: it is lost
                return f"cannot write the list of images to stdout: {reason_of(exc)}"
        return ""

    def dry_run_done(self, summary: Summary) -> None:
        unfinished = "" if summary.listed else " (interrupted before every folder was planned)"
        self.say(
            f"dry run: would caption {summary.to_caption}, skip {summary.skipped} already captioned"
            f"{edited_since(summary.left_alone)}{unfinished}; nothing was sent"
        )
        if summary.price:
            prompt_tokens, output_tokens, cost = summary.estimated_cost()
            unopened = summary.not_estimated
            unreadable = f"; {counted(unopened, 'image')} could not be opened" if unopened else ""
            self.say(
                f"estimated cost: {money(cost)} at --price ({prompt_tokens:,} input tokens: each picture as "
                f"OpenAI's GPT-4o family counts it at detail high, the text at 4 characters a token; "
                f"{output_tokens:,} output tokens at {EXPECTED_CAPTION_TOKENS} a caption{unreadable}). "
                "Other models count pictures otherwise, and retries and thinking cost more: a rough guide, "
                "not a bill"
            )

    def finish(self, summary: Summary) -> None:
        rate = summary.captioned / summary.seconds if summary.seconds else 0.0
        line = (
            f"captioned {summary.captioned}, skipped {summary.skipped}, {left_alone(summary.left_alone)}"
            f"failed {len(summary.failed)} in {duration(summary.seconds)} ({rate:.2f} images/s)"
        )
        if summary.interrupted:
            line = f"interrupted: {line}; {left_for_a_rerun(summary)}"
        self.say(line)
        if len(summary.by_folder) > 1:
            for folder, counted in summary.by_folder.items():
                self.say(
                    f"  {folder}: captioned {counted.captioned}, "
                    f"skipped {counted.skipped}, {left_alone(counted.left_alone)}failed {counted.failed}"
                )
        for ext, counted in summary.by_style.items():  # a run with --also: each style is a pass
            self.say(
                f"  {ext} captions: captioned {counted.captioned}, "
                f"skipped {counted.skipped}, {left_alone(counted.left_alone)}failed {counted.failed}"
            )
        if len(summary.by_server) > 1 or summary.server_trouble:
            for server, count in summary.by_server.items():
                self.say(f"  {server}: captioned {count}")
            for trouble in summary.server_trouble:
                self.say(f"  {trouble}")
        for url, jobs in summary.one_at_a_time:
            self.say(f"  {url} answered one request at a time: --jobs {jobs} only queued there")
        for url, why, waited in summary.paced:
            self.say(
                f"  {url} was paced by its rate limit, not its speed ({why}): requests waited "
                f"{duration(waited)} in all for it"
            )
        if summary.captioned:
            self.say(caption_statistics(summary))
        if summary.price:  # else the tokens end the statistics' line, where captions were written
            self.say(f"  {tokens_paid(summary)}; cost {money(summary.cost)} at --price{unsaid(summary)}")
        if summary.stopped:
            self.say(f"stopped: {summary.stopped}")
        for error in summary.output_errors:
            self.say(f"error: {error}")
        for folder, why in summary.left_out:
            self.say(f"  left out {self.folder_name(folder)}: {why}")
        for image, why in sorted(summary.failed, key=lambda failure: (path_order(failure[0]), failure[1])):
            self.say(f"  failed {self.name(image)}: {why}")


def counted(count: int, noun: str) -> str:
    """count of a noun, singular for one: "1 image", "2 images"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def left_alone(count: int) -> str:
    return f"left alone {count} (edited since written), " if count else ""


def edited_since(count: int) -> str:
    return f", {count} edited since written (left alone)" if count else ""


def reader_went_away(exc: OSError) -> bool:
    # `--dry-run | head`: the reader has all it wanted, which is no failure. Windows says EINVAL
    # where POSIX says EPIPE.
    return isinstance(exc, BrokenPipeError) or (os.name == "nt" and exc.errno == errno.EINVAL)


def money(amount: float) -> str:
    # Providers publish prices in dollars; a caption costs a fraction of a cent.
    return f"${amount:.2f}" if amount >= 10 else f"${amount:.4f}"


def tokens_paid(summary: Summary) -> str:
    reasoning = f" ({summary.reasoning_tokens:,} reasoning, no caption)" if summary.reasoning_tokens else ""
    return f"tokens paid for: {summary.prompt_tokens:,} input, {summary.output_tokens:,} output{reasoning}"


def unsaid(summary: Summary) -> str:
    answers = summary.estimated_answers
    return f" ({counted(answers, 'answer')} said no token count: estimated)" if answers else ""


def caption_statistics(summary: Summary) -> str:
    count = summary.lines or summary.captioned  # each line a caption with --join "\\n"
    speed = summary.tokens / (summary.generation_ns / 1e9) if summary.generation_ns else 0.0
    thinking = " (thinking included)" if summary.thought else ""
    # A server that sends no usage (some OpenAI-compatible ones) gives no token count to divide.
    generated = f"{speed:.1f} tokens/s generated{thinking}; " if summary.tokens else ""
    paid = f"; {tokens_paid(summary)}" if summary.prompt_tokens and not summary.price else ""
    return (
        f"  {generated}captions average {counted(round(summary.words / count), 'word')}; "
        f"{summary.over_clip_limit} of {count} longer than {CLIP_TOKENS} CLIP tokens "
        f"(estimated from words and punctuation){paid}"
    )


def shown(text: str) -> str:
    """Text as a terminal may show it: control and format characters escaped (\\x1b, \\n,
    \\u202e), and the bytes of a name that is not UTF-8 as \\xNN."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else escaped(char) for char in text)


def escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------
# Command line: arguments, signals and main()
# ---------------------------------------------------------------------------
# The arguments turned into a Config (refusing what cannot work, exit 2), Ctrl-C and
# kill, and main(): parse, run, exit with the code the summary gives.


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, as every other reason a run cannot start: the usage is a --help away.
        self.exit(EXIT_CANNOT_START, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llava-caption-ollama.py",
        usage="%(prog)s [options] DIR [PROMPT_FILE]\n       %(prog)s [options] DIR [DIR ...] [--prompt PROMPT_FILE]",
        description="Caption every image of one or more folders with a vision model served by Ollama, "
        "writing <image stem>.txt beside each image.",
    )
    parser.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="folder of images; several folders are captioned in one run. DIR PROMPT_FILE, a folder and "
        "then a file, gives the prompt file as --prompt does",
    )
    parser.add_argument(
        "--prompt",
        type=Path,
        metavar="FILE",
        help="text file with the instruction sent with every image (default: prompt.txt beside this script)",
    )
    parser.add_argument(
        "--folder-prompt",
        metavar="NAME",
        default="",
        help="a file NAME in a folder (or in a folder above it, up to the DIR given) is the prompt for that "
        "folder's images, instead of --prompt",
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    parser.add_argument(
        "--model",
        help=f"vision model (default: {DEFAULT_MODEL}; with --api openai, the one model the server serves)",
    )
    parser.add_argument(
        "--api",
        choices=tuple(APIS),
        default=Config.api,
        help="the servers' API: Ollama's own, or the OpenAI-compatible one of vLLM, SGLang, llama.cpp's "
        "llama-server and LM Studio (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="URL",
        help=f"the server; give it several times to share the work among servers (default: $OLLAMA_HOST, "
        f"else {DEFAULT_HOST}; with --api openai, $OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="with --api openai: the environment variable holding the API key (default: OPENAI_API_KEY, or the "
        "hosted provider's: GEMINI_API_KEY, OPENROUTER_API_KEY)",
    )
    parser.add_argument(
        "--provider",
        choices=("auto", *PROVIDERS),
        default="auto",
        help="with --api openai: the hosted service the server is, sent only the fields it takes (default: auto, "
        "known by the host of --host: api.openai.com, generativelanguage.googleapis.com, openrouter.ai); name it "
        "for a gateway or proxy in front of one",
    )
    parser.add_argument(
        "--detail",
        choices=IMAGE_DETAILS,
        help="OpenAI's image detail: low is a small fixed number of tokens per image, high reads it in tiles; "
        "only where the provider takes it (OpenAI)",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=number(int, at_least=1),
        default=Config.jobs,
        help="requests in flight per server; set it to the server's OLLAMA_NUM_PARALLEL + 1 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep-alive",
        type=keep_alive_duration,
        help="how long the server keeps the model loaded after each request, "
        f"as seconds or a duration such as 30m or 2h; -1 keeps it forever (default: {DEFAULT_KEEP_ALIVE})",
    )
    parser.add_argument(
        "--timeout",
        type=number(float, more_than=0, at_most=86400),
        default=Config.timeout,
        help="seconds to wait for one answer, queueing included (default: %(default)s)",
    )
    parser.add_argument(
        "--max-size",
        type=number(int, at_least=0),
        default=Config.max_size,
        help="downscale so the longer side is at most this many pixels; "
        "0 sends every file's original bytes untouched (default: %(default)s)",
    )
    parser.add_argument(
        "--ext",
        dest="caption_ext",
        metavar="EXT",
        default=Config.caption_ext,
        help="caption file extension (default: %(default)s)",
    )
    parser.add_argument(
        "--also",
        action="append",
        metavar="PROMPT_FILE:EXT",
        help="also write a caption of another style beside each image, asked with PROMPT_FILE, in "
        "<image stem>EXT (such as tags.txt:.tags); give it once per style",
    )
    parser.add_argument(
        "--join",
        metavar="SEP",
        help='with --existing append/prepend: what joins the answer to the caption (default: ", "); '
        '"\\n" puts each caption on a line of its own',
    )
    parser.add_argument(
        "--existing",
        choices=("skip", "overwrite", "append", "prepend"),
        help="what to do where a non-empty caption exists (default: skip; with --only: the mode of "
        "the pass that wrote each caption, else overwrite)",
    )
    parser.add_argument(
        "--overwrite-edits",
        action="store_true",
        help="with --existing overwrite/append/prepend: also redo captions edited since this tool wrote "
        "them (left alone otherwise)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="with --existing overwrite/append/prepend: forget which images earlier runs of the same "
        "settings already did, and do them all again",
    )
    parser.add_argument(
        "--prefix",
        type=caption_text_argument,
        default="",
        help="text put first in every caption, e.g. a trigger word",
    )
    parser.add_argument(
        "--suffix", type=caption_text_argument, default="", help="text put last in every caption"
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="write the model's answer without cleaning it up (see docs/how-it-works.md, Cleanup)",
    )
    parser.add_argument(
        "--any-script",
        action="store_true",
        help="accept answers in any script; by default an answer that drifts into a script neither the "
        "prompt nor the trigger words use (Chinese from a Qwen model asked in English) is asked again",
    )
    parser.add_argument(
        "--retries",
        type=number(int, at_least=0),
        default=Config.retries,
        help="times to try an image again after an answer unfit to train on (with a new seed), "
        "a crashed server, a timeout or a broken connection; a busy or rate-limited server (429, 503) "
        "uses none (default: %(default)s)",
    )
    parser.add_argument(
        "--wait-server",
        type=number(float, at_least=0, at_most=86400 * 7),
        default=Config.wait_server,
        metavar="SECONDS",
        help="how long to wait for a server that stopped answering before giving up on it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rpm",
        type=number(float, at_least=0),
        default=Config.rpm,
        metavar="N",
        help="requests a minute each server may be sent (every address of a hosted provider together), a hosted API's limit you know; a server's "
        "x-ratelimit-* headers and Retry-After are kept to anyway (default: no limit of its own)",
    )
    parser.add_argument(
        "--tpm",
        type=number(int, at_least=0),
        default=Config.tpm,
        metavar="N",
        help=f"tokens a minute each server may be sent (a hosted provider's addresses together), each request counted as --max-tokens + "
        f"{PROMPT_TOKENS_GUESS:,} (a picture and the prompt) (default: no limit of its own)",
    )
    parser.add_argument(
        "--temperature", type=number(float, at_least=0), help="sampling temperature (model default)"
    )
    parser.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same captions")
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        type=ray_address,  # not applied to a default of None, as argparse applies it to a string's
        help="prepare and send the images on a Ray cluster's workers: auto (the cluster this machine "
        "belongs to, or $RAY_ADDRESS), ray://HOST:10001, or local (a Ray started here); with --host "
        f"local:PORT each node sends to its own server (needs Ray: {RAY_INSTALL})",
    )
    parser.add_argument(
        "--option",
        action="append",
        type=option_argument,
        metavar="KEY=VALUE",
        help="a model option in the server's own words, sent with every request; give it once per option. "
        "Ollama's options (repeat_penalty=1.1, top_k=40, min_p=0.05), or a request field of an "
        "OpenAI-compatible server (vLLM: repetition_penalty=1.1). The value is JSON where it parses "
        "(numbers, true, false), else text",
    )
    parser.add_argument(
        "--system",
        type=Path,
        metavar="FILE",
        help="text file sent as the system message, before the prompt, with the same placeholders "
        "(JoyCaption expects one: see docs/servers-and-models.md)",
    )
    parser.add_argument(
        "--max-tokens",
        type=number(int, at_least=1),
        help=f"longest answer in tokens (num_predict), thinking included; longer answers fail as cut off "
        f"(default: {DEFAULT_MAX_TOKENS}, with --think {DEFAULT_MAX_TOKENS_THINKING})",
    )
    parser.add_argument(
        "--think",
        action="store_true",
        help="let a model that can think (qwen3-vl, qwen3.5, gemma4...) think before it captions, as it does by "
        "default: sometimes a better caption, always slower; by default thinking is turned off (a model that "
        "cannot turn it off, such as Qwen 3.8, thinks at its lowest level)",
    )
    parser.add_argument(
        "--think-level",
        choices=THINK_LEVELS,
        metavar="LEVEL",
        help=f"let a model that thinks at levels (Qwen 3.8...) think at this one of {', '.join(THINK_LEVELS)} "
        "(implies --think); refused, naming the levels it takes, where the model does not take it",
    )
    parser.add_argument(
        "--num-ctx",
        type=number(int, at_least=1),
        help=f"context length (default: {DEFAULT_NUM_CTX})",
    )
    parser.add_argument(
        "--jsonl",
        type=Path,
        help="also keep this metadata.jsonl (Hugging Face imagefolder format) of every caption",
    )
    parser.add_argument(
        "--review",
        type=Path,
        metavar="PAGE.html",
        help="write a page that shows every image beside its caption, to review them in a browser; with "
        "--dry-run, of the folders as they are, sending nothing",
    )
    parser.add_argument(
        "--only",
        type=Path,
        metavar="LIST",
        help="caption exactly the images a list names (one path a line, as the review page's redo list or "
        "--failed-list writes it), overwriting their captions",
    )
    parser.add_argument(
        "--apply-edits",
        type=Path,
        metavar="FILE",
        help="write the captions edited on the review page (its downloaded edits file) into the folders "
        "given, each only where the caption still holds what the page showed; nothing is captioned",
    )
    parser.add_argument(
        "--failed-list",
        type=Path,
        metavar="FILE",
        help="write the images that failed to FILE, in the form --only reads",
    )
    parser.add_argument(
        "--price",
        type=price_pair,
        metavar="IN/OUT",
        help="the model's price per million input and output tokens, as the provider publishes it (e.g. "
        "0.15/0.60): the cost so far and the estimated total are shown, and with --dry-run estimated",
    )
    parser.add_argument(
        "--max-cost",
        type=number(float, more_than=0),
        metavar="AMOUNT",
        help="stop before the run would spend more than AMOUNT at --price (the requests in flight reserve "
        "their worst case); what is left waits for a rerun",
    )
    parser.add_argument("--pull", action="store_true", help="pull the model if the server lacks it")
    parser.add_argument("--dry-run", action="store_true", help="list what would be captioned; send nothing")
    parser.add_argument("--limit", type=number(int, at_least=1), help="caption at most N images")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    chatter.add_argument("-v", "--verbose", action="store_true", help="also print each caption")
    return parser


def number(
    kind: type, at_least: float | None = None, more_than: float | None = None, at_most: float = 1e9
) -> Callable[[str], float]:
    """An argparse type: a finite number of kind, at least or more than a bound, and not so large
    that a timer or a server cannot take it."""

    def parse(text: str) -> float:
        value = kind(text)
        if not math.isfinite(value) or abs(value) > at_most:
            raise argparse.ArgumentTypeError(f"must be a number up to {at_most:g}, not {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least}, not {text}")
        if more_than is not None and value <= more_than:
            raise argparse.ArgumentTypeError(f"must be more than {more_than}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def option_argument(text: str) -> tuple[str, Any]:
    """--option KEY=VALUE: the key, and the value as JSON where it parses (1.1, 40, true,
    ["###"]), else as the text it is. NaN and Infinity, which Python's json takes but JSON has
    not, stay text. A value no request can carry is refused here, whatever the API."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"'{shown(text)}' is not KEY=VALUE, such as repeat_penalty=1.1")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(
            f"'{shown(text)}': option names are ASCII letters, digits and _ (not starting with a digit), "
            "such as repeat_penalty"
        )
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r} gives {key} no value")
    try:
        parsed = json.loads(value, parse_constant=not_json)
    except ValueError:
        parsed = value
    if parsed is None:
        raise argparse.ArgumentTypeError(f"{text!r}: null leaves {key} at the server's default; leave it out")
    why = unsendable(parsed)
    if why:
        raise argparse.ArgumentTypeError(f"{shown(text)}: {why}")
    return key, parsed


def not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def unsendable(value: Any) -> str:
    """Why no request could carry value (an --option's, as parsed), or "". JSON reads a number
    beyond a double's range (1e400) as infinity, which JSON has no way to write; a byte that is not
    UTF-8 (typed in a Latin-1 terminal) or a lone surrogate escaped in JSON ("\\ud800") is text
    that UTF-8, which every request is encoded in, cannot hold. The client fails to encode either,
    so every image failed with nothing sent, told that the server's answer was not its JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid text (UTF-8)"
        return ""
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    if isinstance(items, list):
        return next(filter(None, map(unsendable, items)), "")
    return ""


def caption_text_argument(text: str) -> str:
    # A byte that is not UTF-8 (typed in a Latin-1 terminal) reaches Python as a lone
    # surrogate, which no caption file can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text"
        ) from None
    return without_invisibles(text, keep_lines=False).strip()


def keep_alive_duration(text: str) -> str | float:
    # Ollama parses a string with Go's time.ParseDuration, so "5" without a unit is a 400 on
    # every request (api.Duration.UnmarshalJSON): bare numbers are sent as seconds.
    try:
        return number(float)(text)
    except ValueError:
        pass
    if not re.fullmatch(r"-?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or a duration like 30m")
    return text


def server_url(text: str, ollama_port: bool = True) -> str:
    """The one spelling of a server's address, read as the ollama client reads OLLAMA_HOST
    (ollama/_client.py, _parse_host): a bare host gets port 11434, http:// port 80, https://
    port 443. The host stays as given (localhost too), so NO_PROXY sees the name the user gave,
    as it does for curl and the ollama client."""
    given = text.strip()
    scheme, has_scheme = "http", "://" in given
    try:
        parts = urlsplit(given if has_scheme else f"http://{given}")
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a server address (the port must be 1-65535)"
        ) from None
    if has_scheme:
        scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or (not parts.hostname and not parts.netloc.startswith(":")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a server address such as http://127.0.0.1:11434")
    host = (parts.hostname or "127.0.0.1").lower()
    if port is None and not has_scheme and not ollama_port:
        raise argparse.ArgumentTypeError(f"{text!r} needs its port, such as http://{text}:8000")
    if port is None:
        port = (443 if scheme == "https" else 80) if has_scheme else 11434
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a server address (the port must be 1-65535)")
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def price_pair(text: str) -> tuple[float, float]:
    """An argparse type: IN/OUT, two prices per million tokens."""
    parts = text.split("/")
    try:
        prices = tuple(float(part) for part in parts)
    except ValueError:
        prices = ()
    if len(prices) != 2 or not all(math.isfinite(price) and 0 <= price <= 1e6 for price in prices):
        raise argparse.ArgumentTypeError(
            f"must be IN/OUT, the prices per million input and output tokens (e.g. 0.15/0.60), not {text}"
        )
    return prices[0], prices[1]


def config_from_args(args: argparse.Namespace) -> Config:
    settings = {item.name: getattr(args, item.name) for item in fields(Config) if hasattr(args, item.name)}
    settings.update(APIS[args.api].settings(args))
    settings.update(model_options=model_options(args), system=system_prompt(args), ray=args.ray or "")
    folders, prompt_file, second_path = folders_and_prompt(args.paths, args.prompt)
    refuse_folders_inside_others(folders, args.recursive)
    refuse_jsonl_away_from(folders, args.jsonl)
    refuse_folder_prompt_name(args.folder_prompt)
    if args.max_cost is not None and args.price is None:
        raise CannotStart("--max-cost needs --price IN/OUT, the prices it counts the cost at")
    if not args.ray and any(url.startswith(LOCAL_HOST) for url in settings["hosts"]):
        raise CannotStart("--host local:PORT is each Ray node's own server: it needs --ray")
    settings.update(
        folders=folders,
        think=args.think or bool(args.think_level),  # a level is thinking, with thinking's budget
        think_level=args.think_level or "",
        max_tokens=args.max_tokens
        or (DEFAULT_MAX_TOKENS_THINKING if args.think or args.think_level else DEFAULT_MAX_TOKENS),
        prompt=read_prompt(prompt_file),
        # A glob that matched one folder and one file (datasets/* with a notes.md) takes this
        # form too: the run says which file it took for the prompt.
        announce_prompt=second_path,
        prefix=Template(args.prefix, source="--prefix"),
        suffix=Template(args.suffix, source="--suffix"),
        caption_ext=caption_extension(args.caption_ext),
        # A redo is what the user asked for: the listed images' captions are replaced.
        only=frozenset(read_image_list(args.only)) if args.only else None,
        existing=args.existing or ("overwrite" if args.only else "skip"),
        redo_in_its_mode=bool(args.only) and args.existing is None,
    )
    settings.update(also=styles_of(args.also or [], settings["caption_ext"]), join=join_of(args))
    refuse_unreachable_pace(args.rpm, args.tpm, settings["max_tokens"] + PROMPT_TOKENS_GUESS)
    exts = [settings["caption_ext"]] + [style.ext for style in settings["also"]]
    for ext in exts:
        refuse_output_paths(args, ext, prompt_file)
    inputs = [("the prompt file", prompt_file), ("--system", args.system)]
    inputs += [(f"--also {value}", Path(value.rpartition(":")[0])) for value in args.also or []]
    for ext in exts:
        refuse_inputs_where_captions_go(inputs, folders, args.recursive, ext)
    config = Config(**settings)
    for words in (config.prefix, config.suffix, config.system):
        if words.captions:
            raise CannotStart(f"{words.source}: only a prompt may ask for {{caption:EXT}}")
    asking_order(config.prompt, config)
    if config.jsonl:
        refuse_clashing_columns(config)
    return config


def refuse_jsonl_away_from(folders: list[Path], jsonl: Path | None) -> None:
    if jsonl and not jsonl.parent.is_dir():
        raise CannotStart(f"--jsonl: the folder {jsonl.parent} does not exist")
    for folder in folders:
        if jsonl and not is_below(folder, jsonl.parent):
            # imagefolder reads file_name relative to the JSONL's folder, with no "..".
            raise CannotStart(f"--jsonl must be in {folder} or a folder above it, whose images it lists")


def styles_of(values: list[str], caption_ext: str, read_prompts: bool = True) -> list[Style]:
    """--also PROMPT_FILE:EXT, each split on its last colon (a Windows path has one of its own);
    without read_prompts, each style's prompt is left unread (the built-in one in its place)."""
    styles: list[Style] = []
    for value in values:
        prompt_file, colon, ext = value.rpartition(":")
        if not (colon and prompt_file and ext.startswith(".")):
            raise CannotStart(f"--also {value}: give PROMPT_FILE:EXT, such as tags.txt:.tags")
        ext = caption_extension(ext, f"--also {value}:")
        taken = [caption_ext] + [style.ext for style in styles]
        if ext.lower() in map(str.lower, taken):
            whose = "--ext" if ext.lower() == caption_ext.lower() else "another --also"
            raise CannotStart(f"--also {value}: {ext} is the extension of {whose}; give each style its own")
        for other in taken:
            shorter, longer = sorted((ext, other), key=len)
            if longer.lower().endswith(shorter.lower()):
                # x.short.txt, the .short.txt caption of x.png, is the .txt caption of x.short.png.
                raise CannotStart(
                    f"--also {value}: x{longer} would also be the {shorter} caption of an image named "
                    f"x{longer[: -len(shorter)]}: give each style an extension no other ends with"
                )
        prompt = read_prompt(Path(prompt_file)) if read_prompts else Template(BUILT_IN_PROMPT)
        styles.append(Style(prompt, ext))
    return styles


def join_of(args: argparse.Namespace) -> str:
    """--join, with "\\n" read as a line break (what people type in a shell); CannotStart where it
    could join nothing."""
    if args.join is None:
        return Config.join
    join = args.join.replace("\\n", "\n").replace("\\t", "\t")
    if not join or "\r" in join:
        raise CannotStart('--join: give the text that joins two captions, such as ", " or "\\n"')
    if args.existing not in MERGING and not args.only:
        raise CannotStart(
            "--join joins an answer to the caption it adds to: give --existing append or prepend"
        )
    return join


def refuse_clashing_columns(config: Config) -> None:
    for style in config.also:
        if style_column(style.ext) in JSONL_COLUMNS:
            raise CannotStart(
                f"--also ...:{style.ext}: its --jsonl column would be {style_column(style.ext)!r}, "
                "which the JSONL uses for something else; give the style another extension"
            )


def refuse_unreachable_pace(rpm: float, tpm: int, tokens: int) -> None:
    """A pace no run could keep: a request an hour or more apart, or a minute's tokens fewer than
    one request's (it would never be sent)."""
    if rpm and rpm < 1 / 60:
        raise CannotStart(
            f"--rpm {rpm:g} sends less than one request an hour: give at least 0.02, or no --rpm"
        )
    if tpm and tpm < tokens:
        raise CannotStart(
            f"--tpm {tpm} is less than one request counts (~{tokens:,} tokens: --max-tokens + "
            f"{PROMPT_TOKENS_GUESS:,}): no request could ever be sent; raise it, or lower --max-tokens"
        )


def model_options(args: argparse.Namespace) -> dict:
    """--option, each key given once, as the API sends them (CannotStart for one it cannot)."""
    given: dict = {}
    for key, value in args.option or []:
        if key in given:
            raise CannotStart(f"--option {key} is given twice")
        given[key] = value
    return APIS[args.api].options_to_send(given)


def system_prompt(args: argparse.Namespace) -> Template:
    """--system's file, read as a prompt file is; an empty Template without it."""
    if args.system is None:
        return Template("")
    if not APIS[args.api].sends_system:
        raise CannotStart(f"--system: the {args.api} API has no place for a system message; run without it")
    return read_template(args.system, "system prompt file")


def refuse_output_paths(args: argparse.Namespace, caption_ext: str, prompt_file: Path) -> None:
    """What the run writes besides captions must be a regular file or nothing, and land on none
    of the run's inputs (an image, a caption, a prompt), the tool's own files, or each other."""
    outputs = [("--review", args.review), ("--failed-list", args.failed_list), ("--jsonl", args.jsonl)]
    given = [(option, path) for option, path in outputs if path]
    for option, path in given:
        if not path.parent.is_dir():
            raise CannotStart(f"{option}: the folder {path.parent} does not exist")
        what = not_a_regular_file(path)
        if what == "a folder":
            raise CannotStart(f"{option}: {path} is a folder; give a file name")
        if what:
            raise CannotStart(
                f"{option}: {path} is {what}; give a regular file or a new name (an output is written "
                "beside it and renamed over it)"
            )
        overwritten = input_at(path, caption_ext, prompt_file, args.folder_prompt)
        if args.system and same_file(path, args.system):
            overwritten = "the system prompt file"
        if overwritten:
            raise CannotStart(f"{option}: {path} would overwrite {overwritten}")
    for (one, first), (other, second) in itertools.combinations(given, 2):
        if same_file(first, second):
            raise CannotStart(f"{one} and {other} name the same file, {first}")


def refuse_inputs_where_captions_go(
    inputs: list[tuple[str, Path | None]], folders: list[Path], recursive: bool, caption_ext: str
) -> None:
    """A prompt file or --system's file must not be where the run writes an image's caption: the
    caption would replace it, and the next run would send that caption as its prompt. Each input
    is (what it is, its path or None)."""
    for what, path in inputs:
        image = image_captioned_at(path, folders, recursive, caption_ext) if path else ""
        if image:
            raise CannotStart(
                f"{what} {path} is where the caption of {image} goes: the run would write over it; "
                "move it out of the folder or rename it"
            )


def image_captioned_at(path: Path, folders: list[Path], recursive: bool, caption_ext: str) -> str:
    """The image whose caption the run writes at path (image_captioned_by(), in a folder the run
    captions), or "". A caption replaces the name it is written at, whatever file that name
    leads to, so the folder is path's own, not its target's."""
    if not os.path.lexists(path):  # the built-in prompt: no file to write over
        return ""
    folder = path.parent.resolve()
    if any(is_captioned_folder(folder, given, recursive) for given in folders):
        return image_captioned_by(path, caption_ext)
    return ""


def is_captioned_folder(folder: Path, given: Path, recursive: bool) -> bool:
    """Whether the run captions the images of folder (resolved), given that folder on the command
    line: the folder itself, or with --recursive one below it that is not hidden (discovery
    passes over names that start with a dot)."""
    try:
        below = folder.relative_to(given.resolve())
    except ValueError:
        return False
    if not below.parts:
        return True
    return recursive and not any(part.startswith(".") for part in below.parts)


def input_at(path: Path, caption_ext: str, prompt_file: Path, folder_prompt: str) -> str:
    """Which of the run's inputs (or the tool's own files) an output at path would overwrite, or
    "". Names are compared whatever their case: on a file system that ignores it (macOS's,
    Windows') A.txt and a.TXT are one file."""
    name = path.name.lower()
    if os.path.splitext(name)[1] in IMAGE_EXTENSIONS:
        return "an image"
    if name.startswith(OWN_FILE_PREFIX):  # the journal; the lock, removed at the end, output and all
        return "a file of this tool's own"
    if same_file(path, prompt_file):  # the next run would send the output as its prompt
        return "the prompt file"
    if folder_prompt and name == folder_prompt.lower():
        return f"a folder's prompt file (--folder-prompt {folder_prompt})"
    image = image_captioned_by(path, caption_ext)
    return f"the caption of {image}" if image else ""


def image_captioned_by(path: Path, caption_ext: str) -> str:
    """The name of the image beside path whose caption path is, or "". The folder is listed once
    rather than asked for each image extension in each case (a.jpg, A.JPG, a.Jpg...)."""
    if not path.name.lower().endswith(caption_ext.lower()):
        return ""
    stem = path.name[: -len(caption_ext)].lower()
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:  # a folder we cannot list we cannot write in either: the write says so
        return ""
    for name in names:
        image_stem, ext = os.path.splitext(name)
        if image_stem.lower() == stem and ext.lower() in IMAGE_EXTENSIONS:
            return name
    return ""


def same_file(one: Path, other: Path) -> bool:
    """Whether two paths name one file: spelt alike once resolved, or, for files that exist, one
    file under two names (a hard link, a case-insensitive file system)."""
    if os.path.realpath(one) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them does not exist (yet)
        return False


def not_a_regular_file(path: Path) -> str:
    """What is at path if it is neither a regular file nor nothing, else "". An output is written
    to a temporary file beside it and renamed over it, so that it is never half-written: the
    rename would replace a device, a named pipe or a socket with a file, and a link (even one to
    a regular file) instead of the file it points to. /dev/stdout is such a link (to the
    terminal or the pipe of file descriptor 1), which no rename can write to."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there, or nothing we may look at: the write names the reason
        return ""
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    kinds = {
        stat.S_ISREG: "",
        stat.S_ISDIR: "a folder",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISSOCK: "a socket",
    }
    return next((what for test, what in kinds.items() if test(mode)), "not a regular file")


def refuse_folder_prompt_name(name: str) -> None:
    if os.sep in name or "/" in name or name in (".", ".."):
        raise CannotStart(f"--folder-prompt takes a file name, not a path: {name}")
    if name.startswith(OWN_FILE_PREFIX):
        raise CannotStart(f"--folder-prompt {name}: that name is this tool's own (its lock and journal)")
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        raise CannotStart(f"--folder-prompt {name}: that is an image's name")


def folders_and_prompt(paths: list[Path], prompt: Path | None) -> tuple[list[Path], Path, bool]:
    """The folders to caption and the prompt file. DIR PROMPT_FILE is the form the tool always
    had; otherwise every path is a folder: a file in a shell glob's expansion (datasets/* with a
    notes.md in it) must never silently become the prompt."""
    if prompt is None and len(paths) == 2 and not paths[1].is_dir():
        if not paths[0].is_dir():
            refuse_not_folder(paths[0])
        return [paths[0]], paths[1], True
    folders: list[Path] = []
    seen = set()
    for path in paths:
        if not path.is_dir():
            refuse_not_folder(path, several=len(paths) > 1 and prompt is None)
        # Given twice: captioned once. By what it is, not its path: a bind mount (mount --bind A B)
        # shows one folder at two real paths, whose second lock would look like another run's.
        if folder_identity(str(path)) not in seen:
            seen.add(folder_identity(str(path)))
            folders.append(path)
    return folders, prompt or DEFAULT_PROMPT_FILE, False


def refuse_not_folder(path: Path, several: bool = False) -> NoReturn:
    hint = (
        "; with several folders, give the prompt file as --prompt FILE" if several and path.is_file() else ""
    )
    raise CannotStart(f"{path} is not a folder{hint}")


def refuse_folders_inside_others(folders: list[Path], recursive: bool) -> None:
    # With --recursive a folder inside another given one would be captioned twice, and its lock
    # would look like another run's.
    if not recursive:
        return
    for inner in folders:
        for outer in folders:
            if inner is not outer and is_below(inner, outer):
                raise CannotStart(
                    f"{inner} is inside {outer}, which --recursive already covers; give one of them"
                )


def is_below(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def server_urls(given: list[str], source: str, ollama_port: bool) -> list[str]:
    urls: dict[str, str] = {}
    for text in given:
        if text.strip().lower().startswith(LOCAL_HOST):  # each Ray node's own server
            port = text.strip()[len(LOCAL_HOST) :]
            if not (port.isdigit() and 0 < int(port) < 65536):
                raise CannotStart(f"{source}: {text!r}: local: takes a port, such as local:11434")
            urls.setdefault(f"{LOCAL_HOST}{int(port)}", f"{LOCAL_HOST}{int(port)}")
            continue
        try:
            url = server_url(text, ollama_port)
        except argparse.ArgumentTypeError as exc:
            raise CannotStart(f"{source}: {exc}") from None
        if not ollama_port:
            url = re.sub(r"/v1$", "", url)  # the base URL with or without /v1, as clients take it
        urls.setdefault(same_server(url), url)  # one server given twice is one server
    return list(urls.values())


def same_server(url: str) -> str:
    # localhost is 127.0.0.1: the server given both ways is one, reached by the name given first.
    return re.sub(r"^(https?://)localhost(?=:)", r"\g<1>127.0.0.1", url)


def read_prompt(path: Path) -> Template:
    if path == DEFAULT_PROMPT_FILE and not os.path.lexists(path):
        return Template(BUILT_IN_PROMPT, source="the built-in prompt", as_read=BUILT_IN_PROMPT)
    return read_template(path, "prompt file")


def read_template(path: Path, what: str) -> Template:
    """A prompt file's text (the prompt's, or --system's) as a Template; CannotStart if it cannot be
    read or is empty: nothing visible, by the rule a caption is judged empty by (is_blank())."""
    try:
        data = read_regular_file(path)
        # utf-8-sig: Notepad's byte-order mark is not part of the prompt.
        as_read = data.decode("utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CannotStart(f"cannot read {what} {path}: {reason_of(exc)}") from None
    if has_nothing_visible(as_read):
        invisible = ": it holds only invisible characters (control or format ones: NUL, zero-width space)"
        raise CannotStart(f"{what} {path} is empty{invisible if as_read else ''}")
    # A file saved on Windows (CRLF) or an old Mac (CR) is the same prompt, and the same pass,
    # as one saved with "\n": the model is never sent a carriage return.
    text = as_read.replace("\r\n", "\n").replace("\r", "\n")
    return Template(text, source=f"{what} {path}", as_read=as_read)


def caption_extension(ext: str, option: str = "--ext") -> str:
    ext = ext if ext.startswith(".") else "." + ext
    if ext == "." or "/" in ext or os.sep in ext:
        raise CannotStart(f"{option} {ext!r} is not a file extension")
    # Judged by the final suffix: "--ext .1.jpg" would make photo.1.jpg's caption photo.1.jpg.
    final = os.path.splitext("x" + ext)[1].lower()
    if final in IMAGE_EXTENSIONS:
        raise CannotStart(f"{option} {ext} would overwrite images")
    if final in DATASET_SIDE_EXTENSIONS:
        raise CannotStart(f"{option} {ext} would overwrite files a trainer keeps beside the images ({final})")
    return ext


class Signals:
    """The command line's answer to Ctrl-C (INT), kill and timeout (TERM) and a closed
    terminal (HUP): the first asks the run to stop (answers on their way are written, the
    summary printed), the second hurries it (they are not waited for), a third kills outright.
    At its end the process dies by the first signal, as a program that handles a signal must:
    a shell loop over folders sees the death ($? 130, 143, 129) and stops too, where an exit
    status of 130 would make bash go on with the next folder."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")  # Windows has no SIGHUP

    @classmethod
    def numbers(cls) -> list[int]:
        return [getattr(signal, name) for name in cls.NAMES if hasattr(signal, name)]

    def __init__(self, stop: Stop) -> None:
        self.stop = stop
        self.received: list[int] = []
        self.previous: dict[int, object] = {}

    @contextmanager
    def handled(self) -> Iterator[Signals]:
        """Handle the signals while the run lasts; then whatever handled them before."""
        if threading.current_thread() is threading.main_thread():  # the only one allowed to
            for name in self.NAMES:
                number = getattr(signal, name, None)
                # A signal ignored from the start stays ignored: nohup's HUP, the INT of a
                # shell script's background job.
                if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self.handle)
        try:
            yield self
        finally:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    def handle(self, number: int, frame: object) -> None:
        self.received.append(number)
        if len(self.received) <= 2:
            self.stop.ask()
            return
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)

    def die(self) -> int:
        """End the process by the first signal received. Where a process cannot kill itself by
        a signal (Windows), return that platform's status for it: 0xC000013A for Ctrl-C."""
        number = self.received[0]
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if os.name == "nt":
            return 0xC000013A if number == signal.SIGINT else 128 + number
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        time.sleep(5)  # the signal ends the process before this does
        return 128 + number


@contextmanager
def library_chatter_silenced() -> Iterator[None]:
    """What the command line sets up for the process: libraries' own messages (Pillow's
    warnings, libtiff writing "LZWDecode: Not enough data..." straight to file descriptor 2)
    are silenced; what matters of them is in the image's failure reason. Python's sys.stderr,
    where the tool reports, keeps the real stderr."""
    with warnings.catch_warnings(), ExitStack() as restore:
        warnings.simplefilter("ignore")
        try:
            real_stderr = os.dup(2)
        except OSError:  # no file descriptor 2 to speak of
            yield
            return
        restore.callback(os.close, real_stderr)
        if stream_on_descriptor(sys.stderr, 2):
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
            ours = open(real_stderr, "w", encoding=encoding, closefd=False)  # noqa: SIM115 - closed below
            restore.callback(close_quietly, ours)
            restore.callback(setattr, sys, "stderr", sys.stderr)
            sys.stderr = ours
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        restore.callback(os.dup2, real_stderr, 2)
        yield


def close_quietly(stream: TextIO) -> None:
    try:
        stream.close()
    except OSError:  # what it still held was for a reader that went away (`| head`)
        pass


def stream_on_descriptor(stream: TextIO, descriptor: int) -> bool:
    try:
        return stream.fileno() == descriptor
    except (AttributeError, OSError, ValueError):  # a test's capture, say
        return False


def paths_after_double_dash(argv: Sequence[str] | None) -> list[str]:
    """The arguments, where everything after "--" is a path, even one that starts with a dash.
    parse_intermixed_args loses such a path (`-- -dash` says DIR is required, Python 3.11), so
    it is given as ./-dash, which Path reads back as -dash."""
    given = list(sys.argv[1:] if argv is None else argv)
    if "--" not in given:
        return given
    end = given.index("--")
    after = [os.path.join(os.curdir, arg) if arg.startswith("-") else arg for arg in given[end + 1 :]]
    return given[:end] + after


def ray_address(value: str) -> str:
    # An empty value ("--ray $UNSET_VARIABLE") would be taken as no --ray: the run would go on here.
    if not value.strip():
        raise argparse.ArgumentTypeError("give auto, local, ray://HOST:10001 or HOST:6379")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        # Intermixed, so that options may stand between the positionals: DIR -r PROMPT.
        args = parser.parse_intermixed_args(paths_after_double_dash(argv))
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    if args.ray and __name__ != RAY_MODULE:
        return importable_self().main(argv)
    stop = Stop()
    with Signals(stop).handled() as signals, library_chatter_silenced():
        reporter = Reporter(verbosity=-1 if args.quiet else int(args.verbose))
        if args.apply_edits:
            code = edits_applied(args, parser, reporter, stop)
        else:
            code = captions_made(args, reporter, stop)
    if signals.received:
        return signals.die()
    return code


def captions_made(args: argparse.Namespace, reporter: Reporter, stop: Stop) -> int:
    """A run that captions; its exit code."""
    try:
        summary = caption_folders(config_from_args(args), reporter, stop)
    except CannotStart as exc:
        reporter.error(str(exc))
        return EXIT_CANNOT_START
    if not args.dry_run:
        reporter.finish(summary)
    else:
        for error in summary.output_errors:
            reporter.error(error)
    return summary.exit_code


def edits_applied(
    args: argparse.Namespace, parser: argparse.ArgumentParser, reporter: Reporter, stop: Stop
) -> int:
    """--apply-edits: a run that writes a person's edits; its exit code."""
    try:
        summary = apply_edits(edits_config_from_args(args, parser), args.apply_edits, reporter, stop)
    except CannotStart as exc:
        reporter.error(str(exc))
        return EXIT_CANNOT_START
    report_edits(summary, reporter)
    return summary.exit_code


def edits_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """The settings --apply-edits uses (EDIT_RUN_SETTINGS); any other option given is refused."""
    for action in parser._actions:
        if action.dest in EDIT_RUN_SETTINGS or action.dest == "help":
            continue
        if getattr(args, action.dest, action.default) != action.default:
            flag = max(action.option_strings, key=len)
            raise CannotStart(
                f"--apply-edits writes the edits and nothing else: {flag} has no part in it; leave it out"
            )
    folders, prompt_file, _ = folders_and_prompt(args.paths, args.prompt)
    refuse_folders_inside_others(folders, args.recursive)
    refuse_jsonl_away_from(folders, args.jsonl)
    config = Config(
        folders=folders,
        prompt=Template(BUILT_IN_PROMPT),  # a prompt writes no edit: the run's pass is nobody's
        caption_ext=caption_extension(args.caption_ext),
        recursive=args.recursive,
        dry_run=args.dry_run,
        # --also names the styles' extensions, checked as a run checks them; their prompts write no edit.
        also=styles_of(args.also or [], caption_extension(args.caption_ext), read_prompts=False),
        jsonl=args.jsonl,
    )
    for style in config.styles():
        refuse_output_paths(args, style.caption_ext, prompt_file)
    if config.jsonl:
        refuse_clashing_columns(config)
        if same_file(config.jsonl, args.apply_edits):
            raise CannotStart(f"--jsonl and --apply-edits name the same file, {config.jsonl}")
        if not config.jsonl.exists():
            # Its rows of the edited captions alone would be a JSONL that lists only them.
            raise CannotStart(
                f"--jsonl: {config.jsonl} does not exist; --apply-edits mends the rows of a JSONL a run "
                "wrote, and a run with --jsonl writes it whole"
            )
    return config


if __name__ == "__main__":
    sys.exit(main())
