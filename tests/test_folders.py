"""Several folders in one run, per-folder prompts and trigger words, and the invocations of a
shell loop that find nothing to do."""

from __future__ import annotations

import subprocess
import sys
import threading

from conftest import (
    SCRIPT,
    as_from_a_terminal,
    child_environment,
    closed_port_url,
    distinct_pictures,
    picture,
)


def datasets(root, *names: str, count: int = 2) -> list:
    folders = []
    for offset, name in enumerate(names):
        folder = root / name
        for index in range(count):
            picture(folder / f"img{index}.png", size=(40 + 10 * offset + index, 32))
        folders.append(folder)
    return folders


def test_several_folders_are_captioned_in_one_run_with_a_line_each_in_the_summary(tmp_path, caption, server):
    first, second = datasets(tmp_path, "10_cat", "5_dog")
    (second / "img0.txt").write_text("already captioned")

    run = caption(first, second)

    assert run.code == 0, run.err
    assert (first / "img1.txt").read_text() == "A PNG picture, 41x32 pixels."
    assert (second / "img1.txt").read_text() == "A PNG picture, 51x32 pixels."
    assert (second / "img0.txt").read_text() == "already captioned"
    assert "3 to caption, 1 already captioned" in run.err
    assert f"  {first}: captioned 2, skipped 0, failed 0\n" in run.err
    assert f"  {second}: captioned 1, skipped 1, failed 0\n" in run.err
    assert "] 10_cat/img0.png " in run.err  # named from the folder they share


def test_the_server_does_not_drain_between_folders(tmp_path, make_server, caption):
    # Each folder has a single image: were the folders run one after the other, the second
    # image would wait for the first answer.
    server = make_server(slots=2)
    first, second = datasets(tmp_path, "a", "b", count=1)
    both_in_flight = threading.Barrier(2, timeout=10)  # neither is answered until both are asked

    def answer(chat) -> str:
        both_in_flight.wait()
        return "A dog"

    server.answer = answer

    run = caption(first, second, "--jobs", 2, host=server.url)

    assert run.code == 0, run.err
    assert not both_in_flight.broken and server.most_in_flight == 2
    assert [path for _, _, path in server.requests].count("/api/tags") == 1  # one preflight for the run


def test_a_file_among_several_folders_is_named_and_nothing_is_sent(tmp_path, caption, server):
    first, second = datasets(tmp_path, "a", "b")
    notes = tmp_path / "notes.md"
    notes.write_text("what a shell glob such as datasets/* also picks up")

    result = caption(first, second, notes)

    assert result.code == 2
    assert result.err == (
        f"error: {notes} is not a folder; with several folders, give the prompt file as --prompt FILE\n"
    )
    assert server.requests == []


def test_a_folder_and_a_file_stay_the_old_form_and_prompt_also_works_with_one_folder(
    tmp_path, caption, server
):
    (folder,) = datasets(tmp_path, "a", count=1)
    (tmp_path / "tags.txt").write_text("List booru tags.")

    assert caption(folder, "--prompt", tmp_path / "tags.txt").code == 0
    assert caption(folder, "-r", tmp_path / "tags.txt", "--existing", "overwrite").code == 0
    assert [chat.prompt for chat in server.chats] == ["List booru tags.", "List booru tags."]


def test_several_folders_take_the_prompt_from_the_prompt_option(tmp_path, caption, server):
    folders = datasets(tmp_path, "a", "b", "c", count=1)
    (tmp_path / "tags.txt").write_text("Tags for {folder}/{name}.")

    run = caption(*folders, "--prompt", tmp_path / "tags.txt")

    assert run.code == 0, run.err
    assert sorted(chat.prompt for chat in server.chats) == [
        "Tags for a/img0.",
        "Tags for b/img0.",
        "Tags for c/img0.",
    ]


def test_a_folder_given_twice_is_captioned_once(tmp_path, caption, server):
    (folder,) = datasets(tmp_path, "a")
    run = caption(folder, f"{folder}/", folder / ".." / "a")
    assert run.code == 0, run.err
    assert len(server.chats) == 2


def test_a_folder_inside_another_with_recursive_is_refused(tmp_path, caption, server):
    outer, _ = datasets(tmp_path, "a", "a/b")
    run = caption(outer, outer / "b", "-r")
    assert run.code == 2
    assert f"{outer / 'b'} is inside {outer}, which --recursive already covers" in run.err
    assert server.requests == []


