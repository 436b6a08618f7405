#!/usr/bin/env python3
"""Caption every image of a folder with a vision model served by a local Ollama.

    python llava-caption-ollama.py DIR [PROMPT_FILE]

Each caption is written as <image stem>.txt beside its image (the Kohya convention),
atomically: a caption file is either complete or absent.  The work itself is
caption_folder(), usable without the command line; main() parses and calls it.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import queue
import random
import re
import string
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

try:
    import httpx
    import ollama
    from PIL import Image, UnidentifiedImageError
except ImportError as missing:  # a user can cause this, so no traceback
    print(f"error: {missing.name} is not installed; run: pip install -r requirements.txt", file=sys.stderr)
    sys.exit(2)

EXIT_OK, EXIT_SOME_FAILED, EXIT_CANNOT_START, EXIT_INTERRUPTED = 0, 1, 2, 130

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PROMPT_FILE = Path(__file__).resolve().parent / "prompt.txt"
IMAGE_EXTENSIONS = frozenset([".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"])
CLIP_TOKENS = 77  # what Stable Diffusion's text encoder reads of a caption
# What a prompt file may ask for, filled in for each image (see prompt_for()).
PLACEHOLDERS = ("name", "folder", "class", "existing")


class CaptionError(Exception):
    """Something a user (or their server, or their files) caused: reported in one line."""


class Transient(CaptionError):
    """A failure that another try may not repeat: a busy or crashed runner, a timeout."""


class BadAnswer(Transient):
    """An answer unfit to train on (empty, refused, looping, cut off): ask again."""


class ConnectionTrouble(Transient):
    """The connection to a server broke: the server is to blame, not (probably) the image."""


class ServerUnreachable(ConnectionTrouble):
    """Nothing answers at the Ollama address."""


class ModelMissing(CaptionError):
    """The server answered 404 for the model."""


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


@dataclass
class Config:
    folder: Path
    prompt: str
    model: str = "llava:13b"
    hosts: list[str] = field(default_factory=lambda: [DEFAULT_HOST])
    jobs: int = 2
    keep_alive: str | float = "30m"
    timeout: float = 600.0
    max_size: int = 1344
    caption_ext: str = ".txt"
    existing: str = "skip"
    recursive: bool = False
    pull: bool = False
    dry_run: bool = False
    limit: int | None = None
    prefix: str = ""
    suffix: str = ""
    raw: bool = False
    retries: int = 3
    wait_server: float = 300.0
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    # llava 1.6 turns one image into up to ~2,880 tokens: a 2,048 context gives empty
    # answers (ollama-facts.md §2.7).
    num_ctx: int = 4096
    jsonl: Path | None = None

    def options(self) -> dict:
        """Sampling and load options, the same on every request: a changed load-time option
        makes Ollama reload the model (ollama-facts.md §2.6)."""
        chosen = {"temperature": self.temperature, "seed": self.seed, "num_predict": self.max_tokens}
        return {"num_ctx": self.num_ctx, **{key: value for key, value in chosen.items() if value is not None}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-caption-ollama.py",
        description="Caption every image of a folder with a vision model served by Ollama, "
        "writing <image stem>.txt beside each image.",
    )
    parser.add_argument("folder", type=Path, help="folder of images")
    parser.add_argument(
        "prompt_file",
        type=Path,
        nargs="?",
        default=DEFAULT_PROMPT_FILE,
        help="text file with the instruction sent with every image (default: prompt.txt beside this script)",
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    parser.add_argument("--model", default=Config.model, help="Ollama vision model (default: %(default)s)")
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="URL",
        help=f"Ollama server; give it several times to share the work among servers "
        f"(default: $OLLAMA_HOST, else {DEFAULT_HOST})",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=at_least(int, 1),
        default=Config.jobs,
        help="requests in flight per server; set it to the server's OLLAMA_NUM_PARALLEL + 1 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep-alive",
        type=keep_alive_duration,
        default=Config.keep_alive,
        help="how long the server keeps the model loaded after each request, "
        "as seconds or a duration such as 30m or 2h; -1 keeps it forever (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=at_least(float, 0, above=True),
        default=Config.timeout,
        help="seconds to wait for one answer, queueing included (default: %(default)s)",
    )
    parser.add_argument(
        "--max-size",
        type=at_least(int, 0),
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
        "--existing",
        choices=("skip", "overwrite", "append", "prepend"),
        default=Config.existing,
        help="what to do where a non-empty caption exists (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix", type=str.strip, default="", help="text put first in every caption, e.g. a trigger word"
    )
    parser.add_argument("--suffix", type=str.strip, default="", help="text put last in every caption")
    parser.add_argument("--raw", action="store_true", help="write the model's answer without cleaning it up")
    parser.add_argument(
        "--retries",
        type=at_least(int, 0),
        default=Config.retries,
        help="times to try an image again after an answer unfit to train on (with a new seed), "
        "a busy or crashed server, a timeout or a broken connection (default: %(default)s)",
    )
    parser.add_argument(
        "--wait-server",
        type=at_least(float, 0),
        default=Config.wait_server,
        metavar="SECONDS",
        help="how long to wait for a server that stopped answering before giving up on it "
        "(default: %(default)s)",
    )
    parser.add_argument("--temperature", type=at_least(float, 0), help="sampling temperature (model default)")
    parser.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same captions")
    parser.add_argument("--max-tokens", type=at_least(int, 1), help="longest answer in tokens (num_predict)")
    parser.add_argument(
        "--num-ctx",
        type=at_least(int, 1),
        default=Config.num_ctx,
        help="context length (default: %(default)s)",
    )
    parser.add_argument(
        "--jsonl",
        type=Path,
        help="also keep this metadata.jsonl (Hugging Face imagefolder format) of every caption written",
    )
    parser.add_argument("--pull", action="store_true", help="pull the model if the server lacks it")
    parser.add_argument("--dry-run", action="store_true", help="list what would be captioned; send nothing")
    parser.add_argument("--limit", type=at_least(int, 1), help="caption at most N images")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    chatter.add_argument("-v", "--verbose", action="store_true", help="also print each caption")
    return parser


def at_least(kind: type, minimum: float, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of kind, at least minimum (or, with above, more than it)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not (value > minimum if above else value >= minimum):  # NaN fails both
            raise argparse.ArgumentTypeError(
                f"must be {'more than' if above else 'at least'} {minimum}, not {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def keep_alive_duration(text: str) -> str | float:
    # Ollama parses a string with Go's time.ParseDuration, so "5" without a unit is a 400
    # error on every request (ollama-facts.md §1.4): send bare numbers as seconds.
    try:
        return float(text)
    except ValueError:
        pass
    if not re.fullmatch(r"-?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or a duration like 30m")
    return text


def config_from_args(args: argparse.Namespace) -> Config:
    settings = {item.name: getattr(args, item.name) for item in fields(Config) if hasattr(args, item.name)}
    hosts = args.hosts or [os.environ.get("OLLAMA_HOST") or DEFAULT_HOST]
    settings.update(
        prompt=read_prompt(args.prompt_file),
        hosts=list(dict.fromkeys(hosts)),
        caption_ext=caption_extension(args.caption_ext),
    )
    return Config(**settings)


def read_prompt(path: Path) -> str:
    try:
        prompt = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionError(f"cannot read prompt file {path}: {reason(exc)}") from None
    if not prompt:
        raise CaptionError(f"prompt file {path} is empty")
    check_template(prompt, path)
    return prompt


def check_template(prompt: str, path: Path) -> None:
    # An unknown placeholder silently filled with nothing would change every caption of the
    # run (peers.md: "Silent prompt changes"), so it stops the run before any request.
    try:
        fields = [parsed[1:] for parsed in string.Formatter().parse(prompt) if parsed[1] is not None]
    except ValueError as exc:
        raise CaptionError(f"prompt file {path}: {exc}; write {{{{ or }}}} for a literal brace") from None
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS or spec or conversion:
            known = ", ".join(f"{{{known}}}" for known in PLACEHOLDERS)
            raise CaptionError(
                f"prompt file {path} asks for {{{name}}}, which is not one of {known}; "
                "write {{ or }} for a literal brace"
            )


def caption_extension(ext: str) -> str:
    ext = ext if ext.startswith(".") else "." + ext
    if ext == "." or "/" in ext or os.sep in ext:
        raise CaptionError(f"--ext {ext!r} is not a file extension")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise CaptionError(f"--ext {ext} would overwrite images")
    return ext


# ---------------------------------------------------------------------------
# The run: find the images, drop those already captioned, caption, write
# ---------------------------------------------------------------------------


@dataclass
class Summary:
    to_caption: list[Path] = field(default_factory=list)
    captioned: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    by_server: dict[str, int] = field(default_factory=dict)  # captions each server wrote
    orphans: list[Path] = field(default_factory=list)  # caption files without an image, left alone
    server_trouble: list[str] = field(default_factory=list)  # servers lost or silent, and why
    stopped: str = ""  # why the run ended before its last image
    metadata_error: str = ""  # the --jsonl file could not be written
    interrupted: bool = False
    seconds: float = 0.0
    tokens: int = 0  # generated, as the servers counted them
    generation_ns: int = 0
    words: int = 0  # in the captions written
    over_clip_limit: int = 0  # captions estimated longer than CLIP's 77 tokens

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.failed or self.stopped or self.metadata_error else EXIT_OK


def caption_folder(config: Config, progress: Progress | None = None) -> Summary:
    """Caption the images of config.folder; raise CaptionError if the run cannot start."""
    progress = progress or Progress(config.folder, verbosity=0)
    # Pillow only warns between 1x and 2x its pixel limit, and then decodes a 632-byte file
    # into 645 MB (image-facts.md §5): make the warning an error, once, before any thread.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    summary = Summary()
    started = time.monotonic()
    images, summary.orphans = find_images(config.folder, config.recursive, config.caption_ext)
    todo, summary.skipped, summary.failed = plan(images, config.caption_ext, config.existing)
    summary.to_caption = todo[: config.limit]
    if config.dry_run:
        progress.list_planned(summary)
        return summary
    metadata = Metadata(config.jsonl) if config.jsonl else None
    servers = [Server(host, config.timeout) for host in config.hosts]
    try:
        for server in servers:
            preflight(server, config, progress)
        progress.start(summary)
        caption_images(servers, config, summary, progress, metadata)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        for server in servers:
            server.client.close()
        save_metadata(metadata, summary)
        summary.seconds = time.monotonic() - started
    return summary


def caption_images(
    servers: list[Server], config: Config, summary: Summary, progress: Progress, metadata: Metadata | None
) -> None:
    left = len(summary.to_caption)
    pipeline = Pipeline(summary.to_caption, servers, config)
    pipeline.start()
    try:
        for outcome in pipeline.outcomes():
            left -= 1
            record(outcome, config, summary, progress, metadata)
    except KeyboardInterrupt:
        progress.say(
            f"stopping: waiting up to {DRAIN_SECONDS:.0f}s for the answers on their way "
            "(Ctrl-C again to quit at once)"
        )
        for outcome in pipeline.outcomes_in_flight():
            record(outcome, config, summary, progress, metadata)
        raise
    finally:
        pipeline.stop()
        summary.server_trouble = [
            f"{server.host} taken out of rotation: {server.lost}"
            if server.lost
            else f"{server.host} was not answering when the run ended: {server.trouble}"
            for server in servers
            if server.lost or server.trouble
        ]
    if left:
        summary.stopped = f"no Ollama server left to ask; {left} images not attempted"


def record(
    outcome: Outcome, config: Config, summary: Summary, progress: Progress, metadata: Metadata | None
) -> None:
    """Write one caption and account for it: the only place captions are written and images
    reported."""
    try:
        if outcome.error:
            raise CaptionError(outcome.error)
        text = write_caption(outcome.image, outcome.caption, config)
    except CaptionError as exc:
        summary.failed.append((outcome.image, str(exc)))
        progress.image_failed(outcome.image, str(exc))
        return
    summary.captioned.append(outcome.image)
    summary.by_server[outcome.server] = summary.by_server.get(outcome.server, 0) + 1
    summary.tokens += outcome.tokens
    summary.generation_ns += outcome.generation_ns
    summary.words += len(text.split())
    summary.over_clip_limit += estimated_clip_tokens(text) > CLIP_TOKENS
    progress.image_captioned(outcome.image, text, outcome.seconds)
    if metadata:
        extra = {"model": config.model, "seconds": round(outcome.seconds, 2), "tokens": outcome.tokens}
        try:
            metadata.add(outcome.image, text, **extra)
        except CaptionError as exc:  # the last save, at the end of the run, tries again
            progress.say(f"warning: {exc}")


def save_metadata(metadata: Metadata | None, summary: Summary) -> None:
    if metadata:
        try:
            metadata.save()
        except CaptionError as exc:
            summary.metadata_error = str(exc)


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------


def find_images(folder: Path, recursive: bool, caption_ext: str) -> tuple[list[Path], list[Path]]:
    """The images below folder, and the caption files that belong to none of them."""
    if not folder.is_dir():
        raise CaptionError(f"{folder} is not a folder")
    found: list[Path] = []
    captions: list[Path] = []
    seen_folders = set()
    for here, subfolders, files in os.walk(folder, followlinks=True, onerror=raise_unreadable):
        # Following links lets a dataset be assembled from linked folders; remembering each
        # real folder keeps a link back to a parent from looping forever.
        identity = folder_identity(here)
        if identity in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add(identity)
        subfolders[:] = sorted(d for d in subfolders if recursive and not d.startswith("."))
        found.extend(Path(here, name) for name in files if is_image_name(name))
        captions.extend(Path(here, name) for name in files if name.endswith(caption_ext))
    wanted = {caption_path(image, caption_ext) for image in found}
    orphans = sorted(caption for caption in captions if caption not in wanted)
    return sorted(found, key=lambda path: path.relative_to(folder).parts), orphans


def raise_unreadable(exc: OSError) -> None:
    raise CaptionError(f"cannot list {exc.filename}: {exc.strerror}")


def folder_identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def is_image_name(name: str) -> bool:
    # Our own temporary files start with a dot too, so hiding dot files covers them.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def caption_path(image: Path, caption_ext: str) -> Path:
    return image.with_name(image.stem + caption_ext)


def plan(
    images: Sequence[Path], caption_ext: str, existing: str
) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """Split images into (to caption, skipped, failed); same-stem images fail together."""
    sharing: dict[Path, list[Path]] = {}
    for image in images:
        sharing.setdefault(caption_path(image, caption_ext), []).append(image)
    todo: list[Path] = []
    skipped: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for image in images:
        caption = caption_path(image, caption_ext)
        twins = [other.name for other in sharing[caption] if other != image]
        if twins:
            # One caption would describe only one of the pictures: caption neither.
            failed.append((image, f"shares {caption.name} with {', '.join(twins)}; rename one of them"))
        elif existing == "skip" and has_caption(caption):
            skipped.append(image)
        else:
            todo.append(image)
    return todo, skipped, failed


def has_caption(path: Path) -> bool:
    try:
        return bool(path.read_bytes().strip())
    except OSError as exc:
        # Absent, or a name too long to exist, is no caption; anything else is one we cannot
        # read, and what we cannot see we never overwrite.
        return exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG)


# ---------------------------------------------------------------------------
# Image preparation (measurements behind each choice: image-facts.md)
# ---------------------------------------------------------------------------

PASS_THROUGH_MAX_BYTES = 1_500_000
JPEG_QUALITY = 90
EXIF_ORIENTATION = 0x0112
UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def prepare_image(path: Path, max_size: int) -> bytes:
    """The bytes to send: the file itself when already fit, else an upright, shrunk RGB JPEG."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionError(f"cannot read: {reason(exc)}") from None
    if not data:
        raise CaptionError("empty file")
    if max_size == 0:
        return data
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if is_ready_to_send(picture, data, max_size):
                return data
            return encode_jpeg(shrink_upright_rgb(picture, max_size))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CaptionError(
            f"refused: more pixels than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} "
            "(a possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise CaptionError("not an image (or a format Pillow cannot read)") from None
    except Exception as exc:  # noqa: BLE001
        # On malformed data Pillow's plugins raise OSError, ValueError, SyntaxError, but also
        # struct.error, IndexError, EOFError...: each is this file's failure, not the run's.
        raise CaptionError(f"cannot decode: {reason(exc)}") from None


def is_ready_to_send(picture: Image.Image, data: bytes, max_size: int) -> bool:
    # Re-encoding a small plain JPEG/PNG costs ~5 ms and a generation of quality for ~5% fewer
    # bytes (image-facts.md §1), so send those as they are, if the whole file is there.
    if picture.format == "JPEG":
        upright = picture.getexif().get(EXIF_ORIENTATION, 1) == 1
        complete = data.rstrip(b"\0").endswith(b"\xff\xd9")
    elif picture.format == "PNG":
        # Only JPEG's EXIF is free to read; a PNG that has EXIF at all is re-encoded instead.
        upright = "exif" not in picture.info
        complete = data.endswith(PNG_TRAILER)
    else:
        return False
    return (
        upright
        and complete
        and picture.mode in ("RGB", "L")
        and "transparency" not in picture.info
        and not getattr(picture, "is_animated", False)
        and max(picture.size) <= max_size
        and len(data) <= PASS_THROUGH_MAX_BYTES
    )


def shrink_upright_rgb(picture: Image.Image, max_size: int) -> Image.Image:
    orientation = picture.getexif().get(EXIF_ORIENTATION, 1)
    target = fitted_size(picture.size, max_size)
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: 3x faster and 7x less memory for a 24 MP
    # photo. Asked for the fitted size, not a square, or it decodes everything (§1 "Gotcha").
    picture.draft(picture.mode, target)
    rgb = flatten_to_rgb(picture)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=1.0)
    # Rotating after shrinking touches 20x fewer pixels (§2).
    if orientation in UNDO_ORIENTATION:
        rgb = rgb.transpose(UNDO_ORIENTATION[orientation])
    return rgb


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


