"""The script as a shell sees it: arguments, exit codes, what it prints, Ctrl-C."""

from __future__ import annotations

import os
import pty
import signal
import subprocess

import pytest
from conftest import (
    SCRIPT,
    by_width,
    closed_port_url,
    leftovers,
    picture,
    run_script,
    signal_twice,
    wait_until,
)
from stand_in_ollama import Reply


def test_default_prompt_is_the_one_beside_the_script_whatever_the_working_folder(
    tmp_path, server, caption, monkeypatch
):
    picture(tmp_path / "images" / "a.jpg")
    (tmp_path / "prompt.txt").write_text("a decoy in the working folder")
    monkeypatch.chdir(tmp_path)

    result = caption("images")

    assert result.code == 0, result.err
    assert server.chats[0].prompt == (SCRIPT.parent / "prompt.txt").read_text(encoding="utf-8").strip()


def test_prompt_file_given_as_second_argument(tmp_path, server, caption):
    picture(tmp_path / "a.jpg")
    (tmp_path / "tags.txt").write_text("List booru tags.")
    assert caption(tmp_path, tmp_path / "tags.txt").code == 0
    assert server.chats[0].prompt == "List booru tags."


@pytest.mark.parametrize(
    "args, message",
    [
        (["{dir}", "{dir}/missing.txt"], "cannot read prompt file"),
        (["{dir}", "{dir}/empty.txt"], "empty.txt is empty"),
        (["{dir}/nope"], "nope is not a folder"),
        (["{dir}", "--limit", "0"], "--limit: must be at least 1"),
        (["{dir}", "--existing", "merge"], "invalid choice: 'merge'"),
        (["{dir}", "-q", "-v"], "not allowed with argument"),
        ([], "the following arguments are required: DIR"),
    ],
)
def test_what_stops_a_run_before_it_starts_exits_2(tmp_path, caption, args, message):
    picture(tmp_path / "a.jpg")
    (tmp_path / "empty.txt").write_text("\n  \n")

    result = caption(*[arg.format(dir=tmp_path) for arg in args], host=closed_port_url())

    assert result.code == 2
    assert message in result.err


def test_a_dead_server_costs_a_line_for_the_wait_one_for_the_error_and_no_traceback(tmp_path):
    picture(tmp_path / "a.jpg")
    url = closed_port_url()
    result = run_script(tmp_path, env={"OLLAMA_HOST": url})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{url} refuses connections; waiting up to 2s in case it is restarting",
        f"error: cannot reach Ollama at {url}; start it with 'ollama serve' or point --host (or OLLAMA_HOST) at it",
    ]
    assert result.stdout == ""


def test_in_a_pipe_each_image_gets_a_line_with_position_time_and_eta(tmp_path, server, caption):
    for name in "abc":
        picture(tmp_path / f"{name}.jpg")
    (tmp_path / "a.txt").write_text("done before")
    server.answer = lambda chat: "A red square"

    lines = caption(tmp_path).err.splitlines()  # in this process, its stderr captured: a pipe

    assert lines[0] == "2 to caption, 1 already captioned"
    assert lines[1].startswith(("[1/2] b.jpg ", "[1/2] c.jpg ")) and ", ETA " in lines[1]
    assert lines[2].startswith(("[2/2] b.jpg ", "[2/2] c.jpg ")) and lines[2].endswith(", ETA 0s")
    assert lines[1][6:11] != lines[2][6:11]
    assert lines[3].startswith("captioned 2, skipped 1, failed 0 in ")
    assert lines[3].endswith(" images/s)")
    assert lines[4].startswith("  ") and " tokens/s generated; captions average 3 words; " in lines[4]
    assert len(lines) == 5


def test_verbose_prints_each_caption_and_quiet_only_failures_and_the_summary(tmp_path, server, caption):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    server.answer = by_width({65: Reply(status=400, error="boom")})

    verbose = caption(tmp_path, "-v").err.splitlines()
    a_line = next(i for i, line in enumerate(verbose) if line.startswith("[") and " a.jpg " in line)
    assert verbose[a_line + 1] == "    A red square"

    (tmp_path / "a.txt").unlink()
    server.chats.clear()
    quiet = caption(tmp_path, "-q").err.splitlines()
    assert quiet[0] in (
        "[1/2] FAILED b.jpg: Ollama answered 400: boom",
        "[2/2] FAILED b.jpg: Ollama answered 400: boom",
    )
    assert quiet[1].startswith("captioned 1, skipped 0, failed 1 in ")
    assert " tokens/s generated" in quiet[2]
    assert quiet[3:] == ["  failed b.jpg: Ollama answered 400: boom"]


def test_on_a_terminal_a_live_bar_shows_rate_and_eta(tmp_path, server, spawn):
    for name in "abc":
        picture(tmp_path / f"{name}.jpg")
    controller, terminal = pty.openpty()
    process = spawn(
        tmp_path, "--host", server.url, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    assert process.wait(timeout=30) == 0
    text = screen.decode()

    assert "\r\x1b[K[" in text  # the bar redraws in place
    assert "] 3/3 " in text and " img/s ETA " in text
    assert "[1/3] a.jpg" not in text  # no log lines on a terminal
    assert "captioned 3, skipped 0, failed 0" in text


def test_first_ctrl_c_finishes_the_answers_on_their_way_and_a_rerun_does_the_rest(
    tmp_path, make_server, spawn, caption
):
    for width, name in enumerate("abcdef", start=64):
        picture(tmp_path / f"{name}.jpg", size=(width, 48))
    server = make_server(slots=2, latency=0.4)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 2)
    wait_until(lambda: server.in_flight == 2)

    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)

    # Dead by the signal, as the shell must see it to stop a loop: $? is 130.
    assert process.returncode == -signal.SIGINT
    assert "stopping: waiting up to 20s for the answers on their way (Ctrl-C again to quit at once)" in err
    assert "interrupted: captioned 2, skipped 0, failed 0" in err
    assert "; 4 images left for a rerun" in err
    assert "Traceback" not in err
    assert len(list(tmp_path.glob("*.txt"))) == 2
    assert leftovers(tmp_path) == []

    server.chats.clear()
    assert caption(tmp_path, "--jobs", 4, host=server.url).code == 0
    assert len(server.chats) == 4
    assert len(list(tmp_path.glob("*.txt"))) == 6


def test_second_ctrl_c_quits_at_once(tmp_path, server, spawn):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: Reply(text="never in time", delay=60)
    process = spawn(tmp_path, "--host", server.url)
    wait_until(lambda: server.in_flight >= 1)

    signal_twice(process, signal.SIGINT)
    _, err = process.communicate(timeout=15)

    assert process.returncode == -signal.SIGINT
    assert "interrupted: captioned 0, skipped 0, failed 0 in " in err
    assert "Traceback" not in err
    assert list(tmp_path.glob("*.txt")) == []
    assert leftovers(tmp_path) == []


def test_ctrl_c_while_the_only_server_is_down_ends_at_once(tmp_path, server, spawn):
    for name in "abc":
        picture(tmp_path / f"{name}.jpg")

    def go_down(chat):
        server.down = True  # a proxy's Ollama went away: every request now gets 502
        return "A red square"

    server.answer = go_down
    process = spawn(tmp_path, "--host", server.url, "--jobs", 1)
    for line in process.stderr:
        if " stopped answering " in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=15)  # not the 20 s kept for answers on their way

    assert process.returncode == -signal.SIGINT
    assert "stopping: waiting" not in err  # no answer can be on its way
    assert "interrupted: captioned 1, skipped 0, failed 0 in " in err and "; 2 images left for a rerun" in err
