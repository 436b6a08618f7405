"""Interrupted runs, reruns and runs side by side: signals, the journal of a pass, the folder
lock, and the --jsonl file that must end every run in step with the caption files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCRIPT, distinct_pictures, leftovers, picture, run_script, wait_until

LOCK = ".llava-caption-ollama.lock"


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def widths(server) -> list[int]:
    """The width of each picture the stand-in was asked about: which image each request was."""
    return sorted(chat.picture().width for chat in server.chats)


# --- A signal ends the run cleanly, and the process dies by it -------------------------


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_term_or_hup_mid_run_writes_what_came_and_dies_by_the_signal(
    tmp_path, make_server, spawn, signal_number
):
    expected = distinct_pictures(tmp_path, 8)
    server = make_server(slots=2, latency=0.3)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 2, "--jsonl", tmp_path / "meta.jsonl")
    wait_until(lambda: len(server.chats) >= 3)  # two answered or nearly, more on their way

    process.send_signal(signal_number)
    _, err = process.communicate(timeout=20)

    assert process.returncode == -signal_number
    assert "interrupted: captioned " in err
    assert "Traceback" not in err
    written = sorted(tmp_path.glob("*.txt"))
    assert 0 < len(written) < 8
    assert f"; {8 - len(written)} left for a rerun" in err
    for path in written:
        assert path.read_text(encoding="utf-8") == expected[path]
    assert leftovers(tmp_path) == []
    lines = jsonl_lines(tmp_path / "meta.jsonl")
    assert sorted(line["file_name"] for line in lines) == sorted(p.stem + ".png" for p in written)
    for line in lines:
        assert line["text"] == expected[tmp_path / (Path(line["file_name"]).stem + ".txt")]


def test_ctrl_c_stops_a_shell_loop_over_folders(tmp_path, make_server):
    """A terminal's Ctrl-C reaches the whole foreground group: bash and the captioner. Bash
    goes on with its loop unless the child died by SIGINT (an exit(130) would not stop it)."""
    server = make_server(slots=1, latency=0.3)
    folders = []
    for index in range(3):  # each folder's pictures have widths of their own
        folder = tmp_path / f"dir{index + 1}"
        for width in (100 * (index + 1), 100 * (index + 1) + 1):
            picture(folder / f"w{width}.png", size=(width, 30))
        folders.append(folder)
    loop = (
        'for d in "$@"; do "$PYTHON" "$SCRIPT" "$d" --host "$HOST"; done; echo LOOP-FINISHED'
    )
    environment = {**os.environ, "PYTHON": sys.executable, "SCRIPT": str(SCRIPT), "HOST": server.url}
    environment.pop("OLLAMA_HOST", None)
    shell = subprocess.Popen(
        ["bash", "-c", loop, "_", *map(str, folders)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
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
    assert shell.returncode == -signal.SIGINT
    assert all(width in (100, 101) for width in widths(server))  # nothing from dir2 or dir3
    assert "interrupted: captioned " in err
    assert list(folders[1].glob("*.txt")) == [] and list(folders[2].glob("*.txt")) == []


# --- The journal: a rerun of the same pass does what is left, once -----------------------


def test_an_interrupted_append_rerun_appends_to_each_caption_once(tmp_path, make_server, spawn):
    expected = distinct_pictures(tmp_path, 6)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    server = make_server(slots=1, latency=0.2)
    command = (tmp_path, "--host", server.url, "--jobs", 1, "--existing", "append")
    process = spawn(*command)
    wait_until(lambda: len(server.chats) >= 3)  # two answered, the third on its way

    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert process.returncode == -signal.SIGINT, err
    first = {path for path in expected if path.read_text(encoding="utf-8") != "old"}
    assert 2 <= len(first) < 6
    first_widths = widths(server)

    server.chats.clear()
    rerun = run_script(*command)

    assert rerun.returncode == 0, rerun.stderr
    assert f"captioned {6 - len(first)}, skipped {len(first)}, failed 0" in rerun.stderr
    for path, text in expected.items():
        assert path.read_text(encoding="utf-8") == f"old, {text}"
    assert len(server.chats) == 6 - len(first)
    assert not set(widths(server)) & {40 + int(p.stem[3:]) for p in first}
    assert set(widths(server)) | set(first_widths) == {40 + index for index in range(6)}
    assert leftovers(tmp_path) == []


def test_a_completed_overwrite_pass_is_not_done_again_but_a_new_prompt_or_fresh_is(
    tmp_path, server, caption
):
    expected = distinct_pictures(tmp_path, 3)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    prompt = tmp_path / "prompts" / "prompt.txt"
    prompt.parent.mkdir()
    prompt.write_text("Describe the picture.", encoding="utf-8")
    other_prompt = tmp_path / "prompts" / "other.txt"
    other_prompt.write_text("Describe the picture in one sentence.", encoding="utf-8")

    first = caption(tmp_path, prompt, "--existing", "overwrite")
    assert first.code == 0 and len(server.chats) == 3
    assert {path: path.read_text(encoding="utf-8") for path in expected} == expected

    again = caption(tmp_path, prompt, "--existing", "overwrite")
    assert again.code == 0
    assert "captioned 0, skipped 3, failed 0" in again.err
    assert len(server.chats) == 3  # nothing sent

    new_prompt = caption(tmp_path, other_prompt, "--existing", "overwrite")
    assert new_prompt.code == 0 and "captioned 3, skipped 0" in new_prompt.err
    assert len(server.chats) == 6
    assert server.chats[-1].prompt == "Describe the picture in one sentence."

    fresh = caption(tmp_path, other_prompt, "--existing", "overwrite", "--fresh")
    assert fresh.code == 0 and "captioned 3, skipped 0" in fresh.err
    assert len(server.chats) == 9
    assert caption(tmp_path, other_prompt, "--existing", "overwrite").code == 0
    assert len(server.chats) == 9  # the fresh pass is remembered in its turn
    assert {path: path.read_text(encoding="utf-8") for path in expected} == expected


def test_a_crash_between_the_journal_line_and_the_caption_write_neither_loses_nor_doubles(
    tmp_path, server, caption
):
    """The journal line of an image is written before its caption file. A crash between the two
    leaves a journal naming a caption the file does not hold: the file still holds the old text.
    The crash itself cannot be caused from here, so its result is made by hand: a run with
    --limit 1 journals and writes img000's caption, then img000.txt is put back to "old", as if
    the write had never happened. The rerun must append to img000 again (not lose it), once
    (not "old, X, X"), and leave the others as the pass expects."""
    expected = distinct_pictures(tmp_path, 3)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    first_caption = tmp_path / "img000.txt"

    assert caption(tmp_path, "--existing", "append", "--limit", 1).code == 0
    assert first_caption.read_text(encoding="utf-8") == f"old, {expected[first_caption]}"
    assert (tmp_path / ".llava-caption-ollama.journal").read_text().count("\n") == 2  # pass + img000
    first_caption.write_text("old", encoding="utf-8")  # the caption write that never happened
    server.chats.clear()

    rerun = caption(tmp_path, "--existing", "append")

    assert rerun.code == 0
    assert "captioned 3, skipped 0, failed 0" in rerun.err
    assert widths(server) == [40, 41, 42]  # img000 done again
    for path, text in expected.items():
        assert path.read_text(encoding="utf-8") == f"old, {text}"


def test_a_journaled_image_whose_caption_still_matches_is_not_done_again(tmp_path, server, caption):
    """The other side of the crash test above: without the hand edit, the rerun of the same
    pass leaves img000 alone, so the crash test's redo is the journal's doing."""
    expected = distinct_pictures(tmp_path, 3)
    for path in expected:
        path.write_text("old", encoding="utf-8")
    assert caption(tmp_path, "--existing", "append", "--limit", 1).code == 0
    server.chats.clear()

    rerun = caption(tmp_path, "--existing", "append")

    assert rerun.code == 0 and "captioned 2, skipped 1, failed 0" in rerun.err
    assert widths(server) == [41, 42]
    for path, text in expected.items():
        assert path.read_text(encoding="utf-8") == f"old, {text}"


# --- The folder lock -------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_refuses_and_names_the_first(tmp_path, make_server, spawn):
    expected = distinct_pictures(tmp_path, 2)
    server = make_server(slots=1, latency=1.0)
    first = spawn(tmp_path, "--host", server.url, "--jobs", 1)
    wait_until(lambda: server.in_flight >= 1)
    requests_before = len(server.requests)

    second = run_script(tmp_path, "--host", server.url, "--jobs", 1)

    assert second.returncode == 2
    assert f"another run is captioning {tmp_path}" in second.stderr
    assert f"pid {first.pid}, started " in second.stderr
    assert "Traceback" not in second.stderr
    assert len(server.requests) == requests_before  # not even a look at the server
    assert len(server.chats) == 1

    _, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert {path: path.read_text(encoding="utf-8") for path in expected} == expected
    assert not (tmp_path / LOCK).exists()
    assert leftovers(tmp_path) == []

    picture(tmp_path / "late.png", size=(90, 30))
    server.latency = 0.0
    after = run_script(tmp_path, "--host", server.url)
    assert after.returncode == 0, after.stderr
    assert (tmp_path / "late.txt").read_text(encoding="utf-8") == "A PNG picture, 90x30 pixels."
    assert not (tmp_path / LOCK).exists()


# --- The JSONL is mended at the end of every run ---------------------------------------------


def test_jsonl_gets_lines_for_captions_written_without_it(tmp_path, server, caption):
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
        assert line["text"] == expected[tmp_path / (Path(line["file_name"]).stem + ".txt")]
        assert line["recovered"] is True

    (tmp_path / "img001.txt").write_text("a hand-written caption\n", encoding="utf-8")
    assert caption(tmp_path, "--jsonl", meta).code == 0
    texts = {line["file_name"]: line["text"] for line in jsonl_lines(meta)}
    assert texts["img001.png"] == "a hand-written caption"
    assert texts["img000.png"] == expected[tmp_path / "img000.txt"]
    assert len(texts) == 3
    assert server.chats == []


def test_jsonl_in_a_missing_folder_stops_the_run_before_any_request(tmp_path, server, caption):
    distinct_pictures(tmp_path, 2)

    result = caption(tmp_path, "--jsonl", tmp_path / "missing_folder" / "meta.jsonl")

    assert result.code == 2
    assert f"error: --jsonl: the folder {tmp_path / 'missing_folder'} does not exist" in result.err
    assert server.requests == []
    assert list(tmp_path.glob("*.txt")) == []


def test_a_reader_that_closes_stderr_early_does_not_stop_the_run(tmp_path, make_server, spawn):
    """`... 2>&1 | head -1`: the reader goes away after the first line; the run goes on
    unheard, captions everything, keeps its JSONL and exits 0."""
    expected = distinct_pictures(tmp_path, 4)
    server = make_server(slots=1, latency=0.05)
    meta = tmp_path / "meta.jsonl"
    process = spawn(tmp_path, "--host", server.url, "--jobs", 1, "--jsonl", meta)

    assert "4 to caption" in process.stderr.readline()
    process.stderr.close()
    process.stdout.read()
    process.wait(timeout=20)

    assert process.returncode == 0
    assert {path: path.read_text(encoding="utf-8") for path in expected} == expected
    lines = jsonl_lines(meta)
    assert sorted(line["file_name"] for line in lines) == [f"img{i:03d}.png" for i in range(4)]
    assert leftovers(tmp_path) == []
