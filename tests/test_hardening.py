"""Hardening: locks above and below a folder, a journal and a JSONL that survive odd names and
half-written lines, failures that end instead of looping or hanging, closed and non-UTF-8
output streams, arguments that cannot be used, and files that appear or point elsewhere."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    JOURNAL,
    SCRIPT,
    as_from_a_terminal,
    distinct_pictures,
    leftovers,
    picture,
    run_script,
    script_environment,
    wait_until,
)
from stand_in_ollama import Reply, describe

LOCK = ".llava-caption-ollama.lock"
GATEWAY_TIMEOUT = "<html><head><title>504 Gateway Time-out</title></head></html>"


def texts(paths) -> dict:
    return {path: path.read_text(encoding="utf-8") if path.exists() else None for path in paths}


def widths(server) -> list[int]:
    return [chat.picture().width for chat in server.chats]


def held_for(server, width: int) -> threading.Event:
    """Hold the answer for the picture of this width until the returned event is set; answer
    every other picture at once."""
    go_on = threading.Event()

    def answer(chat):
        if chat.picture().width == width and not go_on.wait(20):
            return "too late"
        return describe(chat)

    server.answer = answer
    return go_on


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- Locks above and below: a run with subfolders and a run on one of them ------------------


@pytest.fixture
def parent_and_sub(tmp_path):
    parent = tmp_path.resolve() / "parent"  # the lock messages name resolved folders
    sub = parent / "sub"
    picture(parent / "top.png", size=(40, 32))
    picture(sub / "inner.png", size=(41, 32))
    return parent, sub


def test_a_run_with_subfolders_keeps_a_run_on_a_subfolder_out(parent_and_sub, make_server, spawn, caption):
    parent, sub = parent_and_sub
    server = make_server(slots=2)
    go_on = held_for(server, 40)
    first = spawn(parent, "-r", "--host", server.url)
    wait_until(lambda: len(server.chats) == 2)  # both of its images sent: nothing more will come
    requests_before = len(server.requests)

    try:
        refused = caption(sub, host=server.url)
    finally:
        go_on.set()

    assert refused.code == 2
    assert one_line(refused.err).startswith(
        f"error: another run is captioning {parent} (pid {first.pid}, started "
    )
    assert ", with its subfolders); wait for it to end, or stop it" in refused.err
    assert len(server.requests) == requests_before  # the refused run asked the server nothing
    _, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert texts([parent / "top.txt", sub / "inner.txt"]) == {
        parent / "top.txt": "A PNG picture, 40x32 pixels.",
        sub / "inner.txt": "A PNG picture, 41x32 pixels.",
    }
    assert leftovers(parent) == []


def test_a_run_with_subfolders_leaves_out_a_subfolder_that_a_run_of_its_own_is_captioning(
    parent_and_sub, make_server, spawn, caption
):
    parent, sub = parent_and_sub
    server = make_server(slots=2)
    go_on = held_for(server, 41)
    first = spawn(sub, "--host", server.url)
    wait_until(lambda: server.in_flight >= 1)

    try:
        beside = caption(parent, "-r", host=server.url)
    finally:
        go_on.set()

    assert beside.code == 1  # not all of its images were done
    assert f"FAILED sub: another run is captioning it (pid {first.pid}, started " in beside.err
    assert (parent / "top.txt").read_text(encoding="utf-8") == "A PNG picture, 40x32 pixels."
    assert not (parent / LOCK).exists()
    _, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert (sub / "inner.txt").read_text(encoding="utf-8") == "A PNG picture, 41x32 pixels."
    assert sorted(widths(server)) == [40, 41]  # each picture asked for once, by one run


def a_subfolder_run_goes_on_beside(first, sub, server, go_on, caption) -> None:
    """While `first`, a run on the parent without -r, is answered, a run on the subfolder works."""
    wait_until(lambda: server.in_flight >= 1)
    try:
        beside = caption(sub, host=server.url)
    finally:
        go_on.set()
    assert beside.code == 0, beside.err
    assert (sub / "inner.txt").read_text(encoding="utf-8") == "A PNG picture, 41x32 pixels."
    _, err = first.communicate(timeout=20)
    assert first.returncode == 0, err


def test_a_run_on_a_parent_without_subfolders_does_not_keep_a_subfolder_run_out(
    parent_and_sub, make_server, spawn, caption
):
    parent, sub = parent_and_sub
    server = make_server(slots=2)
    go_on = held_for(server, 40)  # the parent's own picture
    first = spawn(parent, "--host", server.url)
    a_subfolder_run_goes_on_beside(first, sub, server, go_on, caption)
    assert (parent / "top.txt").read_text(encoding="utf-8") == "A PNG picture, 40x32 pixels."
    assert sorted(widths(server)) == [40, 41]


# --- The journal ---------------------------------------------------------------------------


def test_the_journal_survives_a_name_with_a_newline(tmp_path, server, caption):
    odd, plain = tmp_path / "new\nline.png", tmp_path / "plain.png"
    picture(odd, size=(40, 32))
    picture(plain, size=(41, 32))
    captions = [tmp_path / "new\nline.txt", tmp_path / "plain.txt"]
    for path in captions:
        path.write_text("old tags", encoding="utf-8")

    first = caption(tmp_path, "--existing", "append")
    assert first.code == 0, first.err
    again = caption(tmp_path, "--existing", "append")

    assert again.code == 0, again.err
    assert "captioned 0, skipped 2, failed 0" in again.err
    assert sorted(widths(server)) == [40, 41]  # the second run sent nothing
    assert texts(captions) == {
        captions[0]: "old tags, A PNG picture, 40x32 pixels.",
        captions[1]: "old tags, A PNG picture, 41x32 pixels.",
    }


def test_a_half_written_journal_line_does_not_swallow_the_next_runs_line(tmp_path, server, caption):
    expected = distinct_pictures(tmp_path, 3)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    assert caption(tmp_path, "--existing", "append", "--limit", 1).code == 0
    with open(tmp_path / JOURNAL, "ab") as journal:  # a run that died as it wrote its line
        journal.write(b'["img0')

    rest = caption(tmp_path, "--existing", "append")
    assert rest.code == 0, rest.err
    assert "captioned 2, skipped 1, failed 0" in rest.err
    third = caption(tmp_path, "--existing", "append")

    assert third.code == 0, third.err
    assert "captioned 0, skipped 3, failed 0" in third.err
    assert sorted(widths(server)) == [40, 41, 42]  # each picture sent once over the three runs
    assert texts(expected) == {path: f"old, {text}" for path, text in expected.items()}


# --- Failures that end ---------------------------------------------------------------------


def test_an_image_a_proxy_always_answers_504_for_fails_after_its_free_outages_and_tries(
    tmp_path, server, caption
):
    expected = distinct_pictures(tmp_path, 3)
    server.answer = lambda chat: (
        Reply(status=504, body=GATEWAY_TIMEOUT) if chat.picture().width == 40 else describe(chat)
    )

    run = caption(tmp_path, "--retries", 1)

    assert run.code == 1
    assert widths(server).count(40) == 5 + 2  # five outages are free, then each uses a try
    assert "FAILED img000.png: Ollama answered 504: 504 Gateway Time-out (after 2 tries)" in run.err
    assert "captioned 2, skipped 0, failed 1" in run.err
    del expected[tmp_path / "img000.txt"]
    assert texts(expected) == expected
    assert not (tmp_path / "img000.txt").exists()
    assert "<html>" not in run.err


def test_a_refusal_ends_the_run_without_waiting_for_a_slow_answer(tmp_path, make_server, spawn):
    distinct_pictures(tmp_path, 3)
    server = make_server(slots=2)
    answers = itertools.count()
    # Whichever image comes first is answered slowly; the second is refused.
    server.answer = lambda chat: (
        Reply(text="a slow caption", delay=600)
        if next(answers) == 0
        else Reply(status=401, error="unauthorized")
    )
    process = spawn(tmp_path, "--host", server.url, "--jobs", 2)

    # The slow answer would take 10 minutes; the test's whole limit is 30 s, and a loaded machine
    # (four suites at once) takes some of them to start the process.
    _, err = process.communicate(timeout=25)

    assert process.returncode == 1
    assert f"stopped: {server.url}: Ollama answered 401: unauthorized" in err
    assert "Traceback" not in err


class StallingPull(http.server.BaseHTTPRequestHandler):
    """An Ollama that lacks the model and whose pull says one line, then nothing more."""

    release = threading.Event()  # replaced per test

    def log_message(self, format, *args):
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/tags":
            self.send_json(200, {"models": []})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/api/show":
            self.send_json(404, {"error": f"model '{body.get('model')}' not found"})
        elif self.path == "/api/pull":
            self.send_response(200)  # HTTP/1.0: no length, the body ends when the connection does
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            self.wfile.write(b'{"status":"pulling manifest"}\n')
            self.wfile.flush()
            self.release.wait(20)
        else:
            self.send_json(404, {"error": "not found"})


@pytest.fixture
def stalling_pull():
    handler = type("Handler", (StallingPull,), {"release": threading.Event()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_ctrl_c_during_a_pull_that_stalls_ends_the_run_at_once(tmp_path, spawn, stalling_pull):
    picture(tmp_path / "a.png")
    process = spawn(tmp_path, "--host", stalling_pull, "--pull")
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "pulling llava:13b: pulling manifest" in line:
            break
    # The run checks for a stop after each line of progress: this test is about the silence
    # after it, so the signal comes once the run is surely waiting for a line that never comes.
    time.sleep(0.3)

    process.send_signal(signal.SIGINT)
    sent_at = time.monotonic()
    err = "".join(lines) + process.communicate(timeout=10)[1]

    assert time.monotonic() - sent_at < 2, err
    assert process.returncode == -signal.SIGINT
    assert "Traceback" not in err
    assert "interrupted while" in err
    assert not (tmp_path / "a.txt").exists()
    assert leftovers(tmp_path) == []


# --- The JSONL -----------------------------------------------------------------------------


def test_the_jsonl_keeps_line_separators_inside_its_lines(tmp_path, server, caption):
    picture(tmp_path / "new\u2028name.png", size=(40, 32))
    picture(tmp_path / "old.png", size=(41, 32))
    (tmp_path / "old.txt").write_text("a\u2028b", encoding="utf-8")
    meta = tmp_path / "meta.jsonl"

    first = caption(tmp_path, "--jsonl", meta)
    assert first.code == 0, first.err
    second = caption(tmp_path, "--jsonl", meta)  # reads what the first wrote

    assert second.code == 0, second.err
    assert widths(server) == [40]
    content = meta.read_text(encoding="utf-8")
    entries = [json.loads(line) for line in content.split("\n") if line]
    assert {entry["file_name"]: entry["text"] for entry in entries} == {
        "new\u2028name.png": "A PNG picture, 40x32 pixels.",
        "old.png": "a\u2028b",
    }
    # Readers that end a line at U+2028 too (Python's splitlines) see the same two lines.
    assert len(content.splitlines()) == 2


@pytest.mark.parametrize(
    "start",
    ["\ufeff", ""],
    ids=["byte-order-mark", "raw-line-separator"],
)
def test_a_jsonl_written_by_another_tool_is_read(tmp_path, server, caption, start):
    """Notepad's byte-order mark; a raw U+2028 inside a string, valid JSON Lines as
    json.dumps(ensure_ascii=False) writes it."""
    picture(tmp_path / "a.png", size=(40, 32))
    meta = tmp_path / "meta.jsonl"
    kept = {"file_name": "elsewhere/b.png", "text": "kept\u2028as it is"}
    meta.write_text(start + json.dumps(kept, ensure_ascii=False) + "\n", encoding="utf-8")

    run = caption(tmp_path, "--jsonl", meta)

    assert run.code == 0, run.err
    entries = [json.loads(line) for line in meta.read_text(encoding="utf-8").split("\n") if line]
    assert {entry["file_name"]: entry["text"] for entry in entries} == {
        "elsewhere/b.png": "kept\u2028as it is",
        "a.png": "A PNG picture, 40x32 pixels.",
    }


# --- A lock file that points elsewhere --------------------------------------------------------


@pytest.mark.parametrize("victim_exists", [True, False], ids=["existing-victim", "missing-victim"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(
    tmp_path, server, caption, victim_exists
):
    folder = tmp_path / "dataset"
    picture(folder / "a.png")
    victim = tmp_path / "victim.conf"
    if victim_exists:
        victim.write_bytes(b"setting = 1\n")
    (folder / LOCK).symlink_to("../victim.conf")

    run = caption(folder)

    assert run.code == 2
    assert one_line(run.err) == f"error: {folder / LOCK} is in the way: it is a link; remove it"
    assert server.requests == []
    assert not (folder / "a.txt").exists()
    if victim_exists:
        assert victim.read_bytes() == b"setting = 1\n"
    else:
        assert not victim.exists()  # not created through the link
    assert (folder / LOCK).is_symlink()


# --- Closed and non-UTF-8 output streams ---------------------------------------------------


def run_in_shell(redirection: str, *args: object) -> subprocess.CompletedProcess:
    """The script started by a shell with one of its streams closed (2>&- or >&-)."""
    environment = script_environment({"PYTHON": sys.executable, "SCRIPT": SCRIPT.stem})
    with as_from_a_terminal():
        return subprocess.run(
            ["bash", "-c", f'"$PYTHON" -m "$SCRIPT" "$@" {redirection}', "_", *map(str, args)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )


def test_a_run_with_stderr_closed_captions_everything(tmp_path, server):
    expected = distinct_pictures(tmp_path, 3)

    result = run_in_shell("2>&-", tmp_path, "--host", server.url)

    assert result.returncode == 0
    assert texts(expected) == expected
    assert leftovers(tmp_path) == []


def test_a_dry_run_with_stdout_closed_ends_well(tmp_path, server):
    distinct_pictures(tmp_path, 2)

    result = run_in_shell(">&-", tmp_path, "--host", server.url, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "dry run: would caption 2, skip 0 already captioned; nothing was sent" in result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
    assert server.requests == []


def test_a_name_the_terminal_cannot_show_is_escaped_not_lost(tmp_path, server, spawn):
    picture(tmp_path / "猫の写真.png")
    process = spawn(tmp_path, "--host", server.url, env={"PYTHONIOENCODING": "latin-1"}, encoding="latin-1")

    _, err = process.communicate(timeout=20)

    assert process.returncode == 0, err
    assert "captioned 1, skipped 0, failed 0" in err
    assert "\\u732b\\u306e\\u5199\\u771f.png" in err  # [1/1] 猫の写真.png, as the terminal can show it
    assert (tmp_path / "猫の写真.txt").read_text(encoding="utf-8") == "A PNG picture, 64x48 pixels."


# --- Arguments that cannot be used ---------------------------------------------------------


def test_a_prefix_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, server):
    picture(tmp_path / "a.png")

    result = run_script(tmp_path, "--host", server.url, "--prefix", os.fsdecode(b"caf\xe9"))

    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "llava-caption-ollama.py: error: argument --prefix: b'caf\\xe9' is not UTF-8 text (see --help)"
    )
    assert server.requests == []
    assert not (tmp_path / "a.txt").exists()


def test_a_suffix_that_is_not_utf8_is_refused_too(tmp_path, server, caption):
    picture(tmp_path / "a.png")

    run = caption(tmp_path, "--suffix", os.fsdecode(b"na\xefve"))

    assert run.code == 2
    assert "argument --suffix: b'na\\xefve' is not UTF-8 text" in one_line(run.err)
    assert server.requests == []


@pytest.mark.parametrize("timeout", ["1e10", "inf", "nan"])
def test_a_timeout_no_timer_can_take_is_one_line_and_exit_2(tmp_path, server, caption, timeout):
    picture(tmp_path / "a.png")

    run = caption(tmp_path, "--timeout", timeout)

    assert run.code == 2
    assert f"argument --timeout: must be a number up to 86400, not {timeout}" in one_line(run.err)
    assert server.requests == []
    assert not (tmp_path / "a.txt").exists()


# --- A caption that appears during the run -------------------------------------------------


def test_a_caption_written_by_hand_during_a_skip_run_is_left_alone(tmp_path, server, caption):
    picture(tmp_path / "a.png", size=(40, 32))
    picture(tmp_path / "b.png", size=(41, 32))
    by_hand = tmp_path / "b.txt"

    def answer(chat):
        if chat.picture().width == 41:  # someone saves b.txt while the model looks at b.png
            by_hand.write_text("written by hand", encoding="utf-8")
        return describe(chat)

    server.answer = answer

    run = caption(tmp_path, "--existing", "skip")

    assert run.code == 1
    assert by_hand.read_text(encoding="utf-8") == "written by hand"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "A PNG picture, 40x32 pixels."
    assert "FAILED b.png: left alone: b.txt appeared beside it during the run" in run.err
    assert "captioned 1, skipped 0, failed 1" in run.err
    assert leftovers(tmp_path) == []


def test_a_lock_left_by_a_killed_run_with_subfolders_does_not_make_a_later_run_claim_them(
    parent_and_sub, make_server, spawn, caption
):
    parent, sub = parent_and_sub
    server = make_server(slots=2)
    killed_run_answered, go_on = threading.Event(), threading.Event()

    def answer(chat):
        if not killed_run_answered.is_set():  # what the killed run asked
            killed_run_answered.wait(20)
        elif chat.picture().width == 40:  # what the later run on the parent asked
            go_on.wait(20)
        return describe(chat)

    server.answer = answer
    killed = spawn(parent, "-r", "--host", server.url)
    try:
        wait_until(lambda: server.in_flight >= 1)
        killed.kill()  # SIGKILL: its lock file stays behind, released by the system
        killed.communicate(timeout=5)
    finally:
        killed_run_answered.set()
    assert (parent / LOCK).exists()
    wait_until(lambda: server.in_flight == 0)
    first = spawn(parent, "--host", server.url)  # without -r: the subfolder is not its own
    a_subfolder_run_goes_on_beside(first, sub, server, go_on, caption)
