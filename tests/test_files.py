"""Files that are not what their names say, names at the limits, and what a run leaves on disk."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import time

import pytest
from conftest import JOURNAL, closed_port_url, leftovers, picture, run_script

SUMMARY = "captioned {}, skipped {}, failed {}"
OLD_TEMPORARY = ".llava-caption-ollama-0123456789ab.tmp"
NEW_TEMPORARY = ".llava-caption-ollama-ba9876543210.tmp"


def default_caption(width: int, height: int = 48, kind: str = "JPEG") -> str:
    """What the stand-in's default answer becomes once cleaned up."""
    return f"A {kind} picture, {width}x{height} pixels."


def widths_sent(server) -> list:
    return sorted(chat.picture().width for chat in server.chats)


# --- only regular files are images or captions ------------------------------------------------


def test_a_named_pipe_named_like_an_image_fails_and_the_run_goes_on(tmp_path, server):
    os.mkfifo(tmp_path / "a.jpg")
    picture(tmp_path / "c.jpg", size=(65, 48))

    run = run_script(tmp_path, "--host", server.url, timeout=20)  # a hang fails, it does not block

    assert run.returncode == 1
    assert "FAILED a.jpg: not an image file but a named pipe\n" in run.stderr
    assert "  failed a.jpg: not an image file but a named pipe\n" in run.stderr
    assert SUMMARY.format(1, 0, 1) in run.stderr
    assert widths_sent(server) == [65]
    assert (tmp_path / "c.txt").read_text() == default_caption(65)
    assert not (tmp_path / "a.txt").exists()


def test_a_named_pipe_named_like_a_caption_is_never_read_and_its_image_never_sent(tmp_path, server):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    os.mkfifo(tmp_path / "b.txt")

    dry = run_script(tmp_path, "--dry-run", "--host", server.url, timeout=20)

    assert dry.returncode == 1  # the real run would fail b.jpg
    assert dry.stdout == "a.jpg\n"
    assert "FAILED b.jpg: cannot read the existing b.txt: not a regular file\n" in dry.stderr

    run = run_script(tmp_path, "--host", server.url, timeout=20)

    assert run.returncode == 1
    assert "FAILED b.jpg: cannot read the existing b.txt: not a regular file\n" in run.stderr
    assert SUMMARY.format(1, 0, 1) in run.stderr
    assert widths_sent(server) == [64]  # b.jpg never sent
    assert stat.S_ISFIFO(os.lstat(tmp_path / "b.txt").st_mode)  # left as it was
    assert leftovers(tmp_path) == []


def test_links_to_devices_fail_at_once_without_being_read(tmp_path, server, caption):
    (tmp_path / "x.jpg").symlink_to("/dev/zero")
    (tmp_path / "y.jpg").symlink_to("/dev/urandom")
    picture(tmp_path / "z.jpg", size=(66, 48))

    started = time.monotonic()
    run = caption(tmp_path)

    assert time.monotonic() - started < 10  # reading either would never end
    assert run.code == 1
    assert "FAILED x.jpg: not an image file but a device\n" in run.err
    assert "FAILED y.jpg: not an image file but a device\n" in run.err
    assert widths_sent(server) == [66]
    assert (tmp_path / "z.txt").read_text() == default_caption(66)
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "y.txt").exists()


# --- names at the limits ----------------------------------------------------------------------


def test_names_as_long_as_the_file_system_allows_are_captioned(tmp_path, caption, server):
    ascii_stem = "x" * 251  # 255 bytes with ".jpg", the longest legal name
    cjk_stem = "猫" * 83  # 249 bytes in UTF-8, 253 with ".jpg"
    picture(tmp_path / f"{ascii_stem}.jpg", size=(64, 48))
    picture(tmp_path / f"{cjk_stem}.jpg", size=(65, 48))

    run = caption(tmp_path)

    assert run.code == 0, run.err
    assert "Traceback" not in run.err
    assert (tmp_path / f"{ascii_stem}.txt").read_text(encoding="utf-8") == default_caption(64)
    assert (tmp_path / f"{cjk_stem}.txt").read_text(encoding="utf-8") == default_caption(65)
    assert leftovers(tmp_path) == []

    rerun = caption(tmp_path)

    assert rerun.code == 0
    assert len(server.chats) == 2  # nothing sent again
    assert SUMMARY.format(0, 2, 0) in rerun.err


