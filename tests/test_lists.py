"""Lists of images a run takes or writes: --only (the review page's redo list) and --failed-list."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import (
    JOURNAL,
    SCRIPT,
    as_from_a_terminal,
    by_width,
    child_environment,
    distinct_pictures,
    picture,
)
from stand_in_ollama import Reply

DATA = Path(__file__).resolve().parent / "data" / "journal-47ddee3"


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


def test_a_redo_by_one_list_that_ends_early_keeps_what_it_did_not_reach(tmp_path, caption, server):
    """`--only F --failed-list F`, a redo loop by one list: a run that ends before the end of F
    (its first images failing alike, or --limit) keeps in F the images it did not reach, beside
    those that failed, and drops only those it captioned."""
    distinct_pictures(tmp_path / "data", 6)
    failed = tmp_path / "failed.txt"
    failed.write_text("".join(f"data/img00{index}.png\n" for index in range(6)))
    server.answer = lambda chat: ""  # the run ends after its second image fails alike

    stopped = caption(tmp_path / "data", "--jobs", 1, "--only", failed, "--failed-list", failed)

    assert stopped.code == 1 and "4 images left for a rerun" in stopped.err
    assert failed.read_text().splitlines()[1:] == [f"data/img00{index}.png" for index in range(6)]

    server.answer = lambda chat: "Second look"
    limited = caption(tmp_path / "data", "--only", failed, "--failed-list", failed, "--limit", 2)

    assert limited.code == 0, limited.err
    assert failed.read_text().splitlines()[1:] == [f"data/img00{index}.png" for index in range(2, 6)]
    assert caption(tmp_path / "data", "--only", failed, "--failed-list", failed).code == 0
    assert failed.read_text().splitlines()[1:] == []
    assert [path.read_text() for path in sorted((tmp_path / "data").glob("*.txt"))] == ["Second look"] * 6


def test_a_redo_by_one_list_with_styles_keeps_only_the_styles_it_did_not_write(tmp_path, caption, server):
    """With --also, a run that ends between an image's styles (here --max-cost, after one
    answer) keeps in the list that image's other style by its caption file, not the image,
    which would ask (and pay) again for the caption it wrote; images it did not reach stay as
    they were listed."""
    data = tmp_path / "data"
    distinct_pictures(data, 3)
    tags = tmp_path / "tags.txt"
    tags.write_text("List tags.")
    failed = tmp_path / "failed.txt"
    failed.write_text("".join(f"data/img00{index}.png\n" for index in range(3)))
    styles = ["--also", f"{tags}:.tags", "--only", failed, "--failed-list", failed, "--jobs", 1]

    stopped = caption(data, *styles, "--price", "1000/1000", "--max-cost", 1)

    assert stopped.code == 1 and "5 captions left for a rerun" in stopped.err, stopped.err
    assert sorted(path.name for path in data.glob("*.t*")) == ["img000.txt"]
    assert failed.read_text().splitlines()[1:] == ["data/img000.tags", "data/img001.png", "data/img002.png"]
    sent = len(server.chats)
    assert caption(data, *styles).code == 0
    assert len(server.chats) - sent == 5
    assert failed.read_text().splitlines()[1:] == []


def test_a_list_kept_in_a_linked_folder_names_what_it_kept_as_a_later_run_reads_it(tmp_path, caption, server):
    """The folder of the list and images reached by a link to a folder of another depth, given
    by absolute paths: the entries a run ends before are written so that --only reads them back
    as the same images, not as names beside the link's target's parent."""
    real = tmp_path / "disk" / "work"
    distinct_pictures(real / "data", 3)
    work = tmp_path / "work"
    work.symlink_to(real)
    failed = work / "failed.txt"
    failed.write_text("".join(f"data/img00{index}.png\n" for index in range(3)))

    limited = caption(work / "data", "--only", failed, "--failed-list", failed, "--limit", 1)

    assert limited.code == 0, limited.err
    assert failed.read_text().startswith("# images that failed or were not reached, ")
    assert failed.read_text().splitlines()[1:] == ["data/img001.png", "data/img002.png"]
    rest = caption(work / "data", "--only", failed, "--failed-list", failed)
    assert rest.code == 0 and "not found" not in rest.err, rest.err
    assert len(list((real / "data").glob("*.txt"))) == 3


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


def review_data(page) -> dict:
    """The data a review page carries, as its script reads it."""
    html = page.read_text(encoding="utf-8")
    start = html.index('<script type="application/json" id="review-data">') + len(
        '<script type="application/json" id="review-data">'
    )
    return json.loads(html[start : html.index("</script>", start)])


def test_the_review_page_covers_images_left_past_the_limit(tmp_path, caption):
    distinct_pictures(tmp_path / "data", 5)
    page = tmp_path / "review.html"

    run = caption(tmp_path / "data", "--limit", 2, "--review", page)

    assert run.code == 0, run.err
    statuses = sorted(image["status"] for image in review_data(page)["images"])
    assert statuses == ["captioned", "captioned", "not_attempted", "not_attempted", "not_attempted"]


def test_thumbnails_that_cannot_be_written_do_not_stop_the_run(tmp_path, caption):
    expected = distinct_pictures(tmp_path / "data", 3)
    page = tmp_path / "review.html"
    (tmp_path / ".review.html-thumbnails").write_text("a file where the folder would go")

    run = caption(tmp_path / "data", "--review", page)

    assert run.code == 1
    assert all(path.exists() for path in expected)
    assert "error: cannot write the review's thumbnails" in run.err
    assert [image["thumb"] for image in review_data(page)["images"]] == [None, None, None]


def test_a_missing_page_template_stops_the_run_before_anything_is_sent(tmp_path, server):
    alone = tmp_path / "tool"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    shutil.copy(SCRIPT.parent / "prompt.txt", alone)
    picture(tmp_path / "data" / "a.png")
    with as_from_a_terminal():
        run = subprocess.run(
            [
                sys.executable,
                str(alone / SCRIPT.name),
                str(tmp_path / "data"),
                "--review",
                str(tmp_path / "r.html"),
            ]
            + ["--host", server.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=child_environment(None),
        )
    assert run.returncode == 2
    assert "review-template.html" in run.stderr
    assert server.chats == []


def test_outputs_that_would_overwrite_a_caption_or_each_other_are_refused(tmp_path, caption, server):
    picture(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("precious caption")
    for args in (
        ["--failed-list", tmp_path / "img.txt"],
        ["--review", tmp_path / "x.html", "--failed-list", tmp_path / "x.html"],
    ):
        run = caption(tmp_path, *args, "--dry-run")
        assert run.code == 2
    assert (tmp_path / "img.txt").read_text() == "precious caption"
    assert server.requests == []


def test_a_redo_with_only_is_not_undone_by_a_rerun_of_its_pass(tmp_path, caption, server):
    distinct_pictures(tmp_path, 2)
    assert caption(tmp_path, "--existing", "overwrite").code == 0
    redo = tmp_path / "redo.txt"
    redo.write_text("img001.png\n")
    server.answer = lambda chat: "Redone"
    assert caption(tmp_path, "--only", redo, "--existing", "overwrite").code == 0

    assert caption(tmp_path, "--existing", "overwrite").code == 0  # the same pass again: nothing to do

    assert (tmp_path / "img001.txt").read_text() == "Redone"
    assert len(server.chats) == 3


def test_lists_keep_names_as_they_are(tmp_path, caption, server):
    picture(tmp_path / " leading space.png", size=(40, 32))
    picture(tmp_path / "line\nbreak.png", size=(41, 32))
    server.answer = lambda chat: Reply(status=400, error="nope")
    failed = tmp_path / "failed.txt"

    assert caption(tmp_path, "--failed-list", failed).code == 1

    lines = failed.read_text().splitlines()
    assert " leading space.png" in lines
    assert "# not listed, as its name cannot be one line: 'line\\nbreak.png'" in lines
    server.answer = lambda chat: "Fine now"
    assert caption(tmp_path, "--only", failed).code == 0
    assert (tmp_path / " leading space.txt").read_text() == "Fine now"


def test_a_journal_written_by_an_earlier_version_still_says_what_is_done(tmp_path, caption, server):
    """The earliest journals wrote [name, caption digest], without the prompt's digest: the
    journal of 47ddee3 checked in (tests/data), its lines cut so."""
    expected = distinct_pictures(tmp_path, 3)
    for path, answer in list(expected.items())[:2]:
        path.write_text(f"old, tags, {answer}", encoding="utf-8")
    list(expected)[2].write_text("old, tags", encoding="utf-8")
    header, *lines = (DATA / "folder.journal").read_text().splitlines()
    old_lines = [json.dumps(json.loads(line)[:2]) for line in lines if line]
    (tmp_path / JOURNAL).write_text("\n".join([header, *old_lines]) + "\n")

    rerun = caption(tmp_path, DATA / "prompt.txt", "--existing", "append")

    assert rerun.code == 0, rerun.err
    assert "skipped 2" in rerun.err
    assert len(server.chats) == 1  # nothing appended twice
    assert {path: path.read_text() for path in expected} == {
        path: f"old, tags, {answer}" for path, answer in expected.items()
    }


def test_only_a_line_starting_with_hash_and_space_is_a_comment(tmp_path, caption, server):
    picture(tmp_path / "#1.png", size=(40, 32))
    picture(tmp_path / "#2.png", size=(41, 32))
    redo = tmp_path / "redo.list"  # beside the images, so that a name is the whole line
    redo.write_text("# the images to caption again\n#1.png\n")

    run = caption(tmp_path, "--only", redo)

    assert run.code == 0, run.err
    assert [chat.picture().width for chat in server.chats] == [40]
    assert (tmp_path / "#1.txt").exists() and not (tmp_path / "#2.txt").exists()


def test_a_list_saved_with_windows_line_ends_names_its_images(tmp_path, caption, server):
    distinct_pictures(tmp_path / "data", 3)
    redo = tmp_path / "redo.txt"
    redo.write_bytes(b"# from Notepad\r\ndata/img000.png\r\ndata/img002.png\r\n")

    run = caption(tmp_path / "data", "--only", redo)

    assert run.code == 0, run.err
    assert sorted(chat.picture().width for chat in server.chats) == [40, 42]
