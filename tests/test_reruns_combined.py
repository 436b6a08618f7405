"""Reruns where two features meet: a redo inside an append pass, the two ways of naming several
folders, a model learnt from the server, captions edited by hand, blank captions, names from
"." and "..", and journals written by an earlier version. Each is a sequence of ordinary runs
that once doubled a caption or destroyed one (issue 17, items 1-7)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import distinct_pictures, picture
from stand_in_ollama import VISION_MODEL

DATA = Path(__file__).resolve().parent / "data" / "journal-47ddee3"
JOURNAL = ".llava-caption-ollama.journal"
ANSWER = "A PNG picture"


def not_yet(item: int) -> pytest.MarkDecorator:
    return pytest.mark.xfail(
        strict=True, reason=f"issue 17 item {item}: not fixed yet"
    )  # every default answer of the stand-in starts so


def with_tags(folder: Path, count: int, tags: str = "old, tags") -> dict:
    """count pictures with hand-written tags beside them; {caption: the stand-in's answer for it}."""
    expected = distinct_pictures(folder, count)
    for path in expected:
        path.write_text(tags, encoding="utf-8")
    return expected


def answers_in(path: Path) -> int:
    return path.read_text(encoding="utf-8").count(ANSWER)


def redo_list(folder: Path, *images: Path) -> Path:
    listing = folder.parent / f"{folder.name}-redo.txt"
    listing.write_text("".join(f"{image}\n" for image in images), encoding="utf-8")
    return listing


# --- 1 and 4: a redo inside an append pass --------------------------------------------


def test_a_redo_inside_an_unfinished_append_pass_replaces_its_answer_and_keeps_the_tags(
    tmp_path, caption, server
):
    folder = tmp_path / "set"
    expected = with_tags(folder, 5)
    assert caption(folder, "--existing", "append", "--limit", 3).code == 0  # two are left
    redone = next(path for path in expected if answers_in(path))

    # The review page's redo list, run as the README says: without --existing.
    redo = caption(folder, "--only", redo_list(folder, redone.with_suffix(".png")))
    again = caption(folder, "--existing", "append")

    assert redo.code == 0 and again.code == 0, redo.err + again.err
    for path, answer in expected.items():
        assert path.read_text(encoding="utf-8") == f"old, tags, {answer}"


def test_only_with_append_replaces_this_pass_answer_instead_of_adding_a_second(tmp_path, caption, server):
    folder = tmp_path / "set"
    expected = with_tags(folder, 2)
    assert caption(folder, "--existing", "append").code == 0
    bad = next(iter(expected))

    redo = caption(folder, "--existing", "append", "--only", redo_list(folder, bad.with_suffix(".png")))

    assert redo.code == 0, redo.err
    assert bad.read_text(encoding="utf-8") == f"old, tags, {expected[bad]}"
    assert len(server.chats) == 3


# --- 2: the same pass, however the folders were named ------------------------------------


def test_a_recursive_pass_resumed_by_naming_the_subfolders_adds_nothing_twice(tmp_path, caption, server):
    root = tmp_path / "root"
    expected = {**with_tags(root / "a", 3), **with_tags(root / "b", 3)}
    assert caption("-r", root, "--existing", "append", "--limit", 4).code == 0

    resumed = caption(root / "a", root / "b", "--existing", "append")

    assert resumed.code == 0, resumed.err
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)
    assert len(server.chats) == 6


# --- 3: a model learnt from the server ----------------------------------------------------


def test_the_model_a_server_serves_is_the_same_pass_as_that_model_named(tmp_path, make_server, caption):
    server = make_server(
        flavour="vllm", native=False, models={"m1": {"capabilities": ["completion", "vision"]}}
    )
    folder = tmp_path / "set"
    expected = with_tags(folder, 3)
    assert caption(folder, "--api", "openai", "--existing", "append", "--limit", 2, host=server.url).code == 0

    named = caption(folder, "--api", "openai", "--model", "m1", "--existing", "append", host=server.url)

    assert named.code == 0, named.err
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)


