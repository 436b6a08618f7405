"""--apply-edits: the review page's edits written back as a person's captions. Each edit is applied
only where the caption still holds the text the page showed; the file is hostile input (it comes from
a browser's downloads, and anyone may have written it); an applied edit is a person's, which no later
run of any pass touches. The page's side (editing, find & replace, the download) is tested in a
browser in test_review.py."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import JOURNAL, captioner, picture, run_script

OWN = ".llava-caption-ollama"


def dataset(folder: Path, captions: dict[str, str | None]) -> dict[str, bytes]:
    """Images named by their captions' stems (img0.txt -> img0.png), each caption written as
    given (None: none); every file below folder's parent, by path, as it now is."""
    for number, (name, text) in enumerate(captions.items()):
        picture(folder / (name.rsplit(".", 1)[0] + ".png"), size=(40 + number, 32))
        if text is not None:
            (folder / name).write_bytes(text.encode("utf-8"))
    return snapshot(folder.parent)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below root but the tool's own and the edits files the tests put in root, by path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(OWN) and not (p.parent == root and p.suffix == ".json")
    }


def edits_file(path: Path, edits: list, **head) -> Path:
    path.write_text(json.dumps({"llava-caption-edits": 1, **head, "edits": edits}), encoding="utf-8")
    return path


def edit(image: Path | str, shown: str, text: str, ext: str = ".txt") -> dict:
    return {"image": str(image), "ext": ext, "shown": shown, "text": text}


def apply(*args: object, **options):
    """--apply-edits in this process (a run of the script is the same main(), at 0.6 s of CPU a
    start); as a process of its own where a time limit must guard it."""
    return run_script(*args, **options) if options else here(*args)