def test_a_name_that_is_not_utf8_is_captioned_shown_escaped_and_kept_in_the_jsonl(tmp_path, caption, server):
    folder = tmp_path / "data"
    folder.mkdir()
    image = os.path.join(os.fsencode(folder), b"\xff\xfe.jpg")
    picture(folder / "ok.jpg", size=(64, 48))
    with open(image, "wb") as file:
        file.write(picture(tmp_path / "source.jpg", size=(65, 48)).read_bytes())
    jsonl = folder / "meta.jsonl"

    run = caption(folder, "--jsonl", jsonl)

    assert run.code == 0, run.err
    with open(os.path.join(os.fsencode(folder), b"\xff\xfe.txt"), "rb") as file:
        assert file.read() == default_caption(65).encode()
    assert "] \\xff\\xfe.jpg " in run.err  # its progress line
    assert "\udcff" not in run.err and "\ufffd" not in run.err
    lines = [json.loads(line) for line in jsonl.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8
    assert sorted((os.fsencode(entry["file_name"]), entry["text"]) for entry in lines) == [
        (b"ok.jpg", default_caption(64)),
        (b"\xff\xfe.jpg", default_caption(65)),
    ]

    # Captioned again: its line is replaced, not added to.
    server.answer = lambda chat: "A new caption"
    assert caption(folder, "--jsonl", jsonl, "--existing", "overwrite").code == 0
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert sorted((os.fsencode(entry["file_name"]), entry["text"]) for entry in lines) == [
        (b"ok.jpg", "A new caption"),
        (b"\xff\xfe.jpg", "A new caption"),
    ]


def test_a_name_that_is_not_utf8_reaches_the_prompt_as_replacement_characters(tmp_path, caption, server):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"cat\xff.jpg"), "wb") as file:
        file.write(picture(tmp_path / "source.jpg").read_bytes())
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe {name}.", encoding="utf-8")

    run = caption(folder, prompt)

    assert run.code == 0, run.err
    assert [chat.prompt for chat in server.chats] == ["Describe cat\ufffd."]
    assert os.path.exists(os.path.join(os.fsencode(folder), b"cat\xff.txt"))


def test_control_characters_in_names_are_shown_escaped_never_raw(tmp_path, caption, server):
    picture(tmp_path / "evil\x1b]0;owned\x07.jpg")
    (tmp_path / "bad\x1b[2J.png").write_bytes(b"not a picture")

    dry = caption(tmp_path, "--dry-run")
    run = caption(tmp_path)

    assert run.code == 1
    assert dry.out == "bad\\x1b[2J.png\nevil\\x1b]0;owned\\x07.jpg\n"
    assert "] evil\\x1b]0;owned\\x07.jpg " in run.err  # its progress line
    assert "FAILED bad\\x1b[2J.png: not an image" in run.err
    assert "  failed bad\\x1b[2J.png: not an image" in run.err
    for output in (dry.out, dry.err, run.out, run.err):
        assert "\x1b" not in output and "\x07" not in output
    assert (tmp_path / "evil\x1b]0;owned\x07.txt").exists()


# --- --ext ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, why",
    [
        (".1.jpg", "--ext .1.jpg would overwrite images"),
        (".npz", "--ext .npz would overwrite files a trainer keeps beside the images (.npz)"),
        (".JSONL", "--ext .JSONL would overwrite files a trainer keeps beside the images (.jsonl)"),
    ],
)
def test_a_caption_extension_that_would_overwrite_dataset_files_is_refused(
    tmp_path, caption, server, ext, why
):
    picture(tmp_path / "a.jpg")
    (tmp_path / "a.npz").write_bytes(b"latents")
    before = sorted(os.listdir(tmp_path))

    run = caption(tmp_path, "--ext", ext)

    assert run.code == 2
    assert run.err == f"error: {why}\n"
    assert server.requests == []
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "a.npz").read_bytes() == b"latents"