def test_prefix_and_suffix_take_the_prompt_placeholders(tmp_path, caption):
    cats, dogs = datasets(tmp_path, "10_cat", "5_dog", count=1)

    run = caption(cats, dogs, "--prefix", "{class}", "--suffix", "from {folder}")

    assert run.code == 0, run.err
    assert (cats / "img0.txt").read_text() == "cat, A PNG picture, 40x32 pixels., from 10_cat"
    assert (dogs / "img0.txt").read_text() == "dog, A PNG picture, 50x32 pixels., from 5_dog"


def test_a_prefix_with_an_unknown_placeholder_stops_the_run(tmp_path, caption, server):
    datasets(tmp_path, "a")
    run = caption(tmp_path / "a", "--prefix", "{trigger}")
    assert run.code == 2
    assert "--prefix asks for {trigger}, which is not one of" in run.err
    assert server.requests == []


def test_a_folder_carries_its_own_prompt_for_its_images_and_those_below(tmp_path, caption, server):
    own, plain = datasets(tmp_path, "own", "plain", count=1)
    picture(own / "deeper" / "inner.png", size=(70, 32))
    (own / ".prompt").write_text("Describe the {class}.")

    run = caption(own, plain, "-r", "--folder-prompt", ".prompt")

    assert run.code == 0, run.err
    prompts = {chat.picture().width: chat.prompt for chat in server.chats}
    default = (SCRIPT.parent / "prompt.txt").read_text(encoding="utf-8").strip()
    assert prompts == {40: "Describe the own.", 70: "Describe the deeper.", 50: default}


def test_a_changed_folder_prompt_makes_a_pass_caption_that_folder_again(tmp_path, caption, server):
    own, plain = datasets(tmp_path, "own", "plain", count=1)
    (own / "prompt.md").write_text("Describe it.")
    arguments = [own, plain, "--folder-prompt", "prompt.md", "--existing", "overwrite"]
    assert caption(*arguments).code == 0
    assert caption(*arguments).code == 0  # the same pass: nothing to do
    assert len(server.chats) == 2

    (own / "prompt.md").write_text("Describe it in ten words.")
    assert caption(*arguments).code == 0

    assert len(server.chats) == 3 and server.chats[-1].prompt == "Describe it in ten words."


def test_an_unusable_folder_prompt_leaves_that_folder_out_and_the_run_goes_on(tmp_path, caption, server):
    broken, plain = datasets(tmp_path, "broken", "plain", count=1)
    (broken / "prompt.md").write_text("Describe the {colour}.")

    run = caption(broken, plain, "--folder-prompt", "prompt.md")

    assert run.code == 1
    assert "FAILED broken: prompt file" in run.err and "asks for {colour}" in run.err
    assert [chat.picture().width for chat in server.chats] == [50]


def test_an_image_only_lists_in_a_folder_left_out_is_said_to_be_there_not_missing(tmp_path, caption, server):
    """--only names an image of a folder the run leaves out (its folder prompt cannot be used): the
    image fails naming that folder, whose own line says why, not as an image that is not there."""
    broken, plain = datasets(tmp_path, "broken", "plain", count=1)
    (broken / "prompt.md").write_text("Describe the {colour}.")
    redo = tmp_path / "redo.txt"
    redo.write_text(
        "".join(f"{path}\n" for path in [*broken.glob("*.png"), *plain.glob("*.png"), tmp_path / "gone.png"])
    )

    run = caption(broken, plain, "--folder-prompt", "prompt.md", "--only", redo)

    assert run.code == 1
    assert "FAILED broken: prompt file " in run.err
    assert "FAILED broken/img0.png: listed by --only, but its folder broken is left out\n" in run.err
    assert "FAILED gone.png: listed by --only, but not found in the folders given\n" in run.err
    assert "img0.png: listed by --only, but not found" not in run.err
    assert [chat.picture().width for chat in server.chats] == [50]


def test_an_image_whose_caption_would_be_the_folder_prompt_is_not_captioned(tmp_path, caption, server):
    picture(tmp_path / "prompt.png")
    (tmp_path / "prompt.txt").write_text("Describe it.")
    run = caption(tmp_path, "--folder-prompt", "prompt.txt", "--existing", "overwrite")
    assert run.code == 1
    assert "FAILED prompt.png: its caption would overwrite the folder's prompt file prompt.txt" in run.err
    assert (tmp_path / "prompt.txt").read_text() == "Describe it."


def test_nothing_to_caption_contacts_no_server_and_imports_no_client(tmp_path):
    expected = distinct_pictures(tmp_path, 3)
    for caption_file, text in expected.items():
        caption_file.write_text(text)
    # The script run as __main__, then asked what it imported.
    check = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, {str(tmp_path)!r}, '--host', {closed_port_url()!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, sorted({'ollama', 'httpx', 'PIL'} & sys.modules.keys()))\n"
    )

    result = run_script_code(check)

    assert result.stdout == "0 []\n", result.stderr
    assert result.stderr == "captioned 0, skipped 3, failed 0 in 0s (0.00 images/s)\n"


