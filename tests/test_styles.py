"""Several captions per image in one run: --also styles, {caption:EXT}, --join."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import JOURNAL, distinct_pictures, picture
from stand_in_ollama import Reply


def prompts(folder: Path, **texts: str) -> dict:
    """Prompt files outside the images' folder: {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text)
    return paths


def styled_answer(chat) -> str:
    """Tags for a prompt asking for tags, a description for the others; each names the picture."""
    width = chat.picture().width
    if chat.prompt.startswith("List tags"):
        return f"red, square, w{width}"
    return f"A picture {width} wide. Asked: {chat.prompt}"


def test_each_image_is_prepared_once_and_its_styles_asked_back_to_back(
    tmp_path, caption, server, monkeypatch
):
    from conftest import captioner

    data = tmp_path / "data"
    distinct_pictures(data, 4)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    decoded = []
    real = captioner.prepare_image
    monkeypatch.setattr(
        captioner, "prepare_image", lambda path, size: decoded.append(os.path.basename(path)) or real(path, size)
    )
    server.answer = styled_answer

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--jobs", 1)

    assert run.code == 0, run.err
    assert sorted(decoded) == [f"img{index:03d}.png" for index in range(4)]  # once each
    for index in range(4):
        assert (
            data / f"img{index:03d}.txt"
        ).read_text() == f"A picture {40 + index} wide. Asked: Describe it."
        assert (data / f"img{index:03d}.tags").read_text() == f"red, square, w{40 + index}"
    # Back to back, in the order given: each image's two requests, then the next image's.
    asked = [(chat.picture().width, chat.prompt) for chat in server.chats]
    assert asked == [(40 + index, prompt) for index in range(4) for prompt in ("Describe it.", "List tags.")]
    assert "  .txt captions: captioned 4, skipped 0, failed 0" in run.err
    assert "  .tags captions: captioned 4, skipped 0, failed 0" in run.err

    again = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags")
    assert again.code == 0 and len(server.chats) == 8  # the rerun sends nothing
    assert "  .tags captions: captioned 0, skipped 4, failed 0" in again.err


def test_a_description_is_sent_the_tags_of_its_image_asked_first(tmp_path, caption, server):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(
        tmp_path / "prompts", long="Describe it, with these tags: {caption:.tags}", tags="List tags."
    )
    server.answer = styled_answer

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--jobs", 1)

    assert run.code == 0, run.err
    # The tags are asked first, though given second, and their caption is in the description's prompt.
    asked = [(chat.picture().width, chat.prompt) for chat in server.chats]
    assert asked == [
        (40, "List tags."),
        (40, "Describe it, with these tags: red, square, w40"),
        (41, "List tags."),
        (41, "Describe it, with these tags: red, square, w41"),
    ]
    assert (
        data / "img001.txt"
    ).read_text() == "A picture 41 wide. Asked: Describe it, with these tags: red, square, w41"


def test_tags_on_disk_ground_the_description_and_a_style_whose_caption_failed_fails_too(
    tmp_path, caption, server
):
    data = tmp_path / "data"
    distinct_pictures(data, 3)
    (data / "img000.tags").write_text("hand, written, tags")
    given = prompts(
        tmp_path / "prompts", long="Describe it, with these tags: {caption:.tags}", tags="List tags."
    )
    server.answer = lambda chat: (
        Reply(status=400, error="bad picture") if chat.picture().width == 41 else styled_answer(chat)
    )
    failed = tmp_path / "failed.txt"

    run = caption(
        data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--failed-list", failed
    )

    assert run.code == 1
    # img000's tags were there (skip): the description is sent them from the file.
    assert "Describe it, with these tags: hand, written, tags" in [chat.prompt for chat in server.chats]
    assert (data / "img000.tags").read_text() == "hand, written, tags"
    # img001's tags failed, so its description fails too, saying why, without a request.
    assert not (data / "img001.tags").exists() and not (data / "img001.txt").exists()
    assert "img001.txt: its prompt asks for the .tags caption, which failed:" in run.err
    assert [chat.picture().width for chat in server.chats].count(41) == 1
    assert "  .tags captions: captioned 1, skipped 1, failed 1" in run.err
    assert "  .txt captions: captioned 2, skipped 0, failed 1" in run.err
    # The failed list names each style's caption that failed, so --only redoes those alone.
    assert failed.read_text().splitlines()[1:] == ["data/img001.tags", "data/img001.txt"]

    server.answer = styled_answer
    sent = len(server.chats)
    again = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--only", failed)
    assert again.code == 0, again.err
    assert [chat.picture().width for chat in server.chats[sent:]] == [41, 41]
    assert (data / "img001.tags").read_text() == "red, square, w41"
    assert (data / "img000.txt").read_text().endswith("hand, written, tags")  # not redone


