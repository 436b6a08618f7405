"""Caption files: where they go, what they hold, and that nothing a user has is lost."""

from __future__ import annotations

import pytest
from conftest import leftovers, picture


def test_caption_is_one_stripped_line_beside_the_image_named_after_its_stem(tmp_path, caption, server):
    picture(tmp_path / "holiday.photo.JPG", size=(40, 32))
    server.answer = lambda chat: "  Un café à Paris,\n\n  warm light,  cobblestones \n"

    run = caption(tmp_path)

    assert run.code == 0
    assert (tmp_path / "holiday.photo.txt").read_text(
        encoding="utf-8"
    ) == "Un café à Paris, warm light, cobblestones"
    assert leftovers(tmp_path) == []


def test_a_rerun_sends_nothing_and_changes_nothing(tmp_path, caption, server):
    for name in "abc":
        picture(tmp_path / f"{name}.png")
    assert caption(tmp_path).code == 0
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.glob("*.txt")}

    run = caption(tmp_path)

    assert run.code == 0
    assert len(server.chats) == 3
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.glob("*.txt")} == before
    assert "captioned 0, skipped 3, failed 0" in run.err


def test_an_empty_or_blank_caption_file_does_not_count_as_captioned(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text(" \n")
    server.answer = lambda chat: "A red square"

    assert caption(tmp_path).code == 0
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "A red square"


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("skip", "my tags\n"),  # untouched
        ("overwrite", "A red square"),
        ("append", "my tags, A red square"),
        ("prepend", "A red square, my tags"),
    ],
)
def test_existing_captions(tmp_path, caption, server, mode, expected):
    picture(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("my tags\n")
    server.answer = lambda chat: "A red square"

    assert caption(tmp_path, "--existing", mode).code == 0
    assert (tmp_path / "a.txt").read_text() == expected


def test_a_failed_answer_leaves_the_existing_caption_alone(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("my tags")
    server.answer = lambda chat: " "

    assert caption(tmp_path, "--existing", "overwrite").code == 1
    assert (tmp_path / "a.txt").read_text() == "my tags"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", [".caption", "caption"])
def test_caption_extension(tmp_path, caption, ext):
    picture(tmp_path / "a.jpg")
    assert caption(tmp_path, "--ext", ext).code == 0
    assert (tmp_path / "a.caption").exists() and not (tmp_path / "a.txt").exists()


def test_an_image_extension_for_captions_is_refused(tmp_path, caption):
    original = picture(tmp_path / "a.png").read_bytes()
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--ext", ".PNG")
    assert run.code == 2
    assert "--ext .PNG would overwrite images" in run.err
    assert (tmp_path / "a.png").read_bytes() == original


def test_a_folder_where_the_caption_would_go_fails_that_image_before_any_request(tmp_path, caption, server):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    (tmp_path / "a.txt").mkdir()  # in the way, whatever our privileges

    for mode in ("skip", "overwrite"):
        run = caption(tmp_path, "--existing", mode)

        assert run.code == 1
        assert "FAILED a.jpg: cannot read the existing a.txt: Is a directory" in run.err
    assert [chat.picture().width for chat in server.chats] == [65, 65]  # a.jpg was never sent
    assert (tmp_path / "b.txt").exists() and (tmp_path / "a.txt").is_dir()
    assert leftovers(tmp_path) == []


def test_a_write_that_breaks_off_leaves_the_old_caption_whole_and_no_temporary_file(tmp_path, monkeypatch):
    from conftest import captioner

    caption_file = tmp_path / "a.txt"
    caption_file.write_text("my tags")
    seen = []
    real_fsync = captioner.os.fsync

    def fsync_then_break(descriptor):
        seen.extend(path.name for path in tmp_path.iterdir() if path.name != "a.txt")
        real_fsync(descriptor)
        raise KeyboardInterrupt  # Ctrl-C, or a crash, between writing and renaming

    monkeypatch.setattr(captioner.os, "fsync", fsync_then_break)
    with pytest.raises(KeyboardInterrupt):
        captioner.write_atomically(caption_file, "a new caption, whole or not at all")

    assert caption_file.read_text() == "my tags"
    assert len(seen) == 1 and seen[0].startswith(".llava-caption-ollama-")  # hidden, in the same folder
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]


def test_a_long_caption_name_still_gets_a_temporary_name_that_fits(tmp_path):
    from conftest import captioner

    long_name = tmp_path / ("\u732b" * 83 + ".txt")  # 253 bytes: the longest a name may be, nearly
    captioner.write_atomically(long_name, "a cat")
    assert long_name.read_text() == "a cat"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_a_caption_that_cannot_be_read_is_never_merged_into_or_overwritten(tmp_path, caption, server, mode):
    picture(tmp_path / "a.jpg", size=(64, 48))
    picture(tmp_path / "b.jpg", size=(65, 48))
    (tmp_path / "a.txt").write_bytes(b"caf\xe9, old tags")  # Latin-1, as another tool wrote it

    run = caption(tmp_path, "--existing", mode)

    assert run.code == 1
    assert "FAILED a.jpg: the existing a.txt is not UTF-8 text" in run.err
    assert (tmp_path / "a.txt").read_bytes() == b"caf\xe9, old tags"
    assert [chat.picture().width for chat in server.chats] == [65]


def test_the_journal_line_comes_before_the_caption(tmp_path, caption, server):
    # If the journal cannot be written, neither is the caption: a caption written without its
    # journal line would be appended to again by the rerun.
    picture(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("my tags")
    (tmp_path / ".llava-caption-ollama.journal").mkdir()  # in the way

    run = caption(tmp_path, "--existing", "append")

    assert run.code == 1
    assert "FAILED a.jpg: cannot write .llava-caption-ollama.journal: " in run.err
    assert (tmp_path / "a.txt").read_text() == "my tags"
