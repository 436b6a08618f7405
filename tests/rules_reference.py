"""The integrity rules (issue 17) as the smallest captioner that follows them: the harness's control.

Not a captioner to use: it speaks only what the model-based test (test_model_based.py) runs: folders
or -r, --prompt, --model, --api, --existing, --prefix, --limit, --only, --jsonl, --review,
--failed-list, --overwrite-edits, --jobs and --host, one request at a time, to the stand-in (an
image it rejects, a 400, fails); and --apply-edits
(with --dry-run), the review page's edits written back as a person's. It exists so that the
harness can be checked against something that keeps the rules: the state machine must find nothing
here, and whatever it finds in the real script is then the script's, not the harness's:

    LLAVA_CAPTION_SCRIPT=tests/rules_reference.py python tests/soak.py --minutes 5

The journal is one per image folder (so -r root and root/a root/b are one record), a line per
caption written, before the caption: the image, the pass, its settings without the mode, the mode,
the text before, the text the answer was added to (the base) and the text after. The texts
themselves, not hashes: a redo of its own write must give back the base, and a reference has no
size to save.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

JOURNAL = ".llava-caption-ollama.journal"
IMAGES = (".png", ".jpg", ".jpeg")


@dataclass
class Entry:
    """One journal line: a caption the tool wrote."""

    image: str
    pass_id: str
    settings: str  # the pass without its mode
    mode: str
    before: str
    base: str
    after: str
    landed: bool = False  # a second line says its caption is in place


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_blank(data: bytes | None) -> bool:
    if data is None:
        return True
    text = data.decode("utf-8-sig", "replace")
    return all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in text)


def text_of(data: bytes | None) -> str:
    return "" if is_blank(data) else data.decode("utf-8-sig", "replace").strip()


def merged(base: str, answer: str, mode: str, prefix: str) -> str:
    caption = answer
    if base and mode == "append":
        caption = f"{base}, {answer}"
    elif base and mode == "prepend":
        caption = f"{answer}, {base}"
    if prefix and not re.match(rf"{re.escape(prefix)}(?!\w)", caption, re.IGNORECASE):
        caption = f"{prefix}, {caption}"
    return caption


class Journal:
    def __init__(self, folder: Path) -> None:
        self.path = folder / JOURNAL
        self.entries: list[Entry] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").split("\n"):
                try:
                    entry = json.loads(line)
                    if "ok" in entry:
                        self.landed(entry["ok"], entry["after"])
                    else:
                        self.entries.append(Entry(**entry))
                except (ValueError, TypeError):
                    pass  # a line half-written by a run killed as it wrote

    def of(self, image: str) -> list[Entry]:
        return [entry for entry in self.entries if entry.image == image]

    def landed(self, image: str, after: str) -> None:
        for entry in reversed(self.entries):
            if entry.image == image and entry.after == after:
                entry.landed = True
                return

    def add(self, entry: Entry | dict) -> None:
        if isinstance(entry, Entry):
            self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry.__dict__ if isinstance(entry, Entry) else entry) + "\n")
            file.flush()
            os.fsync(file.fileno())

    @staticmethod
    def producer(entries: list[Entry], text: str) -> Entry | None:
        """The write that produced this text (the latest that wrote it)."""
        return next((entry for entry in reversed(entries) if entry.after == text), None)

    def passes(self, entries: list[Entry], text: str) -> set[str]:
        """The passes whose answers the text holds, down the chain of appends."""
        entry = self.producer(entries, text)
        if entry is None:
            return set()
        below = entries[: entries.index(entry)]
        held = {entry.pass_id}
        if entry.mode in ("append", "prepend") and entry.base:
            held |= self.passes(below, entry.base)
        return held

    def who(self, entries: list[Entry], text: str) -> str:
        producer = self.producer(entries, text)
        if producer:
            return "person" if producer.mode == "edit" else "tool"  # "edit": applied from the page
        if entries and not any(entry.before == text and not entry.landed for entry in entries):
            return "person"  # the text before a write that landed, put back by hand, too
        return "original"  # never written, or the text before a write that never landed

    def mode_of(self, entries: list[Entry], text: str, settings: str) -> str:
        """The mode these settings wrote the caption in: of their answer in the text, else of
        their last write that landed; "" if none."""
        held = [entry for entry in self.chain(entries, text) if entry.settings == settings]
        landed = [entry for entry in entries if entry.landed and entry.settings == settings]
        return (held or landed[-1:] or [Entry("", "", "", "", "", "", "")])[0].mode

    def chain(self, entries: list[Entry], text: str) -> list[Entry]:
        entry = self.producer(entries, text)
        if entry is None:
            return []
        below = entries[: entries.index(entry)]
        more = self.chain(below, entry.base) if entry.mode in ("append", "prepend") and entry.base else []
        return [entry, *more]


class Stop:
    asked = False


def ask(host: str, api: str, model: str, prompt: str, image: bytes) -> str:
    picture = base64.b64encode(image).decode()
    if api == "openai":
        content = [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
        ]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}
        answer = post(f"{host}/v1/chat/completions", body)
        return answer["choices"][0]["message"]["content"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt, "images": [picture]}],
        "stream": False,
    }
    return post(f"{host}/api/chat", body)["message"]["content"]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def served_models(host: str) -> list[str]:
    with urllib.request.urlopen(f"{host}/v1/models", timeout=10) as response:
        return [card["id"] for card in json.loads(response.read())["data"]]


def write(journal: Journal, entry: Entry, caption: Path) -> None:
    journal.add(entry)  # before the caption: a write whose caption never landed is known
    write_atomically(caption, entry.after.encode())
    journal.add({"ok": entry.image, "after": entry.after})


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".llava-caption-ollama-{secrets.token_hex(6)}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("-r", "--recursive", action="store_true")
    parser.add_argument("--prompt", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--api", default="ollama")
    parser.add_argument("--existing")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--only", type=Path)
    parser.add_argument("--jsonl", type=Path)
    parser.add_argument("--review", type=Path)
    parser.add_argument("--failed-list", type=Path)
    parser.add_argument("--overwrite-edits", action="store_true")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--host")
    parser.add_argument("--apply-edits", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.apply_edits:
        return apply_edits(args.apply_edits, args.dry_run)
    stop = Stop()
    signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "asked", True))
    prompt = args.prompt.read_text(encoding="utf-8").strip()
    model = args.model or "llava:13b"
    if args.api == "openai":
        served = served_models(args.host)
        if args.model and args.model not in served:
            model = ""  # refused once there is something to send
        elif not args.model:
            model = served[0]
    settings = digest(json.dumps([prompt, model, args.prefix]))
    only = None
    if args.only:
        lines = args.only.read_text(encoding="utf-8").split("\n")
        only = {os.path.realpath(args.only.parent / line) for line in lines if line}

    # Plan: every image of the folders given, in the order of their paths.
    plans = []  # (folder given, image, journal, pass, mode, base, text before), in order
    counts = {"captioned": 0, "skipped": 0, "left": 0, "failed": 0}
    by_folder: dict[str, dict[str, int]] = {}
    journals: dict[Path, Journal] = {}
    rows: dict[str, dict] = {}
    if args.jsonl and args.jsonl.exists():
        for line in args.jsonl.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                row = json.loads(line)
                rows[row["file_name"]] = row
    captioning = 0
    failed: list[Path] = []  # the images that failed, for --failed-list
    left: list[Path] = []  # --only's images the run did not reach (--limit, TERM): kept in --failed-list

    def fail(image: Path, tally: dict[str, int], why: str) -> None:
        counts["failed"] += 1
        tally["failed"] += 1
        failed.append(image)
        print(f"FAILED {image}: {why}", file=sys.stderr)

    for given in args.paths:
        folders = sorted({path.parent for path in given.rglob("*")} | {given}) if args.recursive else [given]
        images = sorted(
            path for folder in folders for path in folder.iterdir() if path.suffix.lower() in IMAGES
        )
        tally = by_folder.setdefault(str(given), {"captioned": 0, "skipped": 0, "left": 0, "failed": 0})
        for image in images:
            caption = image.with_suffix(".txt")
            data = caption.read_bytes() if caption.exists() else None
            text = text_of(data)
            if args.jsonl:
                name = os.path.relpath(image, args.jsonl.parent)
                if is_blank(data):
                    rows.pop(name, None)
                elif rows.get(name, {}).get("text") != text:
                    rows[name] = {"file_name": name, "text": text, "recovered": True}
            if only is not None and os.path.realpath(image) not in only:
                continue
            journal = journals.setdefault(image.parent, Journal(image.parent))
            entries = journal.of(image.name)
            held = journal.passes(entries, text) if text else set()
            who = journal.who(entries, text) if text else "blank"
            # In append and prepend, an edited caption this pass wrote holds an answer of the pass
            # that cannot be told apart: failed rather than given a second one.
            edited_ours = {
                entry.pass_id
                for entry in entries
                if who == "person" and entry.landed and entry.mode in ("append", "prepend")
            }
            if only is not None:  # a redo
                producer = journal.producer(entries, text) if who == "tool" else None
                mode = args.existing or journal.mode_of(entries, text, settings) or "overwrite"
                mode = "overwrite" if mode == "skip" else mode  # a redo is never skipped: overwrite's
                pass_id = digest(settings + mode)
                if not text or mode in ("skip", "overwrite"):
                    base = ""
                elif pass_id in edited_ours:
                    fail(image, tally, "edited since this pass wrote it")
                    continue
                elif producer and producer.pass_id == pass_id:
                    base = producer.base  # its own part replaced, the rest kept
                elif pass_id in held:
                    fail(image, tally, "another pass added to its caption since")
                    continue
                else:
                    base = text
            else:
                mode = args.existing or "skip"
                pass_id = digest(settings + mode)
                if not text:
                    base = ""
                elif pass_id in held:
                    counts["skipped"] += 1
                    tally["skipped"] += 1
                    continue
                elif who == "person" and not args.overwrite_edits and mode != "skip":
                    counts["left"] += 1
                    tally["left"] += 1
                    continue
                elif pass_id in edited_ours:
                    fail(image, tally, "edited since this pass wrote it")
                    continue
                elif mode == "skip":
                    counts["skipped"] += 1
                    tally["skipped"] += 1
                    continue
                else:
                    base = "" if mode == "overwrite" else text
            if args.limit is not None and captioning >= args.limit:
                left += [image] if only is not None else []
                continue
            captioning += 1
            plans.append((given, image, journal, pass_id, mode, base, text))

    if plans and not model:
        print("error: the server does not serve that model", file=sys.stderr)
        return 2
    started = time.monotonic()
    writers = []
    for sent, (given, image, journal, pass_id, mode, base, text) in enumerate(plans):
        if stop.asked:
            left += [plan[1] for plan in plans[sent:]] if only is not None else []
            break
        try:
            answer = ask(args.host, args.api, model, prompt, image.read_bytes())
        except urllib.error.HTTPError as exc:  # a 400: the server will never take it
            fail(image, by_folder[str(given)], f"the server answered {exc.code}")
            continue
        written = merged(base, answer, mode, args.prefix)
        entry = Entry(image.name, pass_id, settings, mode, text, base, written)
        # Written on a thread of its own while the next request goes out, as the script's writers
        # do, so that a kill -9 at the next request can fall between journal line and caption.
        writers.append(threading.Thread(target=write, args=(journal, entry, image.with_suffix(".txt"))))
        writers[-1].start()
        counts["captioned"] += 1
        by_folder[str(given)]["captioned"] += 1
        if args.jsonl:
            name = os.path.relpath(image, args.jsonl.parent)
            rows[name] = {"file_name": name, "text": written}
    for writer in writers:
        writer.join()
    if args.jsonl:
        write_atomically(args.jsonl, "".join(json.dumps(row) + "\n" for row in rows.values()).encode())
    if args.review and not stop.asked:
        args.review.write_text("<!doctype html><title>review</title>", encoding="utf-8")
    if args.failed_list:
        write_image_list(
            args.failed_list, failed + left, "images that failed" + (" or were not reached" if left else "")
        )
    print(summary_line(counts, time.monotonic() - started, stop.asked), file=sys.stderr)
    if len(by_folder) > 1:
        for folder, tally in by_folder.items():
            print(f"  {folder}: {summary_line(tally)}", file=sys.stderr)
    if stop.asked:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    return 1 if counts["failed"] else 0


def write_image_list(path: Path, images: list[Path], what: str) -> None:
    """--failed-list: the images, relative to the list's folder, one a line, as --only reads them."""
    folder = os.path.realpath(path.parent)
    names = sorted(os.path.relpath(os.path.realpath(image), folder) for image in images)
    write_atomically(path, "".join(f"{line}\n" for line in [f"# {what}", *names]).encode())