def test_a_caption_a_prompt_asks_for_is_never_read_through_a_link(tmp_path, caption, server):
    """What {caption:EXT} reads is sent to the server: a link in a downloaded dataset must not send
    a file from outside it."""
    data = tmp_path / "data"
    distinct_pictures(data, 1)
    (tmp_path / "outside.txt").write_text("secret")
    (data / "img000.tags").symlink_to(tmp_path / "outside.txt")
    given = prompts(
        tmp_path / "prompts", long="Describe it, with these tags: {caption:.tags}", tags="List tags."
    )

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags")

    assert run.code == 1
    assert not any("secret" in chat.prompt for chat in server.chats)
    assert "img000.txt: its prompt asks for the .tags caption, which cannot be read: it is a link" in run.err


def test_only_naming_one_styles_caption_redoes_that_style_alone(tmp_path, caption, server):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    server.answer = styled_answer
    styles = ["--prompt", given["long"], "--also", f"{given['tags']}:.tags"]
    assert caption(data, *styles).code == 0
    (data / "img000.txt").write_text("a description a person wrote")
    redo = tmp_path / "redo.txt"
    redo.write_text("data/img000.tags\n")
    server.answer = lambda chat: "new, tags"

    run = caption(data, *styles, "--only", redo)

    assert run.code == 0, run.err
    assert (data / "img000.tags").read_text() == "new, tags"
    assert (data / "img000.txt").read_text() == "a description a person wrote"  # another pass's
    assert len(server.chats) == 5


def test_each_style_is_its_own_pass_for_edits_and_for_captions_it_never_wrote(tmp_path, caption, server):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    server.answer = styled_answer
    # A first pass of the main caption alone; the .tags files were written by hand, not by the tool.
    assert caption(data, "--prompt", given["long"], "--existing", "overwrite").code == 0
    (data / "img000.tags").write_text("tags from another tool")
    styles = ["--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--existing", "overwrite"]

    run = caption(data, *styles)

    assert run.code == 0, run.err
    # A caption the tool never wrote is overwritten by overwrite, whatever the other style's journal says.
    assert (data / "img000.tags").read_text() == "red, square, w40"
    assert "  .txt captions: captioned 0, skipped 2, failed 0" in run.err
    # Edited by hand since the .tags pass wrote it: left alone by every later run of the pass.
    (data / "img001.tags").write_text("edited tags")
    again = caption(data, *styles)
    assert again.code == 0 and (data / "img001.tags").read_text() == "edited tags"
    assert (
        "  .tags captions: captioned 0, skipped 1, left alone 1 (edited since written), failed 0" in again.err
    )
    journal = [json.loads(line) for line in (data / JOURNAL).read_text().splitlines()[1:]]
    assert {entry.get("x") for entry in journal} == {".txt", ".tags"}


