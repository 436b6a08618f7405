"""The script as a file people copy or run with `uv run`: its inline metadata (PEP 723), and a
copy of it alone, without prompt.txt beside it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import SCRIPT, captioner, child_environment, distinct_pictures


def inline_metadata() -> str:
    text = SCRIPT.read_text(encoding="utf-8")
    block = re.search(r"^# /// script$\n(.*?)^# ///$", text, re.MULTILINE | re.DOTALL)
    assert block, "no PEP 723 block"
    return "\n".join(line.removeprefix("#").removeprefix(" ") for line in block[1].splitlines())


def test_the_inline_dependencies_are_those_of_requirements_txt():
    inline = set(re.findall(r'^\s*"([^"]+)",?$', inline_metadata(), re.MULTILINE))
    listed = {
        line.split("#")[0].strip().replace(" ", "")
        for line in (SCRIPT.parent / "requirements.txt").read_text(encoding="utf-8").splitlines()
    } - {""}
    assert {dependency.replace(" ", "") for dependency in inline} == listed
    assert 'requires-python = ">=3.10"' in inline_metadata()


def test_the_built_in_prompt_is_prompt_txt():
    assert captioner.BUILT_IN_PROMPT == (SCRIPT.parent / "prompt.txt").read_text(encoding="utf-8").strip()


def test_a_copy_of_the_script_alone_captions_with_the_default_prompt(tmp_path, server):
    alone = tmp_path / "bin" / SCRIPT.name
    alone.parent.mkdir()
    shutil.copy(SCRIPT, alone)
    expected = distinct_pictures(tmp_path / "images", 2)

    result = subprocess.run(
        [sys.executable, str(alone), str(tmp_path / "images"), "--host", server.url],
        env=child_environment(None),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert {path: path.read_text() for path in expected} == expected
    assert {chat.prompt for chat in server.chats} == {captioner.BUILT_IN_PROMPT}