def test_nothing_to_caption_but_images_planning_failed_exits_1_without_a_server(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "a.png")
    result = caption(tmp_path, host=closed_port_url())
    assert result.code == 1
    assert "a.jpg: shares a.txt with a.png" in result.err
    assert "cannot reach" not in result.err


def run_script_code(code: str) -> subprocess.CompletedProcess:
    with as_from_a_terminal():
        return subprocess.run(
            [sys.executable, "-c", code],
            env=child_environment(None),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_the_old_form_says_which_file_it_took_for_the_prompt(tmp_path, caption):
    (folder,) = datasets(tmp_path, "a", count=1)
    notes = tmp_path / "notes.md"
    notes.write_text("what a glob over one folder and one file gives")
    result = caption(folder, notes)
    assert result.code == 0
    assert result.err.startswith(f"using the prompt file {notes}\n")


def test_a_folder_given_and_also_reached_through_a_link_is_captioned_as_given(tmp_path, caption, server):
    first, second = datasets(tmp_path, "a", "b", count=1)
    (first / "link").symlink_to(second)

    run = caption(first, second, "-r")

    assert run.code == 0, run.err
    assert sorted(chat.picture().width for chat in server.chats) == [40, 50]
    assert f"  {second}: captioned 1, skipped 0, failed 0\n" in run.err


def test_images_are_named_from_the_folder_the_folders_share_as_given_dot_dot_and_all(
    tmp_path, caption, server, monkeypatch
):
    """A folder given through "..": its images are named from the folders' shared path as given,
    ".." kept (a link before it would make "e/bad.png" another file than the one meant), and the
    failures listed a folder after the other."""
    monkeypatch.chdir(tmp_path)
    here, there = tmp_path / "d" / "a", tmp_path / "e"
    picture(here / "z.png")
    for folder in (here, there):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bad.png").write_bytes(b"not a picture")

    run = caption("d/a", "d/a/../../e")

    assert run.code == 1, run.err
    failed = [line.split(":")[0] for line in run.err.splitlines() if line.startswith("  failed ")]
    assert failed == ["  failed ../../e/bad.png", "  failed bad.png"]


def test_every_folder_has_its_summary_line_in_the_order_given(tmp_path, caption):
    first, empty, last = tmp_path / "z", tmp_path / "empty", tmp_path / "a"
    datasets(tmp_path, "z", "a", count=1)
    empty.mkdir()
    run = caption(first, empty, last)
    assert run.code == 0, run.err
    lines = [line for line in run.err.splitlines() if line.startswith(f"  {tmp_path}")]
    assert lines == [
        f"  {first}: captioned 1, skipped 0, failed 0",
        f"  {empty}: captioned 0, skipped 0, failed 0",
        f"  {last}: captioned 1, skipped 0, failed 0",
    ]


def test_existing_in_a_folder_prompt_or_a_prefix_is_the_caption_there(tmp_path, caption, server):
    (folder,) = datasets(tmp_path, "a", count=1)
    (folder / "img0.txt").write_text("old tags")
    (folder / ".prompt").write_text("Refine: {existing}")

    run = caption(
        folder, "--folder-prompt", ".prompt", "--existing", "overwrite", "--suffix", "was {existing}"
    )

    assert run.code == 0, run.err
    assert server.chats[0].prompt == "Refine: old tags"
    assert (folder / "img0.txt").read_text() == "A PNG picture, 40x32 pixels., was old tags"


def test_a_read_only_folder_among_several_fails_its_images_and_the_others_are_captioned(
    tmp_path, small_disk, caption, server
):
    (folder,) = datasets(tmp_path, "a", count=1)
    picture(small_disk / "b.png", size=(60, 32))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    run = caption(folder, small_disk)

    assert run.code == 1
    assert f"FAILED disk/b.png: cannot write in {small_disk}: Read-only file system" in run.err
    assert (folder / "img0.txt").exists()
    assert [chat.picture().width for chat in server.chats] == [40]


def test_a_folder_prompt_name_of_an_image_or_of_the_tools_own_files_is_refused(tmp_path, caption, server):
    datasets(tmp_path, "a", count=1)
    for name in ("cover.jpg", ".llava-caption-ollama.lock"):
        run = caption(tmp_path / "a", "--folder-prompt", name)
        assert run.code == 2 and f"--folder-prompt {name}: " in run.err
    assert server.requests == []