def test_a_server_that_changed_its_model_makes_the_unfinished_pass_a_new_one(tmp_path, make_server, caption):
    vision = {"capabilities": ["completion", "vision"]}
    server = make_server(
        flavour="vllm", native=False, models={"m1": vision}, answer=lambda chat: f"A photo by {chat.model}."
    )
    folder = tmp_path / "set"
    captions = list(distinct_pictures(folder, 3))
    assert (
        caption(folder, "--api", "openai", "--existing", "overwrite", "--limit", 2, host=server.url).code == 0
    )
    server.models = {"m2": vision}

    resumed = caption(folder, "--api", "openai", "--existing", "overwrite", host=server.url)

    assert resumed.code == 0, resumed.err
    assert [path.read_text() for path in captions] == ["A photo by m2."] * 3


@pytest.mark.parametrize(
    "changed", [["--model", "llava:7b"], ["--prefix", "ohwx"]], ids=["another model", "another prefix"]
)
def test_an_append_rerun_with_another_model_or_prefix_is_another_pass_and_adds_its_answer(
    tmp_path, caption, server, changed
):
    server.models["llava:7b"] = VISION_MODEL
    folder = tmp_path / "set"
    expected = with_tags(folder, 2)
    assert caption(folder, "--existing", "append").code == 0
    server.chats.clear()

    rerun = caption(folder, "--existing", "append", *changed)

    assert rerun.code == 0, rerun.err
    assert len(server.chats) == 2
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 2)


# --- 5: a person's edit is never destroyed -------------------------------------------------


@pytest.mark.parametrize("mode", ["overwrite", "append", "prepend"])
def test_a_caption_edited_since_the_pass_wrote_it_is_left_alone_by_every_later_run(
    tmp_path, caption, server, mode
):
    folder = tmp_path / "set"
    expected = with_tags(folder, 3)
    assert caption(folder, "--existing", mode).code == 0
    edited = next(iter(expected))
    edited.write_text("a person's careful caption", encoding="utf-8")
    server.chats.clear()

    same = caption(folder, "--existing", mode)
    other_pass = caption(folder, "--existing", "overwrite", "--prefix", "ohwx")

    assert same.code == 0 and other_pass.code == 0, same.err + other_pass.err
    assert edited.read_text(encoding="utf-8") == "a person's careful caption"
    assert "left alone 1 (edited since written)" in same.err
    assert "left alone 1 (edited since written)" in other_pass.err
    assert len(server.chats) == 2  # the other pass captioned the two others


@pytest.mark.parametrize("how", ["only", "overwrite-edits"])
def test_naming_an_edited_caption_or_overwrite_edits_redoes_it(tmp_path, caption, server, how):
    folder = tmp_path / "set"
    expected = distinct_pictures(folder, 2)
    assert caption(folder, "--existing", "overwrite").code == 0
    edited = next(iter(expected))
    edited.write_text("a person's caption", encoding="utf-8")

    ask = (
        ["--only", redo_list(folder, edited.with_suffix(".png"))] if how == "only" else ["--overwrite-edits"]
    )
    redo = caption(folder, "--existing", "overwrite", *ask)

    assert redo.code == 0, redo.err
    assert edited.read_text(encoding="utf-8") == expected[edited]


def test_a_caption_the_tool_never_wrote_is_overwritten_as_before(tmp_path, caption, server):
    folder = tmp_path / "set"
    expected = with_tags(folder, 2)

    result = caption(folder, "--existing", "overwrite")

    assert result.code == 0, result.err
    assert {path: path.read_text() for path in expected} == expected


# --- 6: blank captions are no captions ------------------------------------------------------


@pytest.mark.parametrize(
    "blank",
    [b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n", b"\x00\x00\x00", "\u00a0\u200b \u200b".encode()],
    ids=["bom", "bom-crlf", "nul", "nbsp-zero-width"],
)
def test_a_caption_file_with_nothing_visible_counts_as_uncaptioned(tmp_path, caption, server, blank):
    folder = tmp_path / "set"
    expected = distinct_pictures(folder, 1)
    [path] = expected
    path.write_bytes(blank)
    meta = tmp_path / "meta.jsonl"

    result = caption(folder, "--jsonl", meta)

    assert result.code == 0, result.err
    assert path.read_text(encoding="utf-8") == expected[path]
    [line] = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()]
    assert line["text"] == expected[path]


# --- 7: names from "." and ".." ---------------------------------------------------------------


