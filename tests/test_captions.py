"""Captions fit to train on: templates, trigger words, cleanup, validation with retry, options, JSONL."""

from __future__ import annotations

import json

import pytest
from conftest import by_width, leftovers, picture
from stand_in_ollama import Reply


def one_picture(folder, name="a.jpg"):
    return picture(folder / name)


@pytest.mark.parametrize(
    "answer, written",
    [
        (" The image shows a red fox in the snow, soft light.", "a red fox in the snow, soft light."),
        ("This image depicts: a red fox", "a red fox"),
        ("In this image, a red fox sleeps", "a red fox sleeps"),
        ("This is a photograph of a red fox", "a red fox"),
        ('Caption: "a red fox, snow"', "a red fox, snow"),
        ("\u201ca red fox\u201d", "a red fox"),
        ("a red fox,\n\nsnow,   winter\n", "a red fox, snow, winter"),
        ("The fox in the image shows its teeth", "The fox in the image shows its teeth"),
    ],
)
def test_cleanup(tmp_path, caption, server, answer, written):
    one_picture(tmp_path)
    server.answer = lambda chat: answer
    assert caption(tmp_path).code == 0
    assert (tmp_path / "a.txt").read_text() == written


def test_raw_writes_the_answer_as_it_came(tmp_path, caption, server):
    one_picture(tmp_path)
    server.answer = lambda chat: ' The image shows "a fox",\nin snow. '
    assert caption(tmp_path, "--raw").code == 0
    assert (tmp_path / "a.txt").read_text() == 'The image shows "a fox",\nin snow.'


@pytest.mark.parametrize(
    "bad, reason",
    [
        (Reply(text="I'm sorry, I can't help with identifying people in images."), "the model refused: "),
        (Reply(text="I\u2019m unable to see the image."), "the model refused: "),
        (Reply(text="   "), "the model answered with an empty caption"),
        (Reply(text="a cat, " * 30), "the answer repeats itself: "),
        (
            Reply(text="a red fox sitting in deep snow under a pale", done_reason="length"),
            "cut off at the token limit",
        ),
    ],
    ids=["sorry", "unable", "empty", "loop", "length"],
)
def test_a_bad_answer_is_asked_again_with_a_new_seed(tmp_path, caption, server, bad, reason):
    one_picture(tmp_path)
    answers = iter([bad, "a red fox in the snow"])
    server.answer = lambda chat: next(answers)

    run = caption(tmp_path, "--seed", 7)

    assert run.code == 0, run.err
    assert (tmp_path / "a.txt").read_text() == "a red fox in the snow"
    assert [chat.options["seed"] for chat in server.chats] == [7, 8]


def test_an_image_whose_answers_stay_bad_fails_and_nothing_is_written(tmp_path, caption, server):
    one_picture(tmp_path)
    server.answer = lambda chat: "I cannot describe this image."

    run = caption(tmp_path, "--retries", 2)

    assert run.code == 1
    assert len(server.chats) == 3
    assert len({chat.options.get("seed") for chat in server.chats}) == 3  # none, then two fresh seeds
    assert "FAILED a.jpg: the model refused: 'I cannot describe this image.' (after 3 tries)" in run.err
    assert not (tmp_path / "a.txt").exists()


def test_retries_zero_asks_once(tmp_path, caption, server):
    one_picture(tmp_path)
    server.answer = lambda chat: ""
    run = caption(tmp_path, "--retries", 0)
    assert run.code == 1
    assert len(server.chats) == 1
    assert "FAILED a.jpg: the model answered with an empty caption\n" in run.err


def test_sampling_options_go_identically_with_every_request(tmp_path, caption, server):
    for name in "abc":
        one_picture(tmp_path, f"{name}.jpg")

    args = ["--temperature", 0.2, "--seed", 42, "--max-tokens", 80, "--num-ctx", 8192, "--keep-alive", "1h"]
    assert caption(tmp_path, *args).code == 0

    expected = {"temperature": 0.2, "seed": 42, "num_predict": 80, "num_ctx": 8192}
    assert [chat.options for chat in server.chats] == [expected] * 3
    assert [chat.keep_alive for chat in server.chats] == ["1h"] * 3