def test_a_style_given_alone_is_the_same_pass_as_given_with_also(tmp_path, caption, server):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    server.answer = styled_answer
    assert (
        caption(
            data, "--prompt", given["tags"], "--ext", ".tags", "--existing", "append", "--limit", "1"
        ).code
        == 0
    )

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--existing", "append")

    assert run.code == 0, run.err
    assert (data / "img000.tags").read_text() == "red, square, w40"  # not appended twice
    assert (data / "img001.tags").read_text() == "red, square, w41"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--also", "{tags}:.txt"], "tags.txt:.txt: .txt is the extension of --ext"),
        (["--also", "{tags}:.tags", "--also", "{long}:.tags"], "is the extension of another --also"),
        (["--also", "{tags}"], "give PROMPT_FILE:EXT, such as tags.txt:.tags"),
        (["--also", "{tags}:tags"], "give PROMPT_FILE:EXT"),
        (["--also", "{tags}:.jpg"], "would overwrite images"),
        (
            ["--also", "{tags}:.short.txt"],
            "x.short.txt would also be the .txt caption of an image named x.short",
        ),
        (
            ["--also", "{tags}:.tags", "--also", "{long}:.long.tags"],
            "x.long.tags would also be the .tags caption of an image named x.long",
        ),
        (
            ["--prompt", "{needs_tags}"],
            "asks for {caption:.tags}, but no style of the run writes .tags captions",
        ),
        (
            ["--prompt", "{needs_tags}", "--also", "{needs_txt}:.tags"],
            "the styles ask for each other's captions (.txt -> .tags -> .txt)",
        ),
        (["--also", "{tags}:.tags", "--prefix", "{{caption:.tags}}"], "--prefix: only a prompt may ask"),
        (["--prompt", "{bad}"], "write {caption:EXT} with the extension of a style's captions"),
        (
            ["--join", "\\n"],
            "--join joins an answer to the caption it adds to: give --existing append or prepend",
        ),
    ],
)
def test_styles_that_cannot_work_stop_the_run_at_the_start(tmp_path, caption, server, arguments, message):
    picture(tmp_path / "data" / "a.png")
    given = prompts(
        tmp_path / "prompts",
        tags="List tags.",
        long="Describe it.",
        needs_tags="Describe {caption:.tags}",
        needs_txt="Tags from {caption:.txt}",
        bad="Describe {caption}",
    )
    run = caption(tmp_path / "data", *[argument.format(**given) for argument in arguments])
    assert run.code == 2
    assert message in run.err
    assert server.chats == []


def test_join_with_a_line_break_gives_one_caption_a_line_each_with_its_trigger_word(
    tmp_path, caption, server
):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(tmp_path / "prompts", short="Say it short.", long="Describe it.")
    server.answer = lambda chat: f"{chat.prompt} Line\none of w{chat.picture().width}"
    assert caption(data, "--prompt", given["short"], "--prefix", "ohwx").code == 0

    run = caption(
        data, "--prompt", given["long"], "--prefix", "ohwx", "--existing", "append", "--join", "\\n"
    )

    assert run.code == 0, run.err
    assert (
        data / "img000.txt"
    ).read_text() == "ohwx, Say it short. Line one of w40\nohwx, Describe it. Line one of w40"
    assert "0 of 4 longer than 77 CLIP tokens" in run.err  # two captions in each file
    again = caption(
        data, "--prompt", given["long"], "--prefix", "ohwx", "--existing", "append", "--join", "\\n"
    )
    assert again.code == 0 and len(server.chats) == 4  # a rerun adds nothing
    assert (data / "img001.txt").read_text().count("\n") == 1


def test_join_puts_the_trigger_word_on_every_line_even_of_a_caption_written_by_hand(
    tmp_path, caption, server
):
    data = tmp_path / "data"
    picture(data / "a.png")
    (data / "a.txt").write_text("first caption\r\nohwx, second caption\n\n")
    server.answer = lambda chat: "a new one"

    run = caption(
        data, "--prefix", "ohwx", "--suffix", "style", "--existing", "prepend", "--join", "\\n", "--raw"
    )

    assert run.code == 0, run.err
    assert (data / "a.txt").read_text() == (
        "ohwx, a new one, style\nohwx, first caption, style\nohwx, second caption, style"
    )


def test_each_style_has_its_column_in_the_jsonl(tmp_path, caption, server):
    data = tmp_path / "data"
    distinct_pictures(data, 2)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    server.answer = styled_answer
    jsonl = data / "metadata.jsonl"

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--jsonl", jsonl)

    assert run.code == 0, run.err
    rows = {row["file_name"]: row for row in map(json.loads, jsonl.read_text().splitlines())}
    assert rows["img001.png"]["text"] == "A picture 41 wide. Asked: Describe it."
    assert rows["img001.png"]["tags"] == "red, square, w41"
    # A tags file edited since is recovered into its column by the next run.
    (data / "img000.tags").write_text("edited")
    assert (
        caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--jsonl", jsonl).code
        == 0
    )
    rows = {row["file_name"]: row for row in map(json.loads, jsonl.read_text().splitlines())}
    assert rows["img000.png"]["tags"] == "edited" and rows["img000.png"]["text"].startswith("A picture 40")