@pytest.mark.parametrize("given", [".", "./", ".."])
def test_class_and_folder_come_from_the_folder_itself_whatever_path_named_it(
    tmp_path, caption, server, monkeypatch, given
):
    folder = tmp_path / "15_guideboat"
    picture(folder / "boat.png")
    below = folder / "below"
    below.mkdir()
    monkeypatch.chdir(below if given == ".." else folder)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe this {class} photo from {folder}.", encoding="utf-8")

    result = caption(given, "--prompt", prompt, "--prefix", "{class}")

    assert result.code == 0, result.err
    assert server.chats[0].prompt == "Describe this guideboat photo from 15_guideboat."
    assert (folder / "boat.txt").read_text(encoding="utf-8").startswith("guideboat, ")


# --- Journals of the previous version ------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "recursive"])
def test_an_append_pass_of_the_previous_version_is_finished_without_doubling(tmp_path, caption, server, form):
    """Journals checked in from 47ddee3: `DIR PROMPT --existing append --limit 2` (with -r for
    "recursive", whose journal names its images by their subfolder) over three pictures with
    tags, two of which it captioned."""
    root = tmp_path / "ds"
    folder = root / "sub" if form == "recursive" else root
    expected = with_tags(folder, 3)
    for path, answer in list(expected.items())[:2]:
        path.write_text(f"old, tags, {answer}", encoding="utf-8")
    shutil.copy(DATA / f"{form}.journal", root / JOURNAL)
    recursive = ["-r"] if form == "recursive" else []

    resumed = caption(root, DATA / "prompt.txt", "--existing", "append", *recursive)

    assert resumed.code == 0, resumed.err
    assert {path: path.read_text() for path in expected} == {
        path: f"old, tags, {answer}" for path, answer in expected.items()
    }
    assert len(server.chats) == 1


def test_a_journal_names_the_folder_it_lies_in_whichever_folder_was_given(tmp_path, caption, server):
    root = tmp_path / "root"
    with_tags(root / "a", 1)

    assert caption("-r", root, "--existing", "append").code == 0

    assert (root / "a" / JOURNAL).exists() and not os.path.exists(root / JOURNAL)


def test_a_redo_of_an_append_pass_answer_that_stood_alone_is_its_answer_alone_again(
    tmp_path, caption, server
):
    """Found by the model-based test: an append pass that captioned an image without a caption
    kept nothing before its answer, and a redo of it must know that, not refuse it."""
    folder = tmp_path / "set"
    expected = distinct_pictures(folder, 1)
    [path] = expected
    assert caption(folder, "--existing", "append", "--prefix", "ohwx").code == 0

    redo = caption(folder, "--prefix", "ohwx", "--only", redo_list(folder, path.with_suffix(".png")))

    assert redo.code == 0, redo.err
    assert path.read_text(encoding="utf-8") == f"ohwx, {expected[path]}"
    assert len(server.chats) == 2


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_a_person_who_puts_back_the_caption_from_before_a_write_has_edited_it(
    tmp_path, caption, server, mode
):
    """Found by a red-team pass: the text from before a write that landed, put back by hand, is
    a person's edit, not a crash between the journal line and the caption."""
    folder = tmp_path / "set"
    expected = with_tags(folder, 1, tags="my tags")
    [path] = expected
    assert caption(folder, "--existing", mode).code == 0
    path.write_text("my tags", encoding="utf-8")

    rerun = caption(folder, "--existing", mode)

    assert rerun.code == 0, rerun.err
    assert path.read_text(encoding="utf-8") == "my tags"
    assert "left alone 1 (edited since written)" in rerun.err


def test_a_redo_names_the_pass_answer_under_another_pass_instead_of_destroying_the_tags(
    tmp_path, caption, server
):
    """Found by a red-team pass: --only without --existing, where another append pass added to
    this one's answer since, must not fall back to overwriting the tags and both answers."""
    folder = tmp_path / "set"
    expected = with_tags(folder, 1)
    [path] = expected
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("Describe the picture.", encoding="utf-8")
    second.write_text("List what is in the picture.", encoding="utf-8")
    assert caption(folder, "--prompt", first, "--existing", "append").code == 0
    assert caption(folder, "--prompt", second, "--existing", "append").code == 0
    before = path.read_text(encoding="utf-8")

    redo = caption(folder, "--prompt", first, "--only", redo_list(folder, path.with_suffix(".png")))

    assert redo.code == 1
    assert "another pass added to its caption since" in redo.err
    assert path.read_text(encoding="utf-8") == before