def encode_jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Scheduling: images prepared a few ahead, --jobs requests in flight on every server
# ---------------------------------------------------------------------------
# Threads rather than asyncio: the official sync client is safe to share between threads
# (one httpx pool), Pillow releases the GIL while it decodes and resizes (image-facts.md §3),
# and a thread costs nothing next to seconds of inference. Workers only compute; the main
# thread alone writes files and reports, so neither needs a lock.

# More preparers than cores never helped (image-facts.md §3), and 2-4 keep ahead of any GPU.
PREPARERS = min(4, os.cpu_count() or 1)
POLL_SECONDS = 0.1  # how soon an idle worker or the main thread notices that the run is over
# After the first Ctrl-C, answers already being generated may take this long to arrive.
DRAIN_SECONDS = 20.0


@dataclass
class Task:
    image: Path
    picture: bytes
    prompt: str
    attempts: int = 0  # tries that failed in a way worth another try


@dataclass
class Outcome:
    image: Path
    caption: str = ""
    error: str = ""
    seconds: float = 0.0
    server: str = ""
    tokens: int = 0  # generated, as the server counted them
    generation_ns: int = 0


class Pipeline:
    """Images flow: to prepare -> prepared (bounded) -> sent by any server -> done.

    Every server's workers take from the one prepared queue, so a faster server does more.
    At most one prepared image waits per request slot: memory stays flat however large the
    folder, and the next image is ready the moment a request finishes.
    """

    def __init__(self, images: Sequence[Path], servers: list[Server], config: Config) -> None:
        self.config = config
        self.servers = servers
        self.expected = len(images)
        self.to_prepare: queue.SimpleQueue[Path] = queue.SimpleQueue()
        for image in images:
            self.to_prepare.put(image)
        self.prepared: queue.Queue[Task] = queue.Queue(maxsize=len(servers) * config.jobs)
        self.given_back: queue.SimpleQueue[Task] = queue.SimpleQueue()  # to be tried again
        self.done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.stopping = threading.Event()  # the run is over: every worker leaves
        self.draining = threading.Event()  # Ctrl-C: finish what is in flight, start nothing
        self.in_flight = 0  # tasks a worker holds
        self.counting = threading.Lock()
        self.threads = [threading.Thread(target=self.prepare_loop) for _ in range(PREPARERS)]
        self.threads += [
            threading.Thread(target=self.send_loop, args=(server,))
            for server in servers
            for _ in range(config.jobs)
        ]

    def start(self) -> None:
        for thread in self.threads:
            # Daemons: after a second Ctrl-C a request still in flight must not keep the
            # process alive.
            thread.daemon = True
            thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def outcomes(self) -> Iterator[Outcome]:
        """Each image's outcome as it comes; ends early once every server is out of rotation."""
        for _ in range(self.expected):
            while True:
                try:
                    outcome = self.done.get(timeout=POLL_SECONDS)
                    break
                except queue.Empty:
                    # Only once nothing is left on its way: an answer that came before its
                    # server was lost is still written.
                    if self.in_flight == 0 and all(server.lost for server in self.servers):
                        return
            yield outcome

    def outcomes_in_flight(self) -> Iterator[Outcome]:
        """After a first Ctrl-C: no new request, only the answers already on their way."""
        self.draining.set()
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and (self.in_flight or not self.done.empty()):
            try:
                yield self.done.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def prepare_loop(self) -> None:
        while not (self.stopping.is_set() or self.draining.is_set()):
            try:
                image = self.to_prepare.get_nowait()
            except queue.Empty:
                return
            try:
                prompt = prompt_for(self.config.prompt, image, self.config.caption_ext)
                task = Task(image, prepare_image(image, self.config.max_size), prompt)
            except CaptionError as exc:
                self.done.put(Outcome(image, error=str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - see send_loop: no image may go missing
                self.done.put(Outcome(image, error=f"unexpected error: {exc!r}"))
                continue
            while not (self.stopping.is_set() or self.draining.is_set()):
                try:
                    self.prepared.put(task, timeout=POLL_SECONDS)
                    break
                except queue.Full:
                    continue

    def send_loop(self, server: Server) -> None:
        while not self.stopping.is_set() and not server.lost:
            task = self.next_task()
            if task is None:
                continue
            with self.counting:
                self.in_flight += 1
            try:
                if not self.draining.is_set():  # checked after counting, so a drain waits for it
                    self.send(server, task)
            except Exception as exc:  # noqa: BLE001
                # Once the run is over, its clients are closed under requests still in flight.
                # Before that, an unforeseen error must fail the image, not leave the run
                # waiting forever for its outcome.
                if not self.stopping.is_set():
                    self.done.put(Outcome(task.image, error=f"unexpected error: {exc!r}"))
            finally:
                with self.counting:
                    self.in_flight -= 1

    def send(self, server: Server, task: Task) -> None:
        """One try; an image that may succeed later goes back to the queue (retry policy:
        ollama-facts.md §1.6 and §2.5)."""
        started = time.monotonic()
        try:
            caption, answer = ask(server.client, self.config, task)
        except ServerUnreachable as exc:
            # The server is down, not the image at fault: wait for it without using up tries.
            self.given_back.put(task)
            server.wait_until_back(str(exc), self.config.wait_server)
        except ModelMissing as exc:
            self.given_back.put(task)
            server.take_out(f"the model is no longer there ({exc})")
        except Transient as exc:
            task.attempts += 1
            if task.attempts > self.config.retries:
                tries = f" (after {task.attempts} tries)" if task.attempts > 1 else ""
                self.done.put(Outcome(task.image, error=f"{exc}{tries}"))
                return
            if isinstance(exc, ConnectionTrouble):  # asking the server is pause enough
                self.given_back.put(task)
                server.wait_until_back(str(exc), self.config.wait_server)
                return
            if not isinstance(exc, BadAnswer):  # a busy or crashed runner needs a moment
                self.stopping.wait(backoff(task.attempts))
            self.given_back.put(task)
        except CaptionError as exc:
            self.done.put(Outcome(task.image, error=str(exc)))
        else:
            server.trouble = ""
            seconds = time.monotonic() - started
            outcome = Outcome(
                task.image, caption, "", seconds, server.host, answer.tokens, answer.generation_ns
            )
            self.done.put(outcome)

    def next_task(self) -> Task | None:
        if self.draining.is_set():
            self.stopping.wait(POLL_SECONDS)
            return None
        try:
            return self.given_back.get_nowait()
        except queue.Empty:
            pass
        try:
            return self.prepared.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return None


def backoff(attempt: int) -> float:
    # Exponential, with jitter so that the workers of several runs do not retry in step.
    return min(30.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


# ---------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------


class Server:
    """One Ollama server of the run: its client, and why it left the rotation, if it did."""

    def __init__(self, host: str, timeout: float) -> None:
        self.host = host
        # The client waits forever by default (ollama-facts.md §1.1). A queued request gets no
        # byte until a slot frees, so the read timeout must be generous; connecting need not be.
        self.client = ollama.Client(host=host, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self.trouble = ""  # why it last failed to answer, until it answers again
        self.lost = ""  # why it was taken out of rotation
        self.probing = threading.Lock()

    def wait_until_back(self, trouble: str, wait_seconds: float) -> None:
        """Ask the server, more and more slowly, until it answers; past wait_seconds, take
        it out of rotation. One worker asks; the server's other workers wait for the verdict."""
        self.trouble = trouble
        with self.probing:
            deadline = time.monotonic() + wait_seconds
            pause = 0.25
            while not self.lost:
                try:
                    with server_errors():
                        self.client.list()
                    self.trouble = ""
                    return
                except CaptionError as exc:
                    self.trouble = str(exc)
                if time.monotonic() + pause > deadline:
                    self.take_out(f"{self.trouble} for more than {duration(wait_seconds)}")
                    return
                time.sleep(pause)
                pause = min(pause * 2, 15.0)

    def take_out(self, why: str) -> None:
        self.lost = why


def preflight(server: Server, config: Config, progress: Progress) -> None:
    """Before any image is sent: the server answers, has the model, and the model can see."""
    try:
        with server_errors():
            server.client.list()
    except ServerUnreachable:
        raise CaptionError(
            f"cannot reach Ollama at {server.host}; start it with 'ollama serve' "
            "or point --host (or OLLAMA_HOST) at it"
        ) from None
    except CaptionError as exc:
        raise CaptionError(f"{server.host} does not answer like an Ollama server: {exc}") from None
    details = show_model(server.client, server.host, config, progress)
    capabilities = details.capabilities or []
    families = (details.details.families if details.details else None) or []
    # Ollama does not refuse images sent to a text model: it ignores them and the model
    # invents a caption (ollama-facts.md §2.5). Servers before 0.6.8 list no capabilities;
    # there a vision model shows the "clip" family (§1.7).
    can_see = "vision" in capabilities if capabilities else "clip" in families
    if not can_see:
        raise CaptionError(
            f"model {config.model} on {server.host} cannot see images (it lacks the 'vision' capability); "
            "choose a vision model such as llava"
        )


def show_model(client: ollama.Client, host: str, config: Config, progress: Progress) -> ollama.ShowResponse:
    try:
        with server_errors():
            return client.show(config.model)
    except ModelMissing:
        if not config.pull:
            raise CaptionError(
                f"model {config.model} is not on {host}; run 'ollama pull {config.model}' or add --pull"
            ) from None
    pull_model(client, config.model, progress)
    with server_errors():
        return client.show(config.model)


def pull_model(client: ollama.Client, model: str, progress: Progress) -> None:
    try:
        with server_errors():
            for update in client.pull(model, stream=True):
                progress.pulling(model, update.status or "", update.completed, update.total)
    except CaptionError as exc:
        raise CaptionError(f"could not pull {model}: {exc}") from None
    finally:
        progress.end_live_line()


def prompt_for(template: str, image: Path, caption_ext: str) -> str:
    """The prompt file's text with this image's placeholders filled in."""
    used = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    values = {
        "name": image.stem,
        "folder": image.parent.name,
        # Kohya's folder convention "15_guideboat": 15 repeats of the class "guideboat".
        "class": re.sub(r"^\d+_(?=.)", "", image.parent.name),
        "existing": read_existing(caption_path(image, caption_ext)) if "existing" in used else "",
    }
    return template.format(**values)


@dataclass
class Answer:
    text: str
    done_reason: str
    tokens: int
    generation_ns: int


def request_caption(client: ollama.Client, config: Config, task: Task, seed: int | None) -> Answer:
    """Send one image; return the model's whole answer."""
    message = {"role": "user", "content": task.prompt, "images": [task.picture]}
    options = config.options() if seed is None else {**config.options(), "seed": seed}
    parts = []
    with server_errors():
        # Streamed, so the read timeout bounds the silence before and between tokens rather
        # than the whole answer, and an answer cut off mid-way is told from a complete one.
        for part in client.chat(
            model=config.model,
            messages=[message],
            stream=True,
            options=options,
            keep_alive=config.keep_alive,  # resets the unload timer with every request (§2.6)
        ):
            parts.append(part.message.content or "")
            if part.done:
                return Answer(
                    "".join(parts), part.done_reason or "", part.eval_count or 0, part.eval_duration or 0
                )
    raise Transient("the answer broke off before the model finished")


# What the client raises (ollama-facts.md §1.6): ValueError covers undecodable JSON and
# pydantic's validation errors; httpx.HTTPError covers timeouts and broken connections.
CLIENT_ERRORS = (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError)
# How each Ollama era says it could not decode an image (ollama-facts.md §2.5): the same
# image will fail the same way, so no retry.
UNDECODABLE = re.compile(
    r"unable to make llava embedding|unable to tokenize mtmd embedding|image: unknown format"
    r"|failed to load image|failed to decode image",
    re.IGNORECASE,
)


@contextmanager
def server_errors() -> Iterator[None]:
    """Turn every way a server or connection can fail into a CaptionError of the right kind."""
    try:
        yield
    except CLIENT_ERRORS as exc:
        raise classified(exc) from None


def classified(exc: Exception) -> CaptionError:
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code == 404:
            return ModelMissing(exc.error)
        # 400 is a request the server will never accept; 5xx (busy, runner crashed) and -1
        # (an error line mid-answer) may pass on another try.
        if exc.status_code == 400 or UNDECODABLE.search(exc.error):
            return CaptionError(explain(exc))
        return Transient(explain(exc))
    if isinstance(exc, (ConnectionError, httpx.ConnectError)):
        return ServerUnreachable("cannot reach the Ollama server")
    if isinstance(exc, httpx.TimeoutException):
        return Transient(explain(exc))
    if isinstance(exc, httpx.TransportError):
        return ConnectionTrouble(explain(exc))
    return CaptionError(explain(exc))


def explain(exc: BaseException) -> str:
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code == -1:
            return f"Ollama failed mid-answer: {exc.error.strip()}"
        return f"Ollama answered {exc.status_code}: {exc.error.strip()}"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer within the timeout (raise --timeout if the server is only busy)"
    if isinstance(exc, httpx.TransportError):
        return f"the connection to Ollama broke: {reason(exc)}"
    if isinstance(exc, ValueError):
        return "the server's answer is not Ollama's JSON"
    return reason(exc)


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Caption
# ---------------------------------------------------------------------------


# The cleanup rules, few on purpose so that a user can predict them (README "Cleanup").
LABEL = re.compile(r"^(?:caption|description)\s*:\s*", re.IGNORECASE)
LEAD_IN = re.compile(
    r"^(?:(?:the|this) (?:image|picture|photo|photograph) (?:shows|depicts|features|captures|is of)"
    r"|in (?:the|this) (?:image|picture|photo|photograph)"
    r"|this is (?:an? )?(?:image|picture|photo|photograph) of)\b[\s,:]*",
    re.IGNORECASE,
)
QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i cannot|i can'?t|i'?m (?:not able|unable)|i am (?:not able|unable)"
    r"|as an ai\b|unfortunately,? i\b)",
    re.IGNORECASE,
)
# A phrase of 3 to 80 characters said four or more times in a row: the model is looping.
LOOP = re.compile(r"\b(\w.{2,79}?)(?:[\s,;.]+\1\b){3,}", re.IGNORECASE | re.DOTALL)


def ask(client: ollama.Client, config: Config, task: Task) -> tuple[str, Answer]:
    """One try: the caption, cleaned up, and the answer it came in; BadAnswer if unfit."""
    answer = request_caption(client, config, task, seed_for(config.seed, task.attempts))
    caption = answer.text.strip() if config.raw else tidy(answer.text)
    problem = caption_problem(answer, caption)
    if problem:
        raise BadAnswer(problem)
    return caption, answer


def seed_for(seed: int | None, attempt: int) -> int | None:
    # A retry needs a seed of its own, or a seeded model says the same thing again; a fixed
    # --seed still makes the whole run, retries included, reproducible.
    if attempt == 0:
        return seed
    return (seed if seed is not None else random.randrange(2**31)) + attempt


def tidy(answer: str) -> str:
    caption = " ".join(answer.split())  # one line: trainers read a caption file as one prompt
    caption = unquote(LABEL.sub("", caption, count=1))
    return LEAD_IN.sub("", caption, count=1)


def unquote(text: str) -> str:
    if len(text) >= 2 and QUOTE_PAIRS.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    return text


def caption_problem(answer: Answer, caption: str) -> str:
    """Why this caption must not reach a training set, or "" if it may."""
    if answer.done_reason == "length":
        return "the answer was cut off at the token limit (raise --max-tokens or --num-ctx)"
    if not caption:
        return "the model answered with an empty caption"
    if REFUSAL.match(caption.replace("\u2019", "'")):
        return f"the model refused: {shortened(caption)}"
    if LOOP.search(caption):
        return f"the answer repeats itself: {shortened(caption)}"
    return ""


def shortened(text: str, length: int = 60) -> str:
    return repr(text if len(text) <= length else text[: length - 1] + "\u2026")


def finished_caption(caption: str, old: str, config: Config) -> str:
    """The text to write: merged with an existing caption if asked, trigger words in place."""
    if old and config.existing == "append":
        caption = f"{old}, {caption}"
    elif old and config.existing == "prepend":
        caption = f"{caption}, {old}"
    # A trigger word the model (or an earlier run) already put in place is not repeated.
    if config.prefix and not caption.lower().startswith(config.prefix.lower()):
        caption = f"{config.prefix}, {caption}"
    if config.suffix and not caption.lower().rstrip(" .").endswith(config.suffix.lower()):
        caption = f"{caption}, {config.suffix}"
    return caption


def estimated_clip_tokens(caption: str) -> int:
    # CLIP's tokenizer gives most words one token and each punctuation mark one more, plus
    # a start and an end token: close enough to count captions that overflow 77, without
    # a tokenizer dependency.
    return len(caption.split()) + len(re.findall(r"[^\w\s]", caption)) + 2


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_caption(image: Path, caption: str, config: Config) -> str:
    """Write the caption beside its image; return the text written."""
    path = caption_path(image, config.caption_ext)
    old = read_existing(path) if config.existing in ("append", "prepend") else ""
    text = finished_caption(caption, old, config)
    write_atomically(path, text)
    return text


def read_existing(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionError(f"cannot read the existing {path.name}: {reason(exc)}") from None


class Metadata:
    """The --jsonl file: every caption written, one JSON object a line (Hugging Face
    imagefolder's metadata.jsonl). Kept in memory by file name, so a caption written again
    replaces its line, and rewritten whole and atomically, so it is never half-written."""

    SAVE_EVERY = 10.0  # seconds: what a crash can cost the JSONL (the .txt files stay)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self.load(path)
        self.saved_at = time.monotonic()
        self.unsaved = False

    @staticmethod
    def load(path: Path) -> dict[str, dict]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise CaptionError(f"cannot read {path}: {reason(exc)}") from None
        entries = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["file_name"]] = entry
            except (ValueError, TypeError, KeyError):
                raise CaptionError(
                    f"{path} line {number} is not a metadata entry; fix or remove it"
                ) from None
        return entries

    def add(self, image: Path, text: str, **extra: object) -> None:
        file_name = os.path.relpath(image, self.path.parent).replace(os.sep, "/")
        self.entries[file_name] = {"file_name": file_name, "text": text, **extra}
        self.unsaved = True
        if time.monotonic() - self.saved_at > self.SAVE_EVERY:
            self.save()

    def save(self) -> None:
        self.saved_at = time.monotonic()  # a failed save is tried again 10 s later, not per image
        if self.unsaved:
            lines = (json.dumps(entry, ensure_ascii=False) + "\n" for entry in self.entries.values())
            write_atomically(self.path, "".join(lines))
            self.unsaved = False


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part, even after a crash."""
    # Hidden, so discovery passes it over; short, so a long caption name still has room.
    temporary = path.with_name(f".{path.name[:100]}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise CaptionError(f"cannot write {path.name}: {reason(exc)}") from None
    finally:
        if temporary.exists():
            temporary.unlink()


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


class Progress:
    """Everything the run tells a person, on stderr: a live bar on a terminal, lines in a log."""

    BAR_WIDTH = 24

    def __init__(self, folder: Path, verbosity: int = 0, stream: TextIO | None = None) -> None:
        self.folder = folder
        self.verbosity = verbosity  # -1 quiet, 0 normal, 1 captions too
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() and verbosity >= 0
        self.total = 0
        self.done = 0
        self.sending_since = 0.0
        self.live_line_shown = False
        self.last_pull_status = ""

    def name(self, image: Path) -> str:
        try:
            name = str(image.relative_to(self.folder))
        except ValueError:
            name = str(image)
        # A newline or control character in a file name must not break the one-line report.
        return name if name.isprintable() else repr(name)[1:-1]

    def start(self, summary: Summary) -> None:
        self.total = len(summary.to_caption)
        self.sending_since = time.monotonic()
        self.report_plan(summary)
        if self.verbosity >= 0:
            self.say(f"{self.total} to caption, {len(summary.skipped)} already captioned")
        if self.live:
            self.draw_bar("")

    def image_captioned(self, image: Path, caption: str, seconds: float) -> None:
        self.done += 1
        if self.verbosity >= 0 and not self.live:
            self.say(f"[{self.done}/{self.total}] {self.name(image)} {seconds:.1f}s, ETA {self.eta()}")
        if self.verbosity > 0:
            self.say(f"    {caption}")
        if self.live:
            self.draw_bar(f"{self.name(image)} {seconds:.1f}s")

    def image_failed(self, image: Path, why: str, counted: bool = True) -> None:
        self.done += counted
        position = f"[{self.done}/{self.total}] " if counted else ""
        self.say(f"{position}FAILED {self.name(image)}: {why}")
        if self.live and counted:
            self.draw_bar("")

    def eta(self) -> str:
        if not self.done:
            return "unknown"
        per_image = (time.monotonic() - self.sending_since) / self.done
        return duration(per_image * (self.total - self.done))

    def draw_bar(self, current: str) -> None:
        filled = self.BAR_WIDTH * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.sending_since
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.draw_live_line(
            f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {self.done}/{self.total} "
            f"{rate:.2f} img/s ETA {self.eta()}  {current}"
        )

    def draw_live_line(self, line: str) -> None:
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.live_line_shown = True

    def end_live_line(self) -> None:
        if self.live_line_shown:
            self.stream.write("\n")
            self.live_line_shown = False

    def say(self, line: str) -> None:
        if self.live_line_shown:
            self.stream.write("\r\x1b[K")
            self.live_line_shown = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def pulling(self, model: str, status: str, completed: int | None, total: int | None) -> None:
        if self.live:
            share = f" {100 * completed // total}%" if completed and total else ""
            self.draw_live_line(f"pulling {model}: {status}{share}")
        elif status != self.last_pull_status:
            self.say(f"pulling {model}: {status}")
        self.last_pull_status = status

    def report_plan(self, summary: Summary) -> None:
        for image, why in summary.failed:
            self.image_failed(image, why, counted=False)
        if summary.orphans:
            names = ", ".join(self.name(orphan) for orphan in summary.orphans[:5])
            more = f" and {len(summary.orphans) - 5} more" if len(summary.orphans) > 5 else ""
            self.say(
                f"note: {len(summary.orphans)} caption files have no image (left untouched): {names}{more}"
            )

    def list_planned(self, summary: Summary) -> None:
        self.report_plan(summary)
        for image in summary.to_caption:
            print(self.name(image))
        self.say(
            f"dry run: would caption {len(summary.to_caption)}, "
            f"skip {len(summary.skipped)} already captioned; nothing was sent"
        )

    def finish(self, summary: Summary) -> None:
        rate = len(summary.captioned) / summary.seconds if summary.seconds else 0.0
        line = (
            f"captioned {len(summary.captioned)}, skipped {len(summary.skipped)}, "
            f"failed {len(summary.failed)} in {duration(summary.seconds)} ({rate:.2f} images/s)"
        )
        if summary.interrupted:
            line = f"interrupted: {line}"
        self.say(line)
        if len(summary.by_server) > 1 or summary.server_trouble:
            for server, count in summary.by_server.items():
                self.say(f"  {server}: captioned {count}")
            for trouble in summary.server_trouble:
                self.say(f"  {trouble}")
        if summary.captioned:
            self.say(caption_statistics(summary))
        if summary.stopped:
            self.say(f"stopped: {summary.stopped}")
        if summary.metadata_error:
            self.say(f"error: {summary.metadata_error}")
        for image, why in sorted(summary.failed):
            self.say(f"  failed {self.name(image)}: {why}")


def caption_statistics(summary: Summary) -> str:
    count = len(summary.captioned)
    speed = summary.tokens / (summary.generation_ns / 1e9) if summary.generation_ns else 0.0
    return (
        f"  {speed:.1f} tokens/s generated; captions average {summary.words / count:.0f} words; "
        f"{summary.over_clip_limit} of {count} longer than {CLIP_TOKENS} CLIP tokens "
        "(estimated from words and punctuation)"
    )


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    progress = Progress(args.folder, verbosity=-1 if args.quiet else int(args.verbose))
    try:
        summary = caption_folder(config_from_args(args), progress)
    except CaptionError as exc:
        progress.say(f"error: {exc}")
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        progress.say("interrupted before the first image")
        return EXIT_INTERRUPTED
    if not args.dry_run:
        progress.finish(summary)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