def test_prompt_placeholders_are_filled_for_each_image(tmp_path, caption, server):
    folder = tmp_path / "15_guideboat"
    picture(folder / "boat-01.jpg", size=(64, 48))
    picture(folder / "plain" / "boat-02.jpg", size=(65, 48))
    (folder / "boat-01.txt").write_text("wooden, lake\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("{name} | {folder} | {class} | {existing} | {{literal}}")

    assert caption(folder, prompt, "-r", "--existing", "overwrite").code == 0

    prompts = {chat.picture().width: chat.prompt for chat in server.chats}
    assert prompts == {
        64: "boat-01 | 15_guideboat | guideboat | wooden, lake | {literal}",
        65: "boat-02 | plain | plain |  | {literal}",
    }


@pytest.mark.parametrize(
    "template, complaint",
    [
        (
            "Describe {subject}.",
            "asks for {subject}, which is not one of {name}, {folder}, {class}, {existing}",
        ),
        ("Describe {name!r}.", "write {name} alone, without a conversion or a format"),
        ("Describe { this.", "expected '}' before end of string"),
        ("Describe } this.", "Single '}' encountered"),
    ],
)
def test_a_prompt_with_an_unknown_placeholder_stops_before_any_request(
    tmp_path, caption, server, template, complaint
):
    one_picture(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(template)

    run = caption(tmp_path, prompt)

    assert run.code == 2
    assert complaint in run.err
    assert server.chats == []


@pytest.mark.parametrize(
    "prefix, suffix, answer, written",
    [
        ("ohwx man", "film grain", "a man in a red coat", "ohwx man, a man in a red coat, film grain"),
        ("ohwx man", "film grain", "Ohwx man in a red coat", "Ohwx man in a red coat, film grain"),
        (
            "ohwx man",
            "film grain",
            "ohwx man in a red coat, film grain.",
            "ohwx man in a red coat, film grain.",
        ),
        # Whole words: "man" is not in place at the start of "many", nor "art" at the end of "heart".
        ("man", "art", "many people in a square", "man, many people in a square, art"),
        ("man", "art", "a red heart", "man, a red heart, art"),
        ("man", "art", "Man in a red coat, pop art.", "Man in a red coat, pop art."),
        ("man", "art", "man, in a red coat, art", "man, in a red coat, art"),
    ],
)
def test_trigger_words_are_added_once_as_whole_words(
    tmp_path, caption, server, prefix, suffix, answer, written
):
    one_picture(tmp_path)
    server.answer = lambda chat: answer
    assert caption(tmp_path, "--prefix", prefix, "--suffix", suffix).code == 0
    assert (tmp_path / "a.txt").read_text() == written


def test_trigger_words_with_existing_captions(tmp_path, caption, server):
    one_picture(tmp_path, "a.jpg")
    one_picture(tmp_path, "b.jpg")
    (tmp_path / "a.txt").write_text("ohwx, old tags")
    (tmp_path / "b.txt").write_text("old tags")
    server.answer = lambda chat: "new words"

    assert caption(tmp_path, "--existing", "append", "--prefix", "ohwx").code == 0

    assert (tmp_path / "a.txt").read_text() == "ohwx, old tags, new words"
    assert (tmp_path / "b.txt").read_text() == "ohwx, old tags, new words"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_lists_each_caption_with_paths_relative_to_its_folder(tmp_path, caption, server):
    picture(tmp_path / "top.jpg", size=(64, 48))
    picture(tmp_path / "sub" / "deep" / "low.png", size=(65, 48))
    server.answer = by_width({64: "une île", 65: "a low shot"})

    assert caption(tmp_path, "-r", "--jsonl", tmp_path / "metadata.jsonl").code == 0

    entries = sorted(read_jsonl(tmp_path / "metadata.jsonl"), key=lambda entry: entry["file_name"])
    assert [(entry["file_name"], entry["text"]) for entry in entries] == [
        ("sub/deep/low.png", "a low shot"),
        ("top.jpg", "une île"),
    ]
    assert all(
        entry["model"] == "llava:13b" and entry["tokens"] > 0 and entry["seconds"] >= 0 for entry in entries
    )


def test_a_rerun_keeps_earlier_entries_without_duplicating_them(tmp_path, caption, server):
    for name in "ab":
        one_picture(tmp_path, f"{name}.jpg")
    jsonl = tmp_path / "metadata.jsonl"
    server.answer = lambda chat: "first words"
    assert caption(tmp_path, "--jsonl", jsonl, "--limit", 1).code == 0
    assert len(read_jsonl(jsonl)) == 1

    assert caption(tmp_path, "--jsonl", jsonl).code == 0  # captions b only
    first = {entry["file_name"]: entry for entry in read_jsonl(jsonl)}
    assert first["a.jpg"]["text"] == "first words" and first["a.jpg"]["model"] == "llava:13b"
    assert "recovered" not in first["a.jpg"]  # kept from the first run, not rebuilt
    server.answer = lambda chat: "second words"
    assert caption(tmp_path, "--jsonl", jsonl, "--existing", "overwrite").code == 0  # both again

    entries = read_jsonl(jsonl)
    assert sorted(entry["file_name"] for entry in entries) == ["a.jpg", "b.jpg"]
    assert {entry["text"] for entry in entries} == {"second words"}
    assert leftovers(tmp_path) == []


def test_a_jsonl_that_is_not_metadata_stops_the_run_before_any_request(tmp_path, caption, server):
    one_picture(tmp_path)
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text('{"file_name": "x.jpg", "text": "x"}\nnot json\n')

    run = caption(tmp_path, "--jsonl", jsonl)

    assert run.code == 2
    assert "metadata.jsonl line 2 is not a metadata entry" in run.err
    assert server.chats == []
    assert jsonl.read_text() == '{"file_name": "x.jpg", "text": "x"}\nnot json\n'


def test_summary_reports_speed_length_and_captions_too_long_for_clip(tmp_path, caption, server):
    picture(tmp_path / "short.jpg", size=(64, 48))
    picture(tmp_path / "long.jpg", size=(65, 48))
    long_caption = ", ".join(f"detail {n}" for n in range(40))  # 80 words and 39 commas
    server.answer = by_width({64: "a fox", 65: long_caption})

    run = caption(tmp_path)

    # The stand-in reports eval_count = words over an eval_duration of 1.602331 s.
    tokens_per_second = (2 + 80) / (2 * 1.602331)
    assert f"  {tokens_per_second:.1f} tokens/s generated; captions average 41 words; " in run.err
    assert "1 of 2 longer than 77 CLIP tokens" in run.err


def test_a_count_of_one_is_said_in_the_singular(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: "fox"

    run = caption(tmp_path)

    assert run.code == 0, run.err
    assert "captions average 1 word; " in run.err


def test_a_caption_with_no_word_left_after_cleanup_is_refused(tmp_path, caption, server):
    one_picture(tmp_path)
    answers = iter(["The image shows.", "\u200b\u200b \u2060", "a red fox"])
    server.answer = lambda chat: next(answers)

    run = caption(tmp_path)

    assert run.code == 0, run.err
    assert (tmp_path / "a.txt").read_text() == "a red fox"
    assert len(server.chats) == 3  # "." and invisible characters alone are no caption


def test_control_characters_never_reach_a_caption_file_or_the_terminal(tmp_path, caption, server):
    one_picture(tmp_path, "a.jpg")
    one_picture(tmp_path, "b.jpg")
    hostile = "\x1b[2J\x1b]0;pwned\x07a red\u200b fox\u202e"
    server.answer = lambda chat: hostile

    run = caption(tmp_path, "-v")
    assert caption(tmp_path, "--raw", "--existing", "overwrite").code == 0

    assert run.code == 0
    assert "\x1b" not in run.err and "\x07" not in run.err and "\u202e" not in run.err
    assert (tmp_path / "a.txt").read_text() == "[2J]0;pwneda red fox"  # raw included
    assert not any(char in (tmp_path / "b.txt").read_text() for char in "\x1b\x07\u200b\u202e")


def test_raw_keeps_line_breaks_but_drops_control_characters(tmp_path, caption, server):
    one_picture(tmp_path)
    server.answer = lambda chat: " The image shows a fox,\n\tin snow\x0b\x1b[0m. "
    assert caption(tmp_path, "--raw").code == 0
    assert (tmp_path / "a.txt").read_text() == "The image shows a fox,\n\tin snow [0m."


def test_a_byte_order_mark_is_not_part_of_the_prompt(tmp_path, caption, server):
    one_picture(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("\ufeffDescribe the picture.\n".encode())
    assert caption(tmp_path, prompt).code == 0
    assert server.chats[0].prompt == "Describe the picture."

    prompt.write_bytes("\ufeff\n".encode())
    run = caption(tmp_path, prompt, "--existing", "overwrite")
    assert run.code == 2 and "prompt.txt is empty" in run.err


@pytest.mark.parametrize(
    "option, value",
    [("--keep-alive", "inf"), ("--keep-alive", "nan"), ("--temperature", "inf"), ("--timeout", "nan")],
)
def test_numbers_ollama_cannot_take_are_refused_before_any_request(tmp_path, caption, server, option, value):
    one_picture(tmp_path)
    run = caption(tmp_path, option, value)
    assert run.code == 2
    assert f"argument {option}: " in run.err and len(run.err.splitlines()) == 1
    assert server.chats == []


def test_options_may_stand_between_the_folder_and_the_prompt_file(tmp_path, caption, server):
    picture(tmp_path / "sub" / "a.jpg")
    prompt = tmp_path / "tags.txt"
    prompt.write_text("List tags.")
    run = caption(tmp_path, "-r", prompt, "--seed", 3)
    assert run.code == 0, run.err
    assert [chat.prompt for chat in server.chats] == ["List tags."]


def test_a_jsonl_that_cannot_be_saved_makes_the_exit_code_1(tmp_path, caption, server):
    one_picture(tmp_path)
    jsonl = tmp_path / "metadata.jsonl"

    def answer_then_block_the_jsonl(chat):
        (jsonl / "in-the-way").mkdir(parents=True)  # a folder where the JSONL must go
        return "a red fox"

    server.answer = answer_then_block_the_jsonl

    run = caption(tmp_path, "--jsonl", jsonl)

    assert run.code == 1
    assert (tmp_path / "a.txt").read_text() == "a red fox"  # the caption itself is safe
    assert f"error: cannot write {jsonl}: " in run.err


def test_a_jsonl_must_be_where_it_can_list_the_images(tmp_path, caption, server):
    one_picture(tmp_path / "data")
    run = caption(tmp_path / "data", "--jsonl", tmp_path / "elsewhere" / "metadata.jsonl")
    assert run.code == 2 and "--jsonl: the folder" in run.err
    (tmp_path / "elsewhere").mkdir()
    run = caption(tmp_path / "data", "--jsonl", tmp_path / "elsewhere" / "metadata.jsonl")
    assert run.code == 2 and "--jsonl must be in " in run.err
    assert server.chats == []


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("I apologize, but I am unable to view images.", "the model refused: "),
        ("Sorry, there is no picture here for me to describe.", "the model refused: "),
        ("[0.64, 0.50, 0.91, 0.88]", "the model answered with box coordinates: "),
        ("[0.1,0.2,0.3,0.4] a dog", "the model answered with box coordinates: "),
    ],
)
def test_answers_that_are_no_caption_are_refused(tmp_path, caption, server, answer, reason):
    one_picture(tmp_path)
    server.answer = lambda chat: answer

    run = caption(tmp_path, "--retries", 0)

    assert run.code == 1
    assert f"FAILED a.jpg: {reason}" in run.err
    assert not (tmp_path / "a.txt").exists()