def test_a_redo_of_a_caption_holding_the_settings_answers_in_two_modes_takes_the_mode_added_last(
    tmp_path, caption, server
):
    """Found by the soak: the same settings appended, then prepended. A redo without --existing
    replaces the answer on top (the prepended one); the appended one below stays."""
    folder = tmp_path / "set"
    expected = with_tags(folder, 1)
    [(path, answer)] = expected.items()
    assert caption(folder, "--existing", "append").code == 0
    assert caption(folder, "--existing", "prepend").code == 0
    assert path.read_text(encoding="utf-8") == f"{answer}, old, tags, {answer}"

    redo = caption(folder, "--only", redo_list(folder, path.with_suffix(".png")))
    again = [caption(folder, "--existing", mode) for mode in ("append", "prepend")]

    assert redo.code == 0, redo.err
    assert path.read_text(encoding="utf-8") == f"{answer}, old, tags, {answer}"
    assert [run.code for run in again] == [0, 0] and len(server.chats) == 3


@pytest.mark.parametrize("how", ["only", "overwrite-edits"])
def test_an_edited_append_caption_is_not_given_a_second_answer_of_its_pass(tmp_path, caption, server, how):
    folder = tmp_path / "set"
    expected = with_tags(folder, 1)
    [path] = expected
    assert caption(folder, "--existing", "append").code == 0
    path.write_text(path.read_text(encoding="utf-8") + ", mine", encoding="utf-8")
    edited = path.read_text(encoding="utf-8")

    ask = ["--only", redo_list(folder, path.with_suffix(".png"))] if how == "only" else ["--overwrite-edits"]
    redo = caption(folder, "--existing", "append", *ask)

    assert redo.code == 1
    assert "edited since this pass wrote it" in redo.err
    assert path.read_text(encoding="utf-8") == edited


@pytest.mark.parametrize(
    "kept", [[0, 1, 2], {"x": 1}, ["a", "b"], [0.5, 2], [-3, 100], [5, 2], [0, 10**6]], ids=str
)
def test_a_damaged_journal_line_is_no_traceback_and_no_garbage(tmp_path, caption, server, kept):
    folder = tmp_path / "set"
    expected = with_tags(folder, 1)
    [path] = expected
    assert caption(folder, "--existing", "append").code == 0
    journal = folder / JOURNAL
    header, line, landed = journal.read_text().splitlines()
    entry = json.loads(line)
    entry["k"] = kept
    journal.write_text("\n".join([header, json.dumps(entry), landed]) + "\n")
    before = path.read_text(encoding="utf-8")

    redo = caption(folder, "--existing", "append", "--only", redo_list(folder, path.with_suffix(".png")))

    assert "Traceback" not in redo.err
    assert redo.code == 1 and "its journal does not say what this pass added" in redo.err
    assert path.read_text(encoding="utf-8") == before


def test_a_journal_whose_first_line_is_damaged_still_counts(tmp_path, caption, server):
    folder = tmp_path / "set"
    expected = with_tags(folder, 2)
    assert caption(folder, "--existing", "append").code == 0
    journal = folder / JOURNAL
    journal.write_bytes(b"X" + journal.read_bytes()[1:])
    server.chats.clear()

    rerun = caption(folder, "--existing", "append")

    assert rerun.code == 0, rerun.err
    assert server.chats == []
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)


def test_a_journal_that_lost_its_first_line_still_counts_every_line_it_kept(tmp_path, caption, server):
    folder = tmp_path / "set"
    expected = with_tags(folder, 2)
    assert caption(folder, "--existing", "append", "--jobs", 1).code == 0
    journal = folder / JOURNAL
    header, *lines = journal.read_text().splitlines(keepends=True)
    assert header == '{"journal": 2}\n'
    journal.write_text("".join(lines))  # its first line now the first caption's
    server.chats.clear()

    rerun = caption(folder, "--existing", "append")

    assert rerun.code == 0, rerun.err
    assert server.chats == []
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)


def test_a_journal_in_the_way_costs_no_request(tmp_path, caption, server):
    folder = tmp_path / "set"
    with_tags(folder, 2)
    (folder / JOURNAL).mkdir()

    run = caption(folder, "--existing", "append")

    assert run.code == 1
    assert server.chats == []
    assert "cannot write .llava-caption-ollama.journal" in run.err