def test_a_folder_prompt_replaces_the_main_prompt_and_not_the_styles(tmp_path, caption, server):
    data = tmp_path / "data"
    picture(data / "a.png")
    (data / ".prompt").write_text("The folder's own.")
    given = prompts(tmp_path / "prompts", tags="List tags.")
    server.answer = lambda chat: f"answer to {chat.prompt}"

    run = caption(data, "--folder-prompt", ".prompt", "--also", f"{given['tags']}:.tags")

    assert run.code == 0, run.err
    assert (data / "a.txt").read_text() == "answer to The folder's own."
    assert (data / "a.tags").read_text() == "answer to List tags."


def test_a_folder_prompt_may_ask_for_a_style_and_one_that_cannot_be_asked_leaves_its_folder_out(
    tmp_path, caption, server
):
    picture(tmp_path / "data" / "good" / "deeper" / "a.png")
    picture(tmp_path / "data" / "bad" / "b.png")
    (tmp_path / "data" / "good" / ".prompt").write_text("Describe, tags: {caption:.tags}")
    (tmp_path / "data" / "bad" / ".prompt").write_text("Describe, notes: {caption:.notes}")
    given = prompts(tmp_path / "prompts", tags="List tags.")
    server.answer = lambda chat: f"answer to {chat.prompt}"

    run = caption(tmp_path / "data", "-r", "--folder-prompt", ".prompt", "--also", f"{given['tags']}:.tags")

    assert run.code == 1
    deeper = tmp_path / "data" / "good" / "deeper"
    assert (deeper / "a.txt").read_text() == "answer to Describe, tags: answer to List tags."
    assert "asks for {caption:.notes}, but no style of the run writes .notes captions" in run.err
    assert not (tmp_path / "data" / "bad" / "b.tags").exists()


def test_a_redo_of_a_joined_pass_replaces_only_the_line_it_added(tmp_path, caption, server):
    data = tmp_path / "data"
    picture(data / "a.png")
    given = prompts(tmp_path / "prompts", short="Say it short.", long="Describe it.")
    answers = iter(["short one", "long one", "long two"])
    server.answer = lambda chat: next(answers)
    joined = ["--prompt", given["long"], "--prefix", "ohwx", "--join", "\\n"]
    assert caption(data, "--prompt", given["short"], "--prefix", "ohwx").code == 0
    assert caption(data, *joined, "--existing", "prepend").code == 0
    assert (data / "a.txt").read_text() == "ohwx, long one\nohwx, short one"
    redo = tmp_path / "redo.txt"
    redo.write_text("data/a.png\n")

    run = caption(data, *joined, "--only", redo)

    assert run.code == 0, run.err
    assert (data / "a.txt").read_text() == "ohwx, long two\nohwx, short one"


def test_twins_that_would_share_a_styles_caption_are_refused_in_every_style(tmp_path, caption, server):
    """a.png and a.jpg would write one a.tags as they would one a.txt: neither is captioned in any
    style (one file would describe only one of the pictures), and each is named."""
    data = tmp_path / "data"
    picture(data / "a.png", size=(40, 32))
    picture(data / "a.jpg", size=(41, 32))
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags")

    assert run.code == 1
    assert not server.chats or all(chat.picture().width not in (40, 41) for chat in server.chats)
    assert not (data / "a.tags").exists() and not (data / "a.txt").exists()
    assert "shares a.tags with a.png" in run.err and "shares a.tags with a.jpg" in run.err


def test_a_run_with_styles_stopped_early_counts_the_captions_it_left(tmp_path, caption, server):
    """What a run with styles plans is each image's caption in each style: those it leaves are
    counted as captions, not as images (3 images in 2 styles are 6 captions)."""
    data = tmp_path / "data"
    distinct_pictures(data, 3)
    given = prompts(tmp_path / "prompts", long="Describe it.", tags="List tags.")
    answers = iter([Reply(text="a red square")])
    server.answer = lambda chat: next(answers, Reply(status=401, error="unauthorized"))

    run = caption(data, "--prompt", given["long"], "--also", f"{given['tags']}:.tags", "--jobs", 1)

    assert run.code == 1, run.err
    assert (data / "img000.txt").read_text() == "a red square"
    assert "; 5 captions left for a rerun" in run.err
