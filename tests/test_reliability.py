"""A night's run: faults of the server, restarts, Ctrl-C at any moment, write failures, hostile files."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import by_width, distinct_pictures, fill_disk, leftovers, picture, wait_until
from PIL import Image
from stand_in_ollama import BUSY, RUNNER_CRASH, Reply, StandInOllama, describe


def every(k: int, fault: Reply, faulted: list):
    """An answer that fails every k-th time (counted where answers are given, one at a time),
    never twice for one image: where the k-th request is a retry, the fault goes to the next
    image instead. Counted by request alone, a loaded machine's order of retries could make one
    image fail all its tries."""
    count = itertools.count(1)
    owed, failed_once = [False], set()

    def answer(chat):
        owed[0] = owed[0] or next(count) % k == 0
        width = chat.picture().width
        if not owed[0] or width in failed_once:
            return describe(chat)
        owed[0] = False
        failed_once.add(width)
        faulted.append(chat)
        return fault

    return answer


FAULTS = {
    "runner crash": Reply(status=500, error=RUNNER_CRASH),
    "legacy runner crash": Reply(status=500, error="llama runner process has terminated: exit status 2"),
    "busy": Reply(status=503, error=BUSY),
    "dropped connection": Reply(drop=True),
    "error mid-stream": Reply(text="A red", error="an error was encountered while running the model"),
    "stream without end": Reply(text="A red", done=False),
    "hang past the timeout": Reply(text="late", delay=4),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_every_third_answer_failing_still_captions_every_image_exactly_once(tmp_path, server, caption, fault):
    expected = distinct_pictures(tmp_path, 9)
    faulted = []
    server.answer = every(3, fault, faulted)

    # One at a time where answers hang: a request queued behind a hung one waits too.
    # A timeout a loaded machine's stand-in keeps for every answer that is not meant to hang: a
    # good answer timed out would be asked again, and answered twice.
    run = caption(tmp_path, "--timeout", 1, *(["--jobs", 1] if fault.delay else []))

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert len(faulted) >= 3
    answered = [chat.picture().width for chat in server.chats if chat not in faulted]
    assert sorted(answered) == list(range(40, 49))  # each image answered once, none lost
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "error",
    [
        (400, "Failed to load image or audio file"),
        (
            500,
            "Failed to create new sequence: failed to process inputs: unable to make llava embedding from image",
        ),
        (400, "illegal base64 data at input byte 4"),
    ],
)
def test_an_image_the_server_cannot_decode_fails_at_once(tmp_path, server, caption, error):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    status, message = error
    server.answer = by_width({65: Reply(status=status, error=message)})

    run = caption(tmp_path)

    assert run.code == 1
    assert [chat.picture().width for chat in server.chats].count(65) == 1
    assert f"FAILED b.jpg: Ollama answered {status}: {message}\n" in run.err


def test_a_server_restarted_mid_run_is_waited_for_and_the_run_completes(tmp_path, server, caption):
    expected = distinct_pictures(tmp_path, 10)
    port = server.httpd.server_address[1]
    answers = itertools.count(1)
    restarted = []

    def restart_later():
        time.sleep(0.5)
        restarted.append(StandInOllama(port=port).start())

    def answer(chat):
        if next(answers) == 4:  # the server dies after its fourth answer, and comes back
            threading.Thread(target=restart_later).start()
            return Reply(text=f"A PNG picture, {chat.picture().width}x32 pixels.", vanish=True)
        return f"A PNG picture, {chat.picture().width}x32 pixels."

    server.answer = answer
    try:
        run = caption(tmp_path)
    finally:
        for stand_in in restarted:
            stand_in.stop()

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert len(server.chats) >= 4 and restarted[0].chats
    assert "not answering" not in run.err and "taken out" not in run.err


def test_a_model_removed_mid_run_takes_its_server_out(tmp_path, server, caption):
    distinct_pictures(tmp_path, 6)
    answers = itertools.count(1)

    def answer_then_remove_model(chat):
        if next(answers) == 2:
            server.models.clear()
        return "A red square"

    server.answer = answer_then_remove_model

    run = caption(tmp_path, "--jobs", 1)

    assert run.code == 1
    assert len(list(tmp_path.glob("*.txt"))) == 2
    assert f"{server.url} taken out of rotation: Ollama answered 404: model 'llava:13b' not found" in run.err
    assert "stopped: no Ollama server left to ask; 4 images left for a rerun" in run.err


@pytest.mark.parametrize("seed", range(6))
def test_ctrl_c_at_any_moment_leaves_only_whole_captions_and_a_rerun_finishes(
    tmp_path, make_server, spawn, caption, seed
):
    chance = random.Random(seed)
    expected = distinct_pictures(tmp_path, 16)
    server = make_server(slots=2, latency=0.05)
    process = spawn(tmp_path, "--host", server.url, "--jobs", 3, stdout=subprocess.DEVNULL)
    # Somewhere in the run, never after its end: after 1 to 8 of the 16 requests have come.
    arrived = chance.randint(1, 8)
    wait_until(lambda: len(server.chats) >= arrived)
    time.sleep(chance.uniform(0.0, 0.05))
    process.send_signal(signal.SIGINT)
    if seed % 2:  # and sometimes a second Ctrl-C, soon after
        time.sleep(chance.uniform(0.0, 0.2))
        process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)

    assert process.returncode == -signal.SIGINT, err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []
    written = [path for path in expected if path.exists()]
    assert len(written) < len(expected)
    assert all(path.read_text() == expected[path] for path in written)  # whole captions only

    server.chats.clear()
    assert caption(tmp_path, host=server.url).code == 0  # the rerun: in this process, which is cheaper
    assert len(server.chats) == len(expected) - len(written)
    assert {path: path.read_text() for path in expected} == expected


def test_a_caption_name_too_long_for_the_file_system_fails_that_image_before_any_request(
    tmp_path, caption, server
):
    picture(tmp_path / ("x" * 245 + ".jpg"), size=(64, 48))  # legal: 249 bytes
    picture(tmp_path / "short.jpg", size=(65, 48))

    run = caption(tmp_path, "--ext", ".caption-of-this-image")

    assert run.code == 1
    assert "FAILED " + "x" * 245 + ".jpg: its caption's name would be too long for the file system" in run.err
    assert [chat.picture().width for chat in server.chats] == [65]  # no request wasted on it
    assert (tmp_path / "short.caption-of-this-image").exists()
    assert leftovers(tmp_path) == []


def test_a_disk_that_fills_up_ends_the_run_at_the_first_failed_write(small_disk, caption, server):
    for name in "abcde":
        picture(small_disk / f"{name}.png", size=(40 + ord(name), 32))
    (small_disk / "e.txt").write_text("my own tags")
    answers = itertools.count(1)

    def answer_then_fill_the_disk(chat):
        if next(answers) == 1:
            fill_disk(small_disk)
        return "A red square"

    server.answer = answer_then_fill_the_disk

    run = caption(small_disk, "--jobs", 1)

    assert run.code == 1
    assert "FAILED a.png: cannot write a.txt: No space left on device" in run.err
    assert "stopped: No space left on device" not in run.err  # it names what failed
    # The first write failed; at most the next image was on its way, and its write failed too.
    assert len(server.chats) <= 2
    left = 4 - run.err.count("] FAILED ")
    assert (
        f"\nstopped: cannot write a.txt: No space left on device; {left} images left for a rerun\n" in run.err
    )
    assert (small_disk / "e.txt").read_text() == "my own tags"
    assert sorted(path.name for path in small_disk.glob("*.txt")) == ["e.txt"]
    assert leftovers(small_disk) == []


def test_a_full_disk_stops_the_run_before_any_request(small_disk, caption, server):
    picture(small_disk / "a.png")
    fill_disk(small_disk)

    run = caption(small_disk)

    assert run.code == 2
    assert f"error: cannot write in {small_disk}: No space left on device" in run.err
    assert server.chats == []


def test_a_read_only_folder_stops_before_any_request(small_disk, caption, server):
    picture(small_disk / "a.png")
    (small_disk / "a.txt").write_text("my own tags")
    picture(small_disk / "b.png")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    run = caption(small_disk, "--existing", "prepend")

    assert run.code == 2
    assert f"error: cannot write in {small_disk}: Read-only file system" in run.err
    assert server.chats == []
    assert (small_disk / "a.txt").read_text() == "my own tags"


def hostile_folder(folder: Path) -> None:
    palette = Image.new("P", (60, 40), 1)
    palette.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("LA", (60, 40), (90, 128)).save(folder / "grey-alpha.png")
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("lime", "red")]
    frames[0].save(folder / "moving.png", save_all=True, append_images=frames[1:])  # APNG
    Image.new("RGB", (20000, 300), "navy").save(folder / "panorama.jpg")
    whole = picture(folder / "whole.png", size=(300, 200)).read_bytes()
    (folder / "half.png").write_bytes(whole[: len(whole) // 2])
    (folder / "image.gif").write_bytes(b"GIF89a but nothing else")
    picture(folder / "two words é.jpg")
    picture(folder / "line\nbreak.jpg")
    picture(folder / "-rf.jpg")
    os.symlink(folder / "whole.png", folder / "link.png")
    os.symlink(folder / "gone.png", folder / "vanished.png")  # listed, then not there to read


def test_hostile_files_are_each_captioned_or_failed_with_a_reason(tmp_path, caption, server):
    hostile_folder(tmp_path)

    run = caption(tmp_path)

    assert run.code == 1
    assert "Traceback" not in run.err
    captioned = sorted(path.name for path in tmp_path.glob("*.txt"))
    assert captioned == sorted(
        [
            "-rf.txt",
            "grey-alpha.txt",
            "line\nbreak.txt",
            "link.txt",
            "moving.txt",
            "palette.txt",
            "panorama.txt",
            "two words é.txt",
            "whole.txt",
        ]
    )
    failures = [line for line in run.err.splitlines() if line.startswith("  failed ")]
    assert failures[0].startswith("  failed half.png: cannot decode: ")
    assert failures[1:] == [
        "  failed image.gif: not an image (or a format Pillow cannot read)",
        "  failed vanished.png: cannot read: No such file or directory",
    ]
    # The report stays one line per image, the newline in the name shown as \n.
    assert re.search(r"^\[\d+/\d+\] line\\nbreak\.jpg \d+\.\ds, ETA ", run.err, re.MULTILINE)
    sent = {chat.picture().size for chat in server.chats}
    assert (1344, 32) in sent  # the panorama, shrunk, padded to the 32 px vision encoders need
    assert all(chat.picture().format == "JPEG" or chat.picture().format == "PNG" for chat in server.chats)


def test_caption_files_without_an_image_are_reported_and_left_alone(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    (tmp_path / "deleted-photo.txt").write_text("a caption whose image is gone")

    run = caption(tmp_path)
    (tmp_path / "renamed-photo.txt").write_text("another caption whose image is gone")
    rerun = caption(tmp_path)

    assert run.code == 0
    assert "note: 1 caption file has no image (left untouched): deleted-photo.txt" in run.err
    assert "note: 2 caption files have no image (left untouched): deleted-photo.txt, renamed-photo.txt" in (
        rerun.err
    )
    assert (tmp_path / "deleted-photo.txt").read_text() == "a caption whose image is gone"
