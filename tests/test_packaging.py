"""The script as a file people copy or run with `uv run`: its inline metadata (PEP 723), and a
copy of it alone, without prompt.txt beside it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import SCRIPT, captioner, child_environment, distinct_pictures, run_script


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


# --- Ray: an optional dependency, imported only by a run with --ray --------------------------

WITHOUT_RAY = str(SCRIPT.parent / "tests" / "without_ray")


def test_a_run_without_ray_never_imports_it(tmp_path, server):
    """Ray takes seconds to import; a run without --ray must not pay for it, installed or not."""
    expected = distinct_pictures(tmp_path / "images", 2)
    modules = tmp_path / "modules.txt"
    # The script run as __main__, as from a shell; at its exit, the modules it had imported.
    program = (
        "import runpy, sys\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "finally:\n"
        f"    open({str(modules)!r}, 'w').write('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, tmp_path / "images", "--host", server.url],
        env=child_environment({}),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert all(path.exists() for path in expected)
    imported = modules.read_text().splitlines()
    assert "PIL.Image" in imported  # the list is the run's
    assert not [name for name in imported if name == "ray" or name.startswith("ray.")]


def test_ray_missing_says_the_one_command_that_installs_it(tmp_path, server):
    distinct_pictures(tmp_path / "images", 1)
    env = child_environment({"PYTHONPATH": WITHOUT_RAY})
    done = subprocess.run(
        [sys.executable, str(SCRIPT), tmp_path / "images", "--host", server.url, "--ray", "local"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith('--ray needs Ray, which is not installed; run: pip install "ray[client]>=2.60,<2.61"')
    )
    assert "Traceback" not in done.stderr


def test_a_nodes_own_server_needs_ray(tmp_path):
    distinct_pictures(tmp_path / "images", 1)
    done = run_script(tmp_path / "images", "--host", "local:11434")
    assert done.returncode == 2
    assert "--host local:PORT is each Ray node's own server: it needs --ray" in done.stderr


def test_an_empty_ray_address_is_refused_not_taken_as_no_ray(tmp_path, server, caption):
    """--ray "$RAY_HEAD" with the variable unset must not caption on this machine instead."""
    distinct_pictures(tmp_path / "images", 1)

    run = caption(tmp_path / "images", "--ray", "")

    assert run.code == 2
    assert "argument --ray: give auto, local, ray://HOST:10001 or HOST:6379" in run.err
    assert not server.chats