def here(*args: object) -> subprocess.CompletedProcess:
    """The script's main() in this process, with what a run of it prints and its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = captioner.main([str(arg) for arg in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def changed(before: dict[str, bytes], after: dict[str, bytes]) -> dict[str, bytes | None]:
    return {
        rel: after.get(rel) for rel in sorted(set(before) | set(after)) if before.get(rel) != after.get(rel)
    }


# ---- Applied where the caption is what the page showed, and only there ----


def test_an_edit_is_written_byte_for_byte_and_nothing_else_changes(tmp_path):
    folder = tmp_path / "photos"
    before = dataset(folder, {"img0.txt": "a cat on a mat", "img1.txt": None, "img2.txt": "a dog\r\n"})
    person = (
        "a <b>cat</b>\r\non a mat\twith tabs, \u05e9\u05dc\u05d5\u05dd \u202eevil\u202c, \U0001f408 " * 100
    )
    file = edits_file(
        tmp_path / "caption-edits.json",
        [
            edit(folder / "img0.png", "a cat on a mat", person),
            edit(folder / "img1.png", "", "written where the model wrote nothing"),
            edit("photos/img2.png", "a dog", "a dog, by hand"),  # relative: to the edits file's folder
        ],
    )

    run = apply(folder, "--apply-edits", file)

    assert run.returncode == 0, run.stderr
    assert "applied 3 edits" in run.stderr
    assert "1 of them with line breaks, kept" in run.stderr
    assert changed(before, snapshot(tmp_path)) == {
        "photos/img0.txt": person.encode("utf-8"),
        "photos/img1.txt": b"written where the model wrote nothing",
        "photos/img2.txt": b"a dog, by hand",
    }
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [JOURNAL]  # no lock, no temp


def test_a_caption_changed_since_the_page_was_written_is_named_and_left_alone(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "changed by hand since", "img1.txt": "as the page showed it"})
    file = edits_file(
        tmp_path / "edits.json",
        [
            edit(folder / "img0.png", "as the page showed it", "the edit"),
            edit(folder / "img1.png", "as the page showed it", "the other edit"),
        ],
    )

    run = apply(folder, "--apply-edits", file)

    assert run.returncode == 1
    assert "changed since the page was written, left alone: img0.txt" in run.stderr
    assert "applied 1 edit\n" in run.stderr
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "changed by hand since"
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "the other edit"
    # A caption deleted since the page showed one has changed too: nothing is written in its place.
    (folder / "img1.txt").unlink()
    again = apply(
        folder, "--apply-edits", edits_file(tmp_path / "e2.json", [edit(folder / "img1.png", "x", "y")])
    )
    assert again.returncode == 1 and not (folder / "img1.txt").exists()


def test_applying_the_same_file_again_changes_nothing_and_says_so(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "old", "new")])
    assert apply(folder, "--apply-edits", file).returncode == 0
    journal = (folder / JOURNAL).read_bytes()

    again = apply(folder, "--apply-edits", file)

    assert again.returncode == 0, again.stderr
    assert "applied 0 edits" in again.stderr and "already on disk: 1 edit" in again.stderr
    assert (folder / JOURNAL).read_bytes() == journal


def test_a_dry_run_previews_and_writes_nothing(tmp_path):
    folder = tmp_path / "photos"
    before = dataset(folder, {"img0.txt": "old", "img1.txt": "changed"})
    file = edits_file(
        tmp_path / "edits.json",
        [edit(folder / "img0.png", "old", "new"), edit(folder / "img1.png", "shown", "new too")],
    )

    run = apply(folder, "--apply-edits", file, "--dry-run")

    assert run.returncode == 1  # as the run itself would end
    assert "  would apply img0.txt" in run.stderr and "would apply 1 edit" in run.stderr
    assert "changed since the page was written, left alone: img1.txt" in run.stderr
    assert changed(before, snapshot(tmp_path)) == {}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no journal, no lock


def test_a_folder_another_run_holds_is_not_written(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "old", "new")])
    with open(folder / f"{OWN}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = apply(folder, "--apply-edits", file)
    assert run.returncode == 2
    assert f"another run is captioning {folder}" in run.stderr
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "old"


def test_with_r_the_edits_of_subfolders_are_applied_and_without_it_refused(tmp_path):
    root = tmp_path / "root"
    dataset(root / "sub", {"img0.txt": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(root / "sub" / "img0.png", "old", "new")])

    without = apply(root, "--apply-edits", file)
    assert without.returncode == 1
    assert "its image is not in the folders given (it is below one: give -r)" in without.stderr

    run = apply("-r", root, "--apply-edits", file)
    assert run.returncode == 0, run.stderr
    assert (root / "sub" / "img0.txt").read_text(encoding="utf-8") == "new"
    assert (root / "sub" / JOURNAL).is_file()


def test_options_that_have_no_part_in_applying_edits_are_refused(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "old", "new")])
    for option in (["--model", "x"], ["--existing", "overwrite"], ["--review", tmp_path / "r.html"]):
        run = apply(folder, "--apply-edits", file, *option)
        assert run.returncode == 2
        assert (
            run.stderr
            == f"error: --apply-edits writes the edits and nothing else: {option[0]} has no part in it; leave it out\n"
        )
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "old"


def test_another_caption_extension_is_written_when_the_run_has_it(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.caption": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "old", "new", ext=".caption")])
    assert "is not a caption extension of this run (.txt)" in apply(folder, "--apply-edits", file).stderr
    run = apply(folder, "--apply-edits", file, "--ext", ".caption")
    assert run.returncode == 0, run.stderr
    assert (folder / "img0.caption").read_text(encoding="utf-8") == "new"


# ---- The edits file is hostile input ----


def test_each_hostile_edit_gets_one_line_and_nothing_is_written_outside_the_folders(tmp_path):
    folder = tmp_path / "photos"
    outside = tmp_path / "outside"
    dataset(folder, {"img0.txt": "zero", "img1.txt": "one", "twin.txt": "shared"})
    picture(folder / "twin.jpg")  # twin.png and twin.jpg would both write twin.txt
    picture(folder / ".hidden.png")
    dataset(outside, {"secret.txt": "not yours"})
    (folder / "linked").symlink_to(outside)  # a link inside the folder to a folder outside it
    (folder / "img0.npz").write_bytes(b"latents")
    (folder / "meta.json").write_text("{}")
    (folder / "img1.txt").unlink()
    (folder / "img1.txt").symlink_to(outside / "secret.txt")  # a caption that is a link
    before = snapshot(tmp_path)
    hostile = [
        edit(outside / "secret.png", "not yours", "overwritten"),  # 1: outside, absolute
        edit("photos/../outside/secret.png", "not yours", "overwritten"),  # 2: outside, relative
        edit(folder / "linked" / "secret.png", "not yours", "overwritten"),  # 3: outside by a link
        edit(folder / "img0.npz", "", "x"),  # 4: not an image
        edit(folder / "meta.json", "{}", "x"),  # 5
        edit(folder / "img0.txt", "zero", "x"),  # 6: a caption, not its image
        edit(folder / "img0.png", "zero", "x", ext=".png"),  # 7: an image by its extension
        edit(folder / "img0.png", "zero", "x", ext=".json"),  # 8
        edit(folder / "img0.png", "zero", "x", ext="/../../outside/secret.txt"),  # 9
        edit(folder / ".hidden.png", "", "x"),  # 10: hidden: no run captions it
        edit(folder / "twin.png", "shared", "x"),  # 11: its caption is another image's too
        edit(folder / "img1.png", "not yours", "x"),  # 12: a caption that is a link
        edit(folder / "gone.png", "", "x"),  # 13: no such image
        edit(folder / "img0.png", "zero", "x" * (1024 * 1024 + 1)),  # 14: an absurd size
        edit(folder / "img0.png", "zero", "a \x00 NUL"),  # 15: a control character
        edit(folder / "img0.png", "zero", "an escape \x1b[2J"),  # 16
        {"image": str(folder / "img0.png"), "ext": ".txt", "shown": "zero", "text": 5},  # 17: wrong types
        {"image": str(folder / "img0.png"), "ext": ".txt", "text": "no shown"},  # 18
        {"image": 7, "ext": ".txt", "shown": "zero", "text": "x"},  # 19
        "not an object",  # 20
        None,  # 21
        [1, 2],  # 22
        edit("", "zero", "x"),  # 23: no path
        edit(str(folder / "img0.png") + "\x00.png", "zero", "x"),  # 24: a NUL in the path
    ]
    text = json.dumps({"llava-caption-edits": 1, "edits": hostile})
    file = tmp_path / "edits.json"  # and 25: a lone surrogate, which JSON can spell and UTF-8 cannot hold
    file.write_text(text[:-2] + ', {"image": "x.png", "ext": ".txt", "shown": "", "text": "\\ud800"}]}')

    run = apply(folder, "--apply-edits", file)

    assert run.returncode == 1 and "Traceback" not in run.stderr
    refused = [line for line in run.stderr.splitlines() if line.startswith("  refused edit ")]
    numbers = [int(re.match(r"  refused edit (\d+)", line)[1]) for line in refused]
    assert numbers == list(range(1, len(hostile) + 2)), run.stderr
    said = {number: line for number, line in zip(numbers, refused)}
    assert "not in the folders given" in said[1] and "not in the folders given" in said[3]
    assert "is not an image the tool captions" in said[4] and "is not an image" in said[6]
    assert "not a caption extension of this run" in said[9]
    assert "shares twin.txt with twin.jpg" in said[11]
    assert "is a symbolic link" in said[12] and "is not there" in said[13]
    assert "1,048,577 bytes: longer than any caption" in said[14]
    assert "control character (U+0000)" in said[15] and "control character (U+001B)" in said[16]
    assert "its text is not text" in said[17] and "its shown is missing" in said[18]
    assert "not an edit" in said[20] and "lone surrogate" in said[25]
    assert f"refused: {len(hostile) + 1} edits" in run.stderr
    assert changed(before, snapshot(tmp_path)) == {}
    assert not (folder / JOURNAL).exists()


def test_a_caption_named_twice_is_applied_neither_time(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old", "img1.txt": "one"})
    file = edits_file(
        tmp_path / "edits.json",
        [
            edit(folder / "img0.png", "old", "first"),
            edit(folder / "." / "img0.png", "old", "second"),  # the same caption, spelt otherwise
            edit(folder / "img1.png", "one", "fine"),
        ],
    )
    run = apply(folder, "--apply-edits", file)
    assert run.returncode == 1
    assert "refused edit 1 (img0.txt): its caption is named 2 times in edits.json" in run.stderr
    assert "refused edit 2 (img0.txt)" in run.stderr
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "old"
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "fine"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b'{"llava-caption-edits": 1, "edits": [', "not JSON (Expecting value, line 1 column 38)"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON this tool can read"),
        (b"\xff\xfe{}", "it is not UTF-8 text"),
        (b"[]", 'it has no "llava-caption-edits" mark'),
        (b'{"edits": []}', 'it has no "llava-caption-edits" mark'),
        (b'{"llava-caption-edits": 2, "edits": []}', "is an edits file of version 2"),
        (b'{"llava-caption-edits": "1", "edits": []}', "its version is not a number"),
        (b'{"llava-caption-edits": 1, "edits": {}}', 'its "edits" is not a list'),
        (b"1" * 5000, "not JSON this tool can read"),  # more digits than Python reads as a number
    ],
)
def test_a_file_that_is_no_edits_file_is_refused_in_one_line(tmp_path, content, said):
    folder = tmp_path / "photos"
    before = dataset(folder, {"img0.txt": "old"})
    (tmp_path / "edits.json").write_bytes(content)
    run = apply(folder, "--apply-edits", tmp_path / "edits.json")
    assert run.returncode == 2
    assert said in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    assert changed(before, snapshot(tmp_path)) == {}


def test_an_absurdly_large_file_or_one_that_is_no_file_is_refused_without_reading_it(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as file:
        file.truncate(129 * 1024 * 1024)  # sparse: no disk spent
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)  # a read of it would wait for ever
    for path, said, guarded in [
        (huge, "is larger than 128 MiB", False),
        (pipe, "not a regular file", True),  # a process of its own, that the time limit ends
        (tmp_path / "missing.json", "No such file or directory", False),
        (folder, "Is a directory", False),
    ]:
        run = apply(folder, "--apply-edits", path, **({"timeout": 20} if guarded else {}))
        assert run.returncode == 2 and said in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr


def test_a_control_character_is_refused_but_line_breaks_and_tabs_are_kept():
    refused = captioner.edit_text_refused
    assert refused("two\nlines\r\nand a\ttab, \u202eRTL\u200d", "text") == ""
    assert "U+007F" in refused("delete \x7f", "text") and "U+0085" in refused("next line \x85", "text")


# ---- An applied edit is a person's: no later run of any pass touches it ----


@pytest.mark.parametrize("mode", ["skip", "overwrite", "append", "prepend"])
def test_no_later_pass_touches_an_applied_edit(tmp_path, make_server, mode):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": None, "img1.txt": None})
    server = make_server()
    assert here(folder, "--host", server.url).returncode == 0  # the tool writes both
    tool_text = (folder / "img0.txt").read_text(encoding="utf-8")
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", tool_text, "fixed by a person")])
    assert apply(folder, "--apply-edits", file).returncode == 0

    for fresh in ([], ["--fresh"]) if mode != "skip" else ([],):
        run = here(folder, "--existing", mode, *fresh, "--host", server.url)
        assert run.returncode == 0, run.stderr
        assert (folder / "img0.txt").read_bytes() == b"fixed by a person"
        if mode != "skip":
            assert "left alone 1 (edited since written)" in run.stderr


def test_only_and_overwrite_edits_still_redo_an_applied_edit(tmp_path, make_server):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "written by hand before", "img1.txt": "also by hand"})
    file = edits_file(
        tmp_path / "edits.json",
        [
            edit(folder / "img0.png", "written by hand before", "fixed on the page"),
            edit(folder / "img1.png", "also by hand", "fixed too"),
        ],
    )
    assert apply(folder, "--apply-edits", file).returncode == 0
    server = make_server()
    # A caption the tool never wrote is a person's once applied: an overwrite pass leaves it alone.
    assert "left alone 2" in here(folder, "--existing", "overwrite", "--host", server.url).stderr
    (tmp_path / "redo.txt").write_text("photos/img0.png\n", encoding="utf-8")

    redo = here(folder, "--only", tmp_path / "redo.txt", "--host", server.url)
    assert redo.returncode == 0, redo.stderr
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "A PNG picture, 40x32 pixels."
    again = here(folder, "--existing", "overwrite", "--overwrite-edits", "--host", server.url)
    assert again.returncode == 0, again.stderr
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "A PNG picture, 41x32 pixels."


def test_an_edit_that_empties_a_caption_leaves_it_to_the_next_run(tmp_path, make_server):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "a wrong caption"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "a wrong caption", "")])
    assert apply(folder, "--apply-edits", file).returncode == 0
    assert (folder / "img0.txt").read_bytes() == b""
    run = here(folder, "--host", make_server().url)
    assert run.returncode == 0 and "captioned 1" in run.stderr


# ---- A style's caption (--also) is edited and applied as the main caption is ----


def styled(chat) -> str:
    """Tags for the tags prompt, a description for the main one; each names its picture."""
    width = chat.picture().width
    return f"red, square, w{width}" if chat.prompt.startswith("List tags") else f"A picture {width} wide."


def test_a_styles_edit_is_applied_and_only_its_own_pass_leaves_it_alone(tmp_path, make_server):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": None, "img1.txt": None, "img1.tags": "tags by hand"})
    (tmp_path / "long.txt").write_text("Describe it.", encoding="utf-8")
    (tmp_path / "tags.txt").write_text("List tags.", encoding="utf-8")
    server = make_server(answer=styled)
    styles = ["--prompt", tmp_path / "long.txt", "--also", f"{tmp_path / 'tags.txt'}:.tags"]
    assert here(folder, *styles, "--host", server.url).returncode == 0
    before = snapshot(folder)
    assert before["img0.tags"] == b"red, square, w40" and before["img1.tags"] == b"tags by hand"
    person = "red, square,\tby hand\nsecond line, \u00e9t\u00e9 "
    edits = [
        edit(folder / "img0.png", "red, square, w40", person, ".tags"),  # the tool wrote it
        edit(folder / "img1.png", "tags by hand", "tags by hand, fixed", ".tags"),  # the tool never did
    ]
    file = edits_file(tmp_path / "edits.json", edits)

    # Which extensions are captions is said as the run said it: --also (its prompt is not read).
    refused = apply(folder, "--apply-edits", file)
    assert refused.returncode == 1 and "is not a caption extension of this run (.txt)" in refused.stderr
    (tmp_path / "tags.txt").unlink()
    run = apply(folder, "--also", f"{tmp_path / 'tags.txt'}:.tags", "--apply-edits", file)
    assert run.returncode == 0, run.stderr
    assert changed(before, snapshot(folder)) == {
        "img0.tags": person.encode("utf-8"),
        "img1.tags": b"tags by hand, fixed",
    }
    (tmp_path / "tags.txt").write_text("List tags.", encoding="utf-8")

    # The .tags pass leaves both alone, given with --also or alone (a .tags file the tool never
    # wrote is overwritten by an overwrite pass, unless a person's); the main pass is not confused.
    again = here(folder, *styles, "--existing", "overwrite", "--host", server.url)
    assert again.returncode == 0, again.stderr
    assert (
        "  .tags captions: captioned 0, skipped 0, left alone 2 (edited since written), failed 0"
        in again.stderr
    )
    assert "  .txt captions: captioned 2, skipped 0, failed 0" in again.stderr
    alone = here(
        folder,
        "--prompt",
        tmp_path / "tags.txt",
        "--ext",
        ".tags",
        "--existing",
        "overwrite",
        "--host",
        server.url,
    )
    assert alone.returncode == 0 and "left alone 2 (edited since written)" in alone.stderr
    main = here(
        folder, "--prompt", tmp_path / "long.txt", "--existing", "overwrite", "--fresh", "--host", server.url
    )
    assert main.returncode == 0 and "left alone" not in main.stderr and "captioned 2" in main.stderr
    assert (folder / "img0.tags").read_bytes() == person.encode("utf-8")
    assert (folder / "img1.tags").read_bytes() == b"tags by hand, fixed"

    # --only naming the style's caption file still redoes it.
    (tmp_path / "redo.txt").write_text("photos/img0.tags\n", encoding="utf-8")
    redo = here(folder, *styles, "--only", tmp_path / "redo.txt", "--host", server.url)
    assert redo.returncode == 0, redo.stderr
    assert (folder / "img0.tags").read_bytes() == b"red, square, w40"
    assert (folder / "img1.tags").read_bytes() == b"tags by hand, fixed"


def test_also_with_apply_edits_is_checked_as_a_run_checks_it(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "", "x", ".npz")])
    for also, said in (("t.txt:.txt", "is the extension of --ext"), ("t.txt:.npz", "would overwrite files")):
        run = apply(folder, "--also", also, "--apply-edits", file)
        assert run.returncode == 2 and said in run.stderr, run.stderr
    run = apply(folder, "--also", "t.txt:.tags", "--apply-edits", file)
    assert run.returncode == 1 and "is not a caption extension of this run (.txt .tags)" in run.stderr
    assert not (folder / "img0.npz").exists()


# ---- The JSONL (--jsonl), mended in the same run ----


def jsonl_rows(path: Path) -> dict[str, dict]:
    return {row["file_name"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_with_jsonl_each_edited_captions_row_says_what_its_file_says(tmp_path, make_server):
    """--apply-edits --jsonl: the row of each caption an edit names holds what the caption file
    holds once the edits are written: the edit where it was applied (a style's in its column),
    the file's own text where it changed since the page was written. Other rows are left as they
    were, and the next run with --jsonl finds nothing to mend: the JSONL says what it would."""
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": None, "img1.txt": None, "img2.txt": None})
    (tmp_path / "long.txt").write_text("Describe it.", encoding="utf-8")
    (tmp_path / "tags.txt").write_text("List tags.", encoding="utf-8")
    server = make_server(answer=styled)
    jsonl = folder / "metadata.jsonl"
    run = ["--prompt", tmp_path / "long.txt", "--also", f"{tmp_path / 'tags.txt'}:.tags", "--jsonl", jsonl]
    assert here(folder, *run, "--host", server.url).returncode == 0
    before = jsonl_rows(jsonl)
    (folder / "img1.txt").write_text("changed by hand", encoding="utf-8")
    edits = [
        edit(folder / "img0.png", before["img0.png"]["text"], "a person's caption"),
        edit(folder / "img0.png", before["img0.png"]["tags"], "a person's tags", ".tags"),
        edit(folder / "img1.png", before["img1.png"]["text"], "not applied"),
    ]
    file = edits_file(tmp_path / "edits.json", edits)

    applied = apply(
        folder, "--also", f"{tmp_path / 'tags.txt'}:.tags", "--jsonl", jsonl, "--apply-edits", file
    )

    assert applied.returncode == 1, applied.stderr  # one caption changed since the page
    after = jsonl_rows(jsonl)
    assert (after["img0.png"]["text"], after["img0.png"]["tags"]) == ("a person's caption", "a person's tags")
    assert after["img1.png"]["text"] == "changed by hand"
    assert after["img1.png"]["tags"] == before["img1.png"]["tags"]
    assert after["img2.png"] == before["img2.png"]
    mended = jsonl.read_bytes()
    assert here(folder, *run, "--host", server.url).returncode == 0
    assert jsonl.read_bytes() == mended


def test_with_jsonl_through_a_link_the_rows_a_run_keeps_are_mended_and_none_added(tmp_path, make_server):
    """The folder given is a link (the page's edits name the images by their real folder): each
    edited caption's row is the one a run through the link keeps, not a second row by the real path."""
    real = tmp_path / "real"
    dataset(real, {"img0.txt": None, "img1.txt": None})
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    jsonl = tmp_path / "metadata.jsonl"
    run = [link, "--jsonl", jsonl]
    assert here(*run, "--host", make_server().url).returncode == 0
    shown = (real / "img0.txt").read_text(encoding="utf-8")
    file = edits_file(tmp_path / "edits.json", [edit(real / "img0.png", shown, "a person's caption")])

    applied = apply(*run, "--apply-edits", file)

    assert applied.returncode == 0, applied.stderr
    rows = jsonl_rows(jsonl)
    assert sorted(rows) == ["link/img0.png", "link/img1.png"]
    assert rows["link/img0.png"]["text"] == "a person's caption"


def test_with_jsonl_a_dry_run_leaves_it_and_one_it_cannot_mend_is_refused(tmp_path):
    folder = tmp_path / "photos"
    dataset(folder, {"img0.txt": "old"})
    jsonl = folder / "metadata.jsonl"
    jsonl.write_text(json.dumps({"file_name": "img0.png", "text": "old"}) + "\n", encoding="utf-8")
    file = edits_file(tmp_path / "edits.json", [edit(folder / "img0.png", "old", "new")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    away = apply(folder, "--jsonl", elsewhere / "metadata.jsonl", "--apply-edits", file)
    new = apply(folder, "--jsonl", folder / "new.jsonl", "--apply-edits", file)
    itself = apply(tmp_path, "-r", "--jsonl", file, "--apply-edits", file)
    dry = apply(folder, "--jsonl", jsonl, "--apply-edits", file, "--dry-run")

    assert away.returncode == 2 and "--jsonl must be in " in away.stderr, away.stderr
    # A JSONL of the edited captions' rows alone would list only them.
    assert new.returncode == 2 and "new.jsonl does not exist; --apply-edits mends" in new.stderr, new.stderr
    assert not (folder / "new.jsonl").exists()
    assert itself.returncode == 2, itself.stderr
    assert itself.stderr == f"error: --jsonl and --apply-edits name the same file, {file}\n"
    assert dry.returncode == 0, dry.stderr
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "old"
    assert jsonl_rows(jsonl) == {"img0.png": {"file_name": "img0.png", "text": "old"}}
