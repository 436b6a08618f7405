"""Issue 20, item 7: answers in the wrong language. A run of a script that neither the prompt nor
the trigger words use (Chinese from a Qwen model asked in English) is refused like a loop and
asked again with a new seed; a quoted sign, a name, a prompt written in that script, and
--any-script keep it."""

from __future__ import annotations

import pytest
from conftest import captioner, distinct_pictures, picture

ENGLISH = "Write one caption for this image."
DRIFT = "A cat on a windowsill, 阳光洒在它的身上，背景是蓝天白云"
DRIFTED = (
    "drifts into Chinese characters (Han), which neither the prompt nor the trigger words are written in"
)


# -- the rule, on answers and prompts -----------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "a noodle bar at night, a shop sign reading 拉面",
        "a portrait of 山田太郎 beside a poster of 東京タワー",
        "a coffee shop, its sign reading スターバックスコーヒー",
        "a street corner, a sign reading Ресторан above the door",
        "a grey cat asleep on a windowsill, a tag reading 一二三四五六七",  # 7 in a run: a name, a sign
        "an ancient scroll, the Greek word λόγος written across it",
    ],
    ids=["sign", "japanese-names", "katakana-brand", "cyrillic-sign", "seven-han", "greek-word"],
)
def test_a_short_run_of_another_script_in_an_english_caption_is_kept(answer):
    assert captioner.wrong_script(answer, ENGLISH) == ""


@pytest.mark.parametrize(
    "answer, said",
    [
        (DRIFT, "drifts into Chinese characters (Han)"),
        ("a grey cat asleep on a windowsill, 一二三四五六七八", "drifts into Chinese characters (Han)"),  # 8
        ("a city at night, 東京の夜景がきれいです", "drifts into Japanese kana"),  # Han and kana as one
        # Spaces between its words do not end a run: 26 Cyrillic letters among 45 Latin ones.
        (
            "a long red vintage car parked on a quiet cobbled street на фоне голубого неба и облаков",
            "drifts into Cyrillic",
        ),
        ("a cat, 一只小猫坐着", "drifts into Chinese characters (Han)"),  # most of its letters
        ("一只猫", "is in Chinese characters (Han)"),  # however short: the whole answer
    ],
    ids=["qwen-drift", "eight-han", "japanese-sentence", "cyrillic-clause", "mostly-chinese", "all-chinese"],
)
def test_a_run_of_another_script_long_enough_for_a_clause_is_refused(answer, said):
    reason = captioner.wrong_script(answer, ENGLISH)

    assert f"the answer {said}, which neither the prompt nor the trigger words" in reason
    assert "(--any-script keeps such answers)" in reason


def test_the_reason_quotes_the_run_shortened():
    reason = captioner.wrong_script("a sky, " + "蓝天白云" * 20, ENGLISH)

    assert "'蓝天白云蓝天白云" in reason and "\u2026'" in reason and len(reason) < 250


def test_a_script_the_prompt_or_the_trigger_words_use_is_kept():
    assert captioner.wrong_script("一只猫坐在窗台上，阳光明媚", "用一句话描述这张图片。") == ""
    assert captioner.wrong_script("Наташа Романова стоит на фоне неба", f"{ENGLISH} Наташа") == ""


# -- the run, through the real client -------------------------------------------------------


def drifting_first(clean: str = "A cat on a windowsill in the sun"):
    """The stand-in's answer: each picture's first answer drifts into Chinese, the next does not."""
    asked: dict = {}

    def answer(chat) -> str:
        width = chat.picture().width
        asked[width] = asked.get(width, 0) + 1
        return DRIFT if asked[width] == 1 else f"{clean}, {width} px wide"

    return answer


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_caption_that_drifts_into_chinese_is_asked_again_with_a_new_seed(tmp_path, caption, server, api):
    distinct_pictures(tmp_path, 3)
    server.answer = drifting_first()

    run = caption(tmp_path, "--seed", 7, *(["--api", "openai"] if api == "openai" else []))

    assert run.code == 0, run.err
    captions = {path.name: path.read_text() for path in tmp_path.glob("*.txt")}
    assert captions == {
        f"img00{i}.txt": f"A cat on a windowsill in the sun, {40 + i} px wide" for i in range(3)
    }
    chats = [chat for chat in server.chats if chat.picture().width in (40, 41, 42)]  # not the probe
    assert len(chats) == 6
    seeds = [chat.options.get("seed", chat.body.get("seed")) for chat in chats]
    assert sorted(seeds) == [7, 7, 7, 8, 8, 8]
    assert "FAILED" not in run.err


def test_an_answer_that_always_drifts_fails_naming_the_script(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: DRIFT

    run = caption(tmp_path)

    assert run.code == 1
    assert len(server.chats) == 4
    assert f"FAILED a.jpg: the answer {DRIFTED}: '阳光洒在它的身上，背景是蓝天白云'" in run.err
    assert "(after 4 tries)" in run.err
    assert not (tmp_path / "a.txt").exists()


def test_a_quoted_sign_and_japanese_names_are_kept(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    answer = "A noodle bar, a shop sign reading 拉面, a poster of 山田太郎 at 東京タワー"
    server.answer = lambda chat: answer

    run = caption(tmp_path)

    assert run.code == 0, run.err
    assert len(server.chats) == 1
    assert (tmp_path / "a.txt").read_text() == answer


def test_a_prompt_written_in_chinese_keeps_chinese_answers(tmp_path, caption, server):
    images = tmp_path / "images"
    picture(images / "a.jpg")
    prompt = tmp_path / "prompt-zh.txt"
    prompt.write_text("用一句话描述这张图片。", encoding="utf-8")
    server.answer = lambda chat: "一只猫坐在窗台上，阳光洒在它的身上，背景是蓝天白云"

    run = caption(images, "--prompt", prompt)

    assert run.code == 0, run.err
    assert server.chats[0].prompt == "用一句话描述这张图片。"
    assert len(server.chats) == 1
    assert (images / "a.txt").read_text() == "一只猫坐在窗台上，阳光洒在它的身上，背景是蓝天白云"


def test_trigger_words_in_a_script_keep_answers_in_it(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: "стоит на фоне голубого неба и белых облаков"

    run = caption(tmp_path, "--prefix", "Наташа")

    assert run.code == 0, run.err
    assert len(server.chats) == 1
    assert (tmp_path / "a.txt").read_text() == "Наташа, стоит на фоне голубого неба и белых облаков"


def test_any_script_keeps_a_drifting_answer(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    server.answer = lambda chat: DRIFT

    run = caption(tmp_path, "--any-script")

    assert run.code == 0, run.err
    assert len(server.chats) == 1
    assert (tmp_path / "a.txt").read_text() == DRIFT


def test_any_script_is_no_new_pass(tmp_path, caption, server):
    # It changes which answers are accepted, not what is written of them: a rerun with it goes on
    # with the pass (redoing only what failed), where a new pass would overwrite every caption.
    distinct_pictures(tmp_path, 3)
    for index in range(3):
        (tmp_path / f"img00{index}.txt").write_text("old tags")
    server.answer = lambda chat: DRIFT if chat.picture().width == 41 else "a cat"

    first = caption(tmp_path, "--existing", "overwrite")
    assert first.code == 1 and f"FAILED img001.png: the answer {DRIFTED}" in first.err
    server.chats.clear()
    rerun = caption(tmp_path, "--existing", "overwrite", "--any-script")

    assert rerun.code == 0, rerun.err
    assert [chat.picture().width for chat in server.chats] == [41]
    assert (tmp_path / "img001.txt").read_text() == DRIFT
