"""Lists of images a run takes or writes: --only (the review page's redo list) and --failed-list."""

from __future__ import annotations

from conftest import JOURNAL, by_width, distinct_pictures
from stand_in_ollama import Reply


def test_failed_list_names_the_failures_and_only_captions_exactly_them_again(tmp_path, caption, server):
    expected = distinct_pictures(tmp_path / "data", 4)
    server.answer = by_width({41: Reply(status=400, error="nope"), 43: Reply(status=400, error="nope")}, None)
    server.answer = lambda chat, first=server.answer: first(chat) or f"A picture {chat.picture().width} wide"
    failed = tmp_path / "failed.txt"

    run = caption(tmp_path / "data", "--failed-list", failed)

    assert run.code == 1
    lines = failed.read_text().splitlines()
    assert lines[0].startswith("# images that failed") and lines[1:] == ["data/img001.png", "data/img003.png"]

    server.answer = lambda chat: "Second look"
    again = caption(tmp_path / "data", "--only", failed, "--failed-list", failed)

    assert again.code == 0, again.err
    assert sorted(chat.picture().width for chat in server.chats[-2:]) == [41, 43]
    texts = {path.name: path.read_text() for path in expected}
    assert texts == {
        "img000.txt": "A picture 40 wide",
        "img001.txt": "Second look",
        "img002.txt": "A picture 42 wide",
        "img003.txt": "Second look",
    }
    assert failed.read_text().splitlines()[1:] == []  # nothing failed this time


def test_only_overwrites_captions_bypasses_the_journal_and_names_what_it_cannot_find(
    tmp_path, caption, server
):
    expected = distinct_pictures(tmp_path, 3)
    for path in expected:
        path.write_text("a caption the user wants redone")
    assert caption(tmp_path, "--existing", "overwrite").code == 0  # a pass the journal records
    assert (tmp_path / JOURNAL).exists()
    redo = tmp_path / "lists" / "redo.txt"
    redo.parent.mkdir()
    redo.write_text(f"# from the review page\n{tmp_path / 'img002.png'}\n../img000.png\n../gone.png\n")
    server.answer = lambda chat: "Redone"

    run = caption(tmp_path, "--only", redo, "--existing", "overwrite")

    assert run.code == 1  # gone.png is not there
    assert "FAILED gone.png: listed by --only, but not found in the folders given" in run.err
    assert (tmp_path / "img000.txt").read_text() == "Redone"
    assert (tmp_path / "img002.txt").read_text() == "Redone"
    assert (tmp_path / "img001.txt").read_text() == "A PNG picture, 41x32 pixels."