def apply_edits(path: Path, dry_run: bool) -> int:
    """--apply-edits: each edit written where the caption holds what the page showed, and
    journaled as a person's (mode "edit"), the journal line before the caption."""
    left_alone = 0
    for edit in json.loads(path.read_text(encoding="utf-8"))["edits"]:
        image = path.parent / edit["image"]
        caption = image.with_suffix(edit["ext"])
        data = caption.read_bytes() if caption.exists() else None
        if data == edit["text"].encode():
            continue
        if text_of(data) != edit["shown"] and not (is_blank(data) and is_blank(edit["shown"].encode())):
            left_alone += 1
            print(f"  changed since the page was written, left alone: {caption.name}", file=sys.stderr)
            continue
        if not dry_run:
            entry = Entry(image.name, "person", "", "edit", text_of(data), "", edit["text"])
            write(Journal(image.parent), entry, caption)
    return 1 if left_alone else 0


def summary_line(tally: dict[str, int], seconds: float | None = None, interrupted: bool = False) -> str:
    left = f"left alone {tally['left']} (edited since written), " if tally["left"] else ""
    line = f"captioned {tally['captioned']}, skipped {tally['skipped']}, {left}failed {tally['failed']}"
    if seconds is None:
        return line
    return f"{'interrupted: ' if interrupted else ''}{line} in {seconds:.0f}s"


if __name__ == "__main__":
    sys.exit(main())