def test_an_unusual_caption_extension_is_used(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    assert caption(tmp_path, "--ext", ".caption").code == 0
    assert (tmp_path / "a.caption").read_text() == default_caption(64)
    assert not (tmp_path / "a.txt").exists()


# --- folders that cannot be listed ------------------------------------------------------------


LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None  # loaded before any fork


def without_file_permission_overrides() -> None:
    """In the child, before exec: root loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its
    bounding set, so a folder's permissions apply to it as to anyone (prctl PR_CAPBSET_DROP)."""
    if os.geteuid() == 0:
        for capability in (1, 2):
            if LIBC.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop a capability")


def test_a_subfolder_that_cannot_be_listed_is_named_and_the_rest_captioned(tmp_path, server, spawn):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "open" / "b.jpg", size=(65, 48))
    picture(tmp_path / "closed" / "c.jpg", size=(66, 48))
    (tmp_path / "closed").chmod(0)
    try:
        try:
            process = spawn(
                tmp_path, "-r", "--host", server.url, preexec_fn=without_file_permission_overrides
            )
        except subprocess.SubprocessError:
            pytest.skip("cannot give up root's right to read any folder here")
        err = process.communicate(timeout=20)[1]
    finally:
        (tmp_path / "closed").chmod(0o755)

    assert process.returncode == 1
    assert err.startswith("FAILED closed: cannot list it: Permission denied; its images are left out\n")
    assert "  left out closed: cannot list it: Permission denied; its images are left out\n" in err
    assert widths_sent(server) == [64, 65]
    assert (tmp_path / "a.txt").exists() and (tmp_path / "open" / "b.txt").exists()
    assert not (tmp_path / "closed" / "c.txt").exists()


def test_a_subfolder_whose_listing_breaks_off_midway_is_named_and_the_run_exits_1(
    tmp_path, caption, server, monkeypatch
):
    """A disk or network share that fails in the middle of a listing (EIO): the images listed
    before the error are left out with the rest, and the run is no success. Unlike a folder
    closed to the run, this needs no capability dropped."""
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "failing" / "b.jpg", size=(65, 48))
    picture(tmp_path / "failing" / "c.jpg", size=(66, 48))
    real_scandir = os.scandir

    class BreaksOff:
        def __init__(self, path):
            self.entries = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.entries.close()

        def __iter__(self):
            yield next(self.entries)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def scandir(path="."):
        return BreaksOff(path) if os.path.basename(path) == "failing" else real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    run = caption(tmp_path, "-r")

    assert run.code == 1
    assert "FAILED failing: cannot list it: Input/output error; its images are left out" in run.err
    assert widths_sent(server) == [64]
    assert not (tmp_path / "failing" / "b.txt").exists() and not (tmp_path / "failing" / "c.txt").exists()


# --- what a run leaves behind -----------------------------------------------------------------


def test_temporary_files_a_killed_run_left_are_removed_by_the_next_real_run_only(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    (tmp_path / OLD_TEMPORARY).write_text("half a caption")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / OLD_TEMPORARY, (two_hours_ago, two_hours_ago))
    (tmp_path / NEW_TEMPORARY).write_text("a caption being written right now")

    assert caption(tmp_path, "--dry-run").code == 0
    assert sorted(leftovers(tmp_path)) == [OLD_TEMPORARY, NEW_TEMPORARY]

    assert caption(tmp_path).code == 0
    assert leftovers(tmp_path) == [NEW_TEMPORARY]  # another run's, perhaps: left alone
    assert (tmp_path / "a.txt").exists()


def test_a_caption_file_gets_the_mode_of_any_file_the_user_creates(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    previous = os.umask(0o022)
    try:
        run = caption(tmp_path)
    finally:
        os.umask(previous)

    assert run.code == 0
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_folder_with_nothing_left_to_caption_needs_no_server(tmp_path, caption):
    for name in "ab":
        picture(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.txt").write_text("my caption")

    started = time.monotonic()
    run = caption(tmp_path, host=closed_port_url())

    assert time.monotonic() - started < 0.5
    assert run.code == 0, run.err
    assert SUMMARY.format(0, 2, 0) in run.err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [JOURNAL])


def test_a_folder_with_nothing_to_send_but_a_failure_exits_1_without_a_server(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "a.png")  # both would share a.txt
    picture(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("my caption")

    started = time.monotonic()
    run = caption(tmp_path, host=closed_port_url())

    assert time.monotonic() - started < 0.5
    assert run.code == 1, run.err
    assert "FAILED a.jpg: shares a.txt with a.png; rename one of them\n" in run.err
    assert SUMMARY.format(0, 1, 2) in run.err
    assert not (tmp_path / "a.txt").exists()