def test_a_dry_run_writes_no_jsonl(tmp_path, caption, server):
    folder = tmp_path / "set"
    with_tags(folder, 2)
    meta = folder / "metadata.jsonl"

    dry = caption(folder, "--dry-run", "--jsonl", meta)

    assert dry.code == 0, dry.err
    assert not meta.exists()
    assert sorted(path.name for path in folder.iterdir()) == [
        "img000.png",
        "img000.txt",
        "img001.png",
        "img001.txt",
    ]


def test_a_recursive_pass_of_the_previous_version_is_finished_by_naming_its_subfolders(
    tmp_path, caption, server
):
    """Found by a red-team pass: the journal a -r run of 47ddee3 kept in the folder given names
    the images below it; a run over those subfolders named one by one still reads it."""
    root = tmp_path / "ds"
    folder = root / "sub"
    expected = with_tags(folder, 3)
    for path, answer in list(expected.items())[:2]:
        path.write_text(f"old, tags, {answer}", encoding="utf-8")
    shutil.copy(DATA / "recursive.journal", root / JOURNAL)

    resumed = caption(folder, "--prompt", DATA / "prompt.txt", "--existing", "append")

    assert resumed.code == 0, resumed.err
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)
    assert len(server.chats) == 1


def test_a_pass_of_the_previous_version_still_counts_after_another_pass_rewrote_its_journal(
    tmp_path, caption, server
):
    """The journal of 47ddee3 names one pass; a run of another pass rewrites it in the new form
    before adding its own line. The earlier pass, resumed afterwards, still adds nothing twice."""
    root = tmp_path / "ds"
    expected = with_tags(root, 3)
    for path, answer in list(expected.items())[:2]:
        path.write_text(f"old, tags, {answer}", encoding="utf-8")
    shutil.copy(DATA / "folder.journal", root / JOURNAL)
    extra = picture(root / "extra.png", size=(90, 32))
    other = tmp_path / "other.txt"
    other.write_text("Name the colours.", encoding="utf-8")
    assert caption(root, "--prompt", other, "--only", redo_list(root, extra)).code == 0
    assert json.loads((root / JOURNAL).read_text().splitlines()[0]) == {"journal": 2}
    server.chats.clear()

    resumed = caption(root, DATA / "prompt.txt", "--existing", "append")

    assert resumed.code == 0, resumed.err
    assert {path: answers_in(path) for path in expected} == dict.fromkeys(expected, 1)
    assert sorted(chat.picture().width for chat in server.chats) == [42, 90]  # img002, and extra


def test_images_done_with_a_model_the_server_no_longer_serves_keep_their_place_under_limit(
    tmp_path, make_server, caption
):
    """Found by the soak: planned before the server says its model, they came after the images
    planned to caption meanwhile, and --limit took a later image than the rules say."""
    vision = {"capabilities": ["completion", "vision"]}
    server = make_server(flavour="vllm", native=False, models={"m1": vision})
    folder = tmp_path / "set"
    captions = list(distinct_pictures(folder, 3))
    assert caption(folder, "--api", "openai", "--existing", "overwrite", host=server.url).code == 0
    server.models = {"m2": vision}
    captions[2].write_bytes(b"\xef\xbb\xbf")  # blank: work to do, so the server is asked
    server.chats.clear()

    run = caption(folder, "--api", "openai", "--existing", "overwrite", "--limit", 1, host=server.url)

    assert run.code == 0, run.err
    assert [chat.picture().width for chat in server.chats if chat.picture().size != (64, 64)] == [40]


@pytest.mark.parametrize("before", ["no caption", "an empty caption"])
def test_a_redo_with_existing_skip_of_an_image_without_caption_is_the_overwrite_passs(
    tmp_path, caption, server, before
):
    """Found by the soak: a redo in skip mode of an image with nothing beside it was recorded as
    the skip pass's, so the overwrite pass that followed captioned it a second time."""
    folder = tmp_path / "set"
    expected = distinct_pictures(folder, 1)
    [path] = expected
    if before == "no caption":
        path.unlink(missing_ok=True)
    else:
        path.write_text("", encoding="utf-8")

    redo = caption(folder, "--existing", "skip", "--only", redo_list(folder, path.with_suffix(".png")))
    assert redo.code == 0, redo.err
    assert path.read_text(encoding="utf-8") == expected[path]

    again = caption(folder, "--existing", "overwrite")
    assert again.code == 0, again.err
    assert len(server.chats) == 1 and "skipped 1" in again.err
