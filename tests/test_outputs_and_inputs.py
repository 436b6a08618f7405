"""What the run writes besides captions (--review, --failed-list, --jsonl, a dry run's list), and what
it reads besides images (--only lists, prompt files, the folders given, PNG metadata)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    Run,
    captioner,
    distinct_pictures,
    fill_disk,
    leftovers,
    picture,
)
from PIL import Image, PngImagePlugin

# --- outputs: a regular file or nothing ---------------------------------------------------------

OUTPUT_OPTIONS = ("--review", "--failed-list", "--jsonl")


def make_node(kind: str, path: Path) -> str:
    """Put something that is not a regular file at path (never under /dev: a run that replaced
    it must not destroy a real device); what the refusal calls it."""
    if kind == "device":
        try:  # the numbers of /dev/full
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        except (PermissionError, AttributeError):
            pytest.skip("device nodes cannot be made here")
        return "a device"
    if kind == "named pipe":
        os.mkfifo(path)
        return "a named pipe"
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as server:
            # A relative name: a socket's path has a limit of 108 bytes, which tmp_path exceeds.
            here = os.getcwd()
            os.chdir(path.parent)
            try:
                server.bind(path.name)
            finally:
                os.chdir(here)
        return "a socket"
    if kind == "link to a file":
        path.with_name("real-file").write_text("the file the link points to")
        path.symlink_to("real-file")
        return "a symbolic link"
    if kind == "link to stdout":  # what /dev/stdout is on Linux
        path.symlink_to("/proc/self/fd/1")
        return "a symbolic link"
    raise ValueError(kind)


def kind_of(path: Path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("kind", ["device", "named pipe", "socket", "link to a file", "link to stdout"])
@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_an_output_that_is_not_a_regular_file_is_refused_before_the_run(
    tmp_path, caption, server, option, kind
):
    picture(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a caption")  # something for the JSONL to hold
    node = tmp_path / "out"
    what = make_node(kind, node)
    before = kind_of(node)

    run = caption(tmp_path / "data", option, node, "--dry-run")

    assert run.code == 2
    assert run.err.startswith(f"error: {option}: {node} is {what}")
    assert run.err.count("\n") == 1
    assert kind_of(node) == before  # still what it was
    assert server.requests == []


# --- outputs that would overwrite an input ----------------------------------------------------


@pytest.mark.parametrize("option", ["--failed-list", "--review"])
@pytest.mark.parametrize("name", ["A.txt", "A.TXT", "a.txt"])
def test_an_output_named_like_a_caption_is_refused_whatever_the_case(tmp_path, caption, server, option, name):
    picture(tmp_path / "A.JPG")
    (tmp_path / "A.txt").write_text("a caption written by hand")

    run = caption(tmp_path, option, tmp_path / name, "--dry-run")

    assert run.code == 2
    assert f"error: {option}: {tmp_path / name} would overwrite the caption of A.JPG" in run.err
    assert (tmp_path / "A.txt").read_text() == "a caption written by hand"


@pytest.mark.parametrize("form", ["--prompt", "DIR PROMPT_FILE"])
def test_an_output_at_the_prompt_file_is_refused_however_it_is_spelt(tmp_path, caption, server, form):
    picture(tmp_path / "data" / "a.png")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe the picture.")
    (tmp_path / "sub").mkdir()
    spelt_otherwise = tmp_path / "sub" / ".." / "prompt.txt"
    given = ["--prompt", prompt] if form == "--prompt" else [prompt]

    run = caption(tmp_path / "data", *given, "--failed-list", spelt_otherwise)

    assert run.code == 2
    assert f"error: --failed-list: {spelt_otherwise} would overwrite the prompt file" in run.err
    assert prompt.read_text() == "Describe the picture."
    assert server.requests == []


def test_an_output_named_like_the_folder_prompt_is_refused(tmp_path, caption, server):
    picture(tmp_path / "a.png")
    (tmp_path / ".prompt").write_text("Describe this folder's picture.")

    run = caption(tmp_path, "--folder-prompt", ".prompt", "--review", tmp_path / ".prompt", "--dry-run")

    assert run.code == 2
    assert "would overwrite a folder's prompt file (--folder-prompt .prompt)" in run.err
    assert (tmp_path / ".prompt").read_text() == "Describe this folder's picture."


@pytest.mark.parametrize("name", [".llava-caption-ollama.lock", ".llava-caption-ollama.journal"])
def test_an_output_at_a_file_of_the_tools_own_is_refused(tmp_path, caption, server, name):
    picture(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("captioned already: the run sends nothing")

    run = caption(tmp_path, "--failed-list", tmp_path / name)

    assert run.code == 2
    assert f"error: --failed-list: {tmp_path / name} would overwrite a file of this tool's own" in run.err
    assert server.requests == []


# --- captions that would overwrite an input ---------------------------------------------------
# A caption is written over whatever has its name: a prompt or system prompt file named as an image's
# caption would become a caption, and the next run would send that as its prompt.


def prompt_or_system(which: str, path: Path, folder: Path) -> list:
    """The arguments that give path as the prompt file (either form) or as --system."""
    return {
        "--system": [folder, "--system", path],
        "--prompt": [folder, "--prompt", path],
        "DIR PROMPT_FILE": [folder, path],
    }[which]


@pytest.mark.parametrize("which", ["--system", "--prompt", "DIR PROMPT_FILE"])
def test_a_prompt_or_system_file_where_a_caption_goes_is_refused(tmp_path, caption, server, which):
    distinct_pictures(tmp_path, 1)
    given = tmp_path / "img000.txt"
    given.write_text("Describe the picture.", encoding="utf-8")

    run = caption(*prompt_or_system(which, given, tmp_path), "--existing", "overwrite")

    assert run.code == 2
    assert run.err.count("\n") == 1
    assert f"{given} is where the caption of img000.png goes" in run.err
    assert given.read_text(encoding="utf-8") == "Describe the picture."
    assert server.requests == []


@pytest.mark.parametrize("which", ["--system", "--prompt"])
def test_a_prompt_or_system_file_in_a_subfolder_is_refused_only_with_recursive(
    tmp_path, caption, server, which
):
    distinct_pictures(tmp_path / "sub", 1)
    given = tmp_path / "sub" / "IMG000.txt"  # whatever the case: macOS and Windows ignore it
    given.write_text("Describe the picture.", encoding="utf-8")

    alone = caption(*prompt_or_system(which, given, tmp_path), "--existing", "overwrite")
    recursive = caption(*prompt_or_system(which, given, tmp_path), "--existing", "overwrite", "-r")

    assert alone.code == 0, alone.err  # the subfolder is not captioned
    assert recursive.code == 2 and "is where the caption of img000.png goes" in recursive.err
    assert given.read_text(encoding="utf-8") == "Describe the picture."


def test_a_system_file_is_judged_by_the_caption_extension_of_the_run(tmp_path, caption, server):
    distinct_pictures(tmp_path, 1)
    system = tmp_path / "img000.caption"
    system.write_text("You are a helpful image captioner.", encoding="utf-8")

    with_txt = caption(tmp_path, "--system", system)
    with_caption = caption(tmp_path, "--system", system, "--ext", ".caption")

    assert with_txt.code == 0, with_txt.err
    assert with_caption.code == 2 and "is where the caption of img000.png goes" in with_caption.err
    assert system.read_text(encoding="utf-8") == "You are a helpful image captioner."


# --- --only lists -----------------------------------------------------------------------------


def test_a_nul_separated_list_as_find_print0_writes_it_is_read(tmp_path, caption, server):
    distinct_pictures(tmp_path / "data", 3)
    picture(tmp_path / "data" / "line\nbreak.png", size=(50, 32))
    picture(tmp_path / "data" / "# not a comment.png", size=(51, 32))
    names = ["data/img001.png", "data/line\nbreak.png", "./data/# not a comment.png"]
    only = tmp_path / "redo.list"
    only.write_bytes(b"".join(name.encode() + b"\0" for name in names))  # find -print0
    server.answer = lambda chat: "Redone"

    run = caption(tmp_path / "data", "--only", only)

    assert run.code == 0, run.err
    assert sorted(chat.picture().width for chat in server.chats) == [41, 50, 51]
    assert (tmp_path / "data" / "line\nbreak.txt").read_text() == "Redone"
    assert not (tmp_path / "data" / "img000.txt").exists()


@pytest.mark.parametrize("name", ["img000.png", "padded.bmp"])
def test_a_binary_file_given_as_a_list_is_refused_in_one_line(tmp_path, caption, server, name):
    distinct_pictures(tmp_path, 2)
    picture(tmp_path / "padded.bmp", size=(33, 32))  # rows padded with NULs: it ends with one

    run = caption(tmp_path, "--only", tmp_path / name)

    assert run.code == 2
    assert run.err.startswith(f"error: --only {tmp_path / name}: not a list of images")
    assert run.err.count("\n") == 1
    assert server.requests == []


# --- the folders given ------------------------------------------------------------------------


@contextmanager
def bound(source: Path, target: Path) -> Iterator[Path]:
    """source mounted again at target (mount --bind), where this system allows it."""
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_folder_given_twice_through_a_bind_mount_is_captioned_once(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path / "A", 2)
    with bound(tmp_path / "A", tmp_path / "B") as again:
        run = caption(tmp_path / "A", again)

    assert run.code == 0, run.err
    assert len(server.chats) == 2
    assert {path: path.read_text() for path in expected} == expected


def test_a_folder_given_twice_through_a_link_is_captioned_once(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path / "A", 2)
    (tmp_path / "B").symlink_to("A")

    run = caption(tmp_path / "A", tmp_path / "B")

    assert run.code == 0, run.err
    assert len(server.chats) == 2
    assert {path: path.read_text() for path in expected} == expected


def test_a_folder_whose_name_starts_with_a_dash_is_taken_after_double_dash(
    tmp_path, server, capsys, monkeypatch
):
    picture(tmp_path / "-dash" / "a.png")
    monkeypatch.chdir(tmp_path)

    code = captioner.main(["--host", server.url, "--", "-dash"])
    run = Run(code, *capsys.readouterr())

    assert run.code == 0, run.err
    assert (tmp_path / "-dash" / "a.txt").read_text() == "A PNG picture, 64x48 pixels."


# --- a dry run's list -------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_dry_run_whose_list_cannot_be_written_exits_1(tmp_path, spawn):
    distinct_pictures(tmp_path, 2)
    with open("/dev/full", "w") as full:  # written to, never replaced
        process = spawn(tmp_path, "--dry-run", stdout=full)
        _, err = process.communicate(timeout=20)

    assert process.returncode == 1
    assert "error: cannot write the list of images to stdout: No space left on device\n" in err
    assert "Traceback" not in err


def test_a_dry_run_read_by_head_ends_quietly(tmp_path, spawn):
    # More than a pipe holds (64 KiB on Linux): the run is still writing when the reader goes.
    for number in range(1200):
        (tmp_path / f"{number:04d}-{'a long name to fill the pipe quickly' * 2}.png").touch()
    process = spawn(tmp_path, "--dry-run")

    assert process.stdout.readline().startswith("0000-")
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=20)

    assert process.returncode == 0, err
    assert "error" not in err and "Traceback" not in err


# --- PNG metadata -----------------------------------------------------------------------------


def png_with_metadata(path: Path, width: int, **save) -> None:
    Image.new("RGB", (width, 48), "red").save(path, "PNG", **save)


def text_chunk(add: str, key: str, text: str, **more) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    getattr(info, add)(key, text, **more)
    return info


def test_pngs_with_metadata_over_a_megabyte_are_captioned_without_it(tmp_path, caption, server):
    workflow = "node, " * 400_000  # 2.4 MB, as a large ComfyUI workflow is
    png_with_metadata(
        tmp_path / "ztxt.png", 40, pnginfo=text_chunk("add_text", "workflow", workflow, zip=True)
    )
    png_with_metadata(
        tmp_path / "itxt.png", 41, pnginfo=text_chunk("add_itxt", "workflow", workflow, zip=True)
    )
    png_with_metadata(tmp_path / "iccp.png", 42, icc_profile=b"\0" * 2_000_000)
    png_with_metadata(tmp_path / "comment.png", 43, pnginfo=text_chunk("add_text", "comment", "c" * 70_000))

    run = caption(tmp_path, "--max-size", 38)  # each one shrunk, so re-encoded as a JPEG

    assert run.code == 0, run.err
    assert sorted(path.name for path in tmp_path.glob("*.txt")) == [
        "comment.txt",
        "iccp.txt",
        "itxt.txt",
        "ztxt.txt",
    ]
    for chat in server.chats:
        sent = chat.images[0]
        assert sent.startswith(b"\xff\xd8")
        assert b"ICC_PROFILE" not in sent and b"\xff\xfe" not in sent  # no profile, no comment
        assert len(sent) < 10_000


# --- temporary files --------------------------------------------------------------------------


def test_a_temporary_file_of_a_dead_process_is_removed_at_once_one_of_a_live_one_is_left(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    of_the_dead = f".llava-caption-ollama-{ended.pid}-0123456789ab.tmp"
    of_the_living = f".llava-caption-ollama-{os.getppid()}-ba9876543210.tmp"
    (tmp_path / of_the_dead).write_text("half a caption")  # written just now
    (tmp_path / of_the_living).write_text("a caption being written right now")

    assert caption(tmp_path, "--dry-run").code == 0
    assert sorted(leftovers(tmp_path)) == sorted([of_the_dead, of_the_living])  # a dry run only reads

    assert caption(tmp_path).code == 0
    assert leftovers(tmp_path) == [of_the_living]


# --- the review's thumbnails on a full disk ---------------------------------------------------


def test_a_full_disk_leaves_no_thumbnail_folder(tmp_path, caption, small_disk):
    expected = distinct_pictures(tmp_path / "data", 2)
    fill_disk(small_disk)
    page = small_disk / "review.html"

    run = caption(tmp_path / "data", "--review", page)

    assert run.code == 1
    assert {path: path.read_text() for path in expected} == expected
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]


# --- prompt files -----------------------------------------------------------------------------

CRLF_PROMPT = b"Describe the picture.\r\nOne line only.\rNo lists.\r\n"
LF_PROMPT = b"Describe the picture.\nOne line only.\nNo lists.\n"


@pytest.mark.parametrize("where", ["--prompt", "--folder-prompt"])
def test_a_prompt_file_with_windows_line_ends_is_sent_with_newlines(tmp_path, caption, server, where):
    picture(tmp_path / "data" / "a.png")
    if where == "--prompt":
        (tmp_path / "prompt.txt").write_bytes(CRLF_PROMPT)
        given = ["--prompt", tmp_path / "prompt.txt"]
    else:
        (tmp_path / "data" / ".prompt").write_bytes(CRLF_PROMPT)
        given = ["--folder-prompt", ".prompt"]

    run = caption(tmp_path / "data", *given)

    assert run.code == 0, run.err
    assert server.chats[0].prompt == "Describe the picture.\nOne line only.\nNo lists."


def test_a_prompt_file_saved_with_other_line_ends_is_the_same_pass(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path / "data", 2)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(LF_PROMPT)
    assert caption(tmp_path / "data", "--prompt", prompt, "--existing", "overwrite").code == 0
    prompt.write_bytes(CRLF_PROMPT)  # the same file, saved on Windows

    rerun = caption(tmp_path / "data", "--prompt", prompt, "--existing", "overwrite")

    assert rerun.code == 0, rerun.err
    assert len(server.chats) == 2  # nothing done twice
    assert {path: path.read_text() for path in expected} == expected


def test_a_prompt_keeps_its_text_as_read_for_passes_of_earlier_versions(tmp_path):
    (tmp_path / "prompt.txt").write_bytes(b"\xef\xbb\xbf" + CRLF_PROMPT)

    template = captioner.read_prompt(tmp_path / "prompt.txt")

    assert template.text == "Describe the picture.\nOne line only.\nNo lists."
    assert template.as_read == "Describe the picture.\r\nOne line only.\rNo lists."
    assert captioner.Template("{name}").as_read == "{name}"


@pytest.mark.parametrize(
    "content",
    [b"\0\0\0\n", "\u200b".encode(), "\ufeff\u200b\u2060 \u200c\n".encode(), b"\x1b\x7f\t"],
    ids=["NUL bytes", "a zero-width space", "format characters", "control characters"],
)
@pytest.mark.parametrize("which", ["--system", "--prompt"])
def test_a_prompt_or_system_file_with_nothing_visible_is_empty(tmp_path, caption, server, which, content):
    picture(tmp_path / "data" / "a.png")
    given = tmp_path / "given.txt"
    given.write_bytes(content)

    run = caption(*prompt_or_system(which, given, tmp_path / "data"))

    assert run.code == 2
    assert run.err.count("\n") == 1 and f"{given} is empty" in run.err
    assert server.requests == []


@pytest.mark.parametrize("existing", ["overwrite", "append"])
def test_a_caption_that_is_a_link_is_neither_sent_nor_joined_to(tmp_path, caption, server, existing):
    # A downloaded dataset's a.txt may point anywhere: {existing} would send the file it points to
    # to the server, and append would copy it into the caption.
    secret = tmp_path / "outside" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY MATERIAL")
    folder = tmp_path / "photos"
    picture(folder / "a.jpg", size=(64, 48))
    picture(folder / "b.jpg", size=(65, 48))
    (folder / "a.txt").symlink_to(secret)
    (folder / "b.txt").write_text("wooden, lake")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Refine these tags: {existing}")

    run = caption(folder, prompt, "--existing", existing)

    assert run.code == 1
    assert (
        "FAILED a.jpg: the existing a.txt is a link; a caption that is sent or joined to is read only"
        in run.err
    )
    assert [chat.picture().width for chat in server.chats] == [65]
    assert all("PRIVATE" not in chat.prompt for chat in server.chats)
    assert (folder / "a.txt").is_symlink() and secret.read_text() == "PRIVATE KEY MATERIAL"
    assert "wooden, lake" in server.chats[0].prompt


def test_an_existing_caption_too_long_for_a_prompt_is_not_sent(tmp_path, caption, server):
    folder = tmp_path / "photos"
    picture(folder / "a.jpg", size=(64, 48))
    (folder / "a.txt").write_text("tag, " * 60_000)  # 300,000 bytes: no caption a person writes
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Refine these tags: {existing}")

    run = caption(folder, prompt, "--existing", "overwrite")

    assert run.code == 1
    assert "FAILED a.jpg: the existing a.txt is longer than 262,144 bytes" in run.err
    assert server.chats == []
    # Joined to, not sent, it is no prompt's: an append pass adds its answer to it.
    assert caption(folder, "--existing", "append").code == 0
    assert (folder / "a.txt").read_text().startswith("tag, tag,") and len(server.chats) == 1
