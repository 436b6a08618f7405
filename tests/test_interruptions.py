"""Interrupted runs and their reruns: INT, TERM and HUP end a run cleanly and the process dies
by the signal; the journal of a pass makes a rerun do exactly what is left; the folder lock
keeps a second run out; the --jsonl file ends every run in step with the caption files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import (
    SCRIPT,
    SCRIPT_COMMAND,
    as_from_a_terminal,
    child_environment,
    distinct_pictures,
    leftovers,
    picture,
    script_environment,
    signal_twice,
    wait_until,
)
from stand_in_ollama import Reply, describe

LOCK = ".llava-caption-ollama.lock"
JOURNAL = ".llava-caption-ollama.journal"


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def widths(server) -> list[int]:
    """Which pictures the stand-in was asked about, by width (distinct_pictures: 40, 41, ...)."""
    return sorted(chat.picture().width for chat in server.chats)


def with_old_captions(folder: Path, count: int) -> dict:
    expected = distinct_pictures(folder, count)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    return expected


def contents(expected: dict) -> dict:
    return {path: path.read_text(encoding="utf-8") if path.exists() else None for path in expected}


# --- A signal ends the run cleanly, and the process dies by it -------------------------


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_term_or_hup_mid_run_writes_what_came_and_dies_by_the_signal(
    tmp_path, make_server, spawn, signal_number
):
    expected = distinct_pictures(tmp_path, 8)
    server = make_server(slots=2, latency=0.15)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 2, "--jsonl", tmp_path / "meta.jsonl")
    wait_until(lambda: len(server.chats) >= 3)  # one answered, two on their way

    process.send_signal(signal_number)
    _, err = process.communicate(timeout=20)

    assert process.returncode == -signal_number
    assert "Traceback" not in err
    written = sorted(tmp_path.glob("*.txt"))
    assert 0 < len(written) < 8
    assert f"interrupted: captioned {len(written)}, skipped 0, failed 0 in " in err
    assert f"; {8 - len(written)} images left for a rerun" in err
    for path in written:
        assert path.read_text(encoding="utf-8") == expected[path]  # complete, never a part
    assert leftovers(tmp_path) == []  # no temporary file, no lock
    lines = jsonl_lines(tmp_path / "meta.jsonl")
    assert sorted(line["file_name"] for line in lines) == [path.stem + ".png" for path in written]
    for line in lines:
        assert line["text"] == expected[tmp_path / line["file_name"].replace(".png", ".txt")]


def test_second_term_during_the_wait_quits_at_once_and_still_keeps_the_jsonl(tmp_path, make_server, spawn):
    expected = distinct_pictures(tmp_path, 4)
    server = make_server(slots=2)
    # The first image to arrive is answered at once; every other answer would take a minute.
    answers = itertools.count()
    server.answer = lambda chat: describe(chat) if next(answers) == 0 else Reply(text="x", delay=60)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 2, "--jsonl", tmp_path / "meta.jsonl")
    wait_until(lambda: list(tmp_path.glob("*.txt")) and server.in_flight == 2)
    first = next(tmp_path.glob("*.txt"))

    signal_twice(process, signal.SIGTERM)
    _, err = process.communicate(timeout=15)

    assert process.returncode == -signal.SIGTERM
    assert "interrupted: captioned 1, skipped 0, failed 0 in " in err
    assert "; 3 images left for a rerun" in err
    assert "Traceback" not in err
    assert list(tmp_path.glob("*.txt")) == [first]
    assert [(line["file_name"], line["text"]) for line in jsonl_lines(tmp_path / "meta.jsonl")] == [
        (first.stem + ".png", expected[first])
    ]
    assert leftovers(tmp_path) == []


def test_a_run_under_nohup_goes_on_when_the_terminal_hangs_up(tmp_path, make_server, spawn):
    """`nohup python llava-caption-ollama.py DIR &` and log out: nohup starts the run with SIGHUP
    ignored, which the run must leave so, as every program does (Python itself leaves an ignored
    SIGINT alone)."""
    expected = distinct_pictures(tmp_path, 3)
    server = make_server(slots=1, latency=0.1)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 1, ignoring=(signal.SIGHUP,))  # nohup
    wait_until(lambda: server.in_flight >= 1)

    process.send_signal(signal.SIGHUP)  # the terminal closes
    _, err = process.communicate(timeout=20)

    assert contents(expected) == expected
    assert "captioned 3, skipped 0, failed 0" in err
    assert "interrupted" not in err
    assert process.returncode == 0


def test_ctrl_c_stops_a_shell_loop_over_folders(tmp_path, make_server):
    """A terminal's Ctrl-C reaches the whole foreground group: bash and the captioner. Bash
    stops its loop only if the child died by SIGINT: after a plain exit(130) it would go on to
    dir2 and dir3 and print LOOP-FINISHED (bash's "wait and cooperative exit")."""
    server = make_server(slots=1, latency=0.15)
    folders = []
    for number in (1, 2, 3):  # each folder's pictures have widths of their own: 100, 200, 300
        folders.append(tmp_path / f"dir{number}")
        for width in (100 * number, 100 * number + 1):
            picture(folders[-1] / f"w{width}.png", size=(width, 32))
    loop = 'for d in "$@"; do "$PYTHON" "$SCRIPT" "$d" --host "$HOST"; done; echo LOOP-FINISHED'
    environment = child_environment({"PYTHON": sys.executable, "SCRIPT": str(SCRIPT), "HOST": server.url})
    with as_from_a_terminal():
        shell = subprocess.Popen(
            ["bash", "-c", loop, "_", *map(str, folders)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as a terminal's foreground job
        )
    try:
        wait_until(lambda: server.in_flight >= 1)
        os.killpg(shell.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = shell.communicate(timeout=20)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.communicate()

    assert "LOOP-FINISHED" not in out
    assert shell.returncode == -signal.SIGINT  # bash itself ended, by the same signal
    assert set(widths(server)) <= {100, 101}  # nothing of dir2 or dir3 was ever sent
    assert "interrupted: captioned " in err
    assert list(folders[1].glob("*.txt")) == [] and list(folders[2].glob("*.txt")) == []


# --- The journal: a rerun of the same pass does what is left, once -----------------------


def test_an_interrupted_append_pass_rerun_appends_to_each_caption_once(tmp_path, make_server, spawn, caption):
    expected = with_old_captions(tmp_path, 6)
    server = make_server(slots=1, latency=0.1)
    command = (tmp_path, "--jobs", 1, "--existing", "append")
    process = spawn(*command, "--host", server.url)
    wait_until(lambda: len(server.chats) >= 3)  # two answered, the third on its way

    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert process.returncode == -signal.SIGINT, err
    done_first = {path for path, text in contents(expected).items() if text != "old"}
    assert 2 <= len(done_first) < 6
    widths_first = set(widths(server))
    server.chats.clear()

    rerun = caption(*command, host=server.url)

    assert rerun.code == 0, rerun.err
    assert f"captioned {6 - len(done_first)}, skipped {len(done_first)}, failed 0" in rerun.err
    assert contents(expected) == {path: f"old, {text}" for path, text in expected.items()}
    sent_again = set(widths(server))
    assert len(server.chats) == 6 - len(done_first)
    assert not sent_again & {40 + int(path.stem[3:]) for path in done_first}
    assert sent_again | widths_first == set(range(40, 46))
    assert leftovers(tmp_path) == []


def test_a_prepend_pass_killed_outright_is_finished_by_a_rerun_and_the_jsonl_mended(
    tmp_path, make_server, spawn, caption
):
    """SIGKILL: no drain, no summary, the lock file stays behind and the JSONL (saved every
    10 s) is not saved. The rerun is not stopped by the dead run's lock, prepends once to the
    images not yet done, and leaves a JSONL with every caption, those of the killed run
    rebuilt from their files."""
    expected = with_old_captions(tmp_path, 6)
    meta = tmp_path / "meta.jsonl"
    server = make_server(slots=1, latency=0.1)
    command = (tmp_path, "--jobs", 1, "--existing", "prepend", "--jsonl", meta)
    process = spawn(*command, "--host", server.url)
    # What is asserted below: two captions on disk (an answer in is not yet a caption written).
    wait_until(lambda: sum(text != "old" for text in contents(expected).values()) >= 2)

    process.kill()
    process.communicate(timeout=5)
    after_kill = contents(expected)
    done_first = {path for path, text in after_kill.items() if text != "old"}
    assert all(after_kill[path] == f"{expected[path]}, old" for path in done_first)
    assert len(done_first) >= 2
    server.chats.clear()

    rerun = caption(*command, host=server.url)

    assert rerun.code == 0, rerun.err
    assert contents(expected) == {path: f"{text}, old" for path, text in expected.items()}
    assert len(server.chats) == 6 - len(done_first)
    assert not (tmp_path / LOCK).exists()
    lines = {line["file_name"]: line for line in jsonl_lines(meta)}
    assert {name: line["text"] for name, line in lines.items()} == {
        path.stem + ".png": f"{text}, old" for path, text in expected.items()
    }
    for path in done_first:
        assert lines[path.stem + ".png"]["recovered"] is True


def test_a_completed_overwrite_pass_is_not_done_again_but_a_new_prompt_or_fresh_redoes_all(
    tmp_path, server, caption
):
    expected = with_old_captions(tmp_path, 3)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "one.txt").write_text("Describe the picture.", encoding="utf-8")
    (prompts / "two.txt").write_text("Describe the picture in one sentence.", encoding="utf-8")

    first = caption(tmp_path, prompts / "one.txt", "--existing", "overwrite")
    assert first.code == 0 and len(server.chats) == 3
    assert contents(expected) == expected

    again = caption(tmp_path, prompts / "one.txt", "--existing", "overwrite")
    assert again.code == 0
    assert "captioned 0, skipped 3, failed 0" in again.err
    assert len(server.chats) == 3  # nothing sent

    new_prompt = caption(tmp_path, prompts / "two.txt", "--existing", "overwrite")
    assert new_prompt.code == 0 and "captioned 3, skipped 0, failed 0" in new_prompt.err
    assert [chat.prompt for chat in server.chats[3:]] == ["Describe the picture in one sentence."] * 3

    fresh = caption(tmp_path, prompts / "two.txt", "--existing", "overwrite", "--fresh")
    assert fresh.code == 0 and "captioned 3, skipped 0, failed 0" in fresh.err
    assert len(server.chats) == 9
    assert caption(tmp_path, prompts / "two.txt", "--existing", "overwrite").code == 0
    assert len(server.chats) == 9  # the fresh pass is remembered in its turn
    assert contents(expected) == expected


def test_a_crash_between_the_journal_line_and_the_caption_write_neither_loses_nor_doubles(
    tmp_path, server, caption
):
    """The journal line of an image is written before its caption file. A crash between the two
    leaves a journal naming a caption that the file does not hold: the file still holds the old
    text, and no second line saying the caption is in place. That crash cannot be caused from
    here, so its result is made by hand: a run with --limit 1 journals and writes img000's
    caption, then img000.txt is put back to "old" and the journal's last line (the caption in
    place) removed, as if the write had never happened. The rerun must append to img000 again
    (not lose it), once (not "old, X, X"). The control: without the edit, the rerun leaves
    img000 alone; and a person who puts "old" back after a write that landed has edited it
    (tests/test_reruns_combined.py)."""
    expected = with_old_captions(tmp_path, 3)
    first_caption = tmp_path / "img000.txt"
    assert caption(tmp_path, "--existing", "append", "--limit", 1).code == 0
    assert first_caption.read_text(encoding="utf-8") == f"old, {expected[first_caption]}"
    header, line, _landed = (tmp_path / JOURNAL).read_text().splitlines()
    (tmp_path / JOURNAL).write_text(f"{header}\n{line}\n")  # killed before the second line
    first_caption.write_text("old", encoding="utf-8")  # the caption write that never happened
    server.chats.clear()

    rerun = caption(tmp_path, "--existing", "append")

    assert rerun.code == 0
    assert "captioned 3, skipped 0, failed 0" in rerun.err
    assert widths(server) == [40, 41, 42]  # img000 done again
    assert contents(expected) == {path: f"old, {text}" for path, text in expected.items()}


def test_a_journaled_image_whose_caption_still_matches_is_not_done_again(tmp_path, server, caption):
    """The control of the crash test above: there, img000 is done again because of the edit."""
    expected = with_old_captions(tmp_path, 3)
    assert caption(tmp_path, "--existing", "append", "--limit", 1).code == 0
    server.chats.clear()

    rerun = caption(tmp_path, "--existing", "append")

    assert rerun.code == 0 and "captioned 2, skipped 1, failed 0" in rerun.err
    assert widths(server) == [41, 42]
    assert contents(expected) == {path: f"old, {text}" for path, text in expected.items()}


# --- The folder lock -------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_refuses_and_names_the_first(tmp_path, server, spawn, caption):
    expected = distinct_pictures(tmp_path, 1)
    go_on = threading.Event()  # the first run's answer is held until the second run is refused
    server.answer = lambda chat: describe(chat) if go_on.wait(20) else "too late"
    first = spawn(tmp_path, "--host", server.url)
    wait_until(lambda: server.in_flight >= 1)
    requests_before = len(server.requests)

    try:
        second = caption(tmp_path)  # in this process: the lock is the other process's all the same
    finally:
        go_on.set()

    assert second.code == 2
    assert f"another run is captioning {tmp_path}" in second.err
    assert f"pid {first.pid}, started " in second.err
    assert "Traceback" not in second.err
    assert len(server.requests) == requests_before  # the second run asked the server nothing
    assert len(server.chats) == 1

    _, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert contents(expected) == expected
    assert not (tmp_path / LOCK).exists()
    assert leftovers(tmp_path) == []

    picture(tmp_path / "late.png", size=(90, 32))
    after = caption(tmp_path)
    assert after.code == 0, after.err
    assert (tmp_path / "late.txt").read_text(encoding="utf-8") == "A PNG picture, 90x32 pixels."
    assert not (tmp_path / LOCK).exists()


def test_a_lock_file_removed_just_as_a_run_took_it_still_keeps_a_second_run_out(
    tmp_path, make_server, caption, monkeypatch
):
    """The run before ends, and removes its lock file, between this run's opening that file and
    locking it: what this run then holds is no file at the lock's path, and a run started next
    would find the folder free."""
    import fcntl

    lock = tmp_path / LOCK
    real_flock = fcntl.flock
    removed = []

    def flock(descriptor, operation):
        if not removed and lock.exists() and os.path.samestat(os.fstat(descriptor), lock.stat()):
            lock.unlink()
            removed.append(lock)
        return real_flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    expected = distinct_pictures(tmp_path, 1)
    second = []

    def answer(chat):
        if not second:  # while the first run's request waits here, a second run starts
            second.append(None)
            second[0] = subprocess.run(  # not run_script: this is no main thread, to set signals in
                [*SCRIPT_COMMAND, str(tmp_path), "--host", server.url],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                env=script_environment(None),
            )
        return describe(chat)

    server = make_server(slots=2, answer=answer)  # room for the second run, were it let in

    first = caption(tmp_path, host=server.url)

    assert removed and first.code == 0, first.err
    assert second[0].returncode == 2, second[0].stderr
    assert f"another run is captioning {tmp_path}" in second[0].stderr
    assert len(server.chats) == 1
    assert contents(expected) == expected


# --- The JSONL is mended at the end of every run ---------------------------------------------


def test_jsonl_gets_lines_for_captions_written_without_it_and_follows_edits(tmp_path, server, caption):
    expected = distinct_pictures(tmp_path, 3)
    meta = tmp_path / "meta.jsonl"
    assert caption(tmp_path).code == 0
    assert not meta.exists()
    server.chats.clear()

    later = caption(tmp_path, "--jsonl", meta)

    assert later.code == 0
    assert server.chats == []
    lines = jsonl_lines(meta)
    assert sorted(line["file_name"] for line in lines) == ["img000.png", "img001.png", "img002.png"]
    for line in lines:
        assert line["text"] == expected[tmp_path / line["file_name"].replace(".png", ".txt")]
        assert line["recovered"] is True

    (tmp_path / "img001.txt").write_text("a hand-written caption\n", encoding="utf-8")
    assert caption(tmp_path, "--jsonl", meta).code == 0
    texts = {line["file_name"]: line["text"] for line in jsonl_lines(meta)}
    assert texts == {
        "img000.png": expected[tmp_path / "img000.txt"],
        "img001.png": "a hand-written caption",
        "img002.png": expected[tmp_path / "img002.txt"],
    }
    assert server.chats == []


def test_jsonl_in_a_missing_folder_stops_the_run_before_any_request(tmp_path, server, caption):
    distinct_pictures(tmp_path, 2)

    result = caption(tmp_path, "--jsonl", tmp_path / "missing_folder" / "meta.jsonl")

    assert result.code == 2
    assert f"error: --jsonl: the folder {tmp_path / 'missing_folder'} does not exist" in result.err
    assert server.requests == []
    assert list(tmp_path.glob("*.txt")) == []


def test_a_reader_that_closes_stderr_early_does_not_change_the_outcome(tmp_path, make_server, spawn):
    """`... 2>&1 | head -1`: the reader goes away after the first line; the run goes on
    unheard, captions everything, keeps its JSONL and exits 0."""
    expected = distinct_pictures(tmp_path, 4)
    server = make_server(slots=1, latency=0.05)
    meta = tmp_path / "meta.jsonl"
    process = spawn(tmp_path, "--host", server.url, "--jobs", 1, "--jsonl", meta)

    assert process.stderr.readline().startswith("4 to caption")
    process.stderr.close()
    process.stdout.read()
    process.wait(timeout=20)

    assert contents(expected) == expected
    assert sorted(line["file_name"] for line in jsonl_lines(meta)) == [f"img{i:03d}.png" for i in range(4)]
    assert leftovers(tmp_path) == []
    assert process.returncode == 0
