"""CI's check of `uv run`: the script copied alone into an empty folder, run by uv (which
installs what its inline metadata asks for into a cache of its own), captions a folder against
the stand-in server. Exit 0 when it did. Needs uv on PATH (pip install uv).

    python tests/copied_alone.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SCRIPT, distinct_pictures
from stand_in_ollama import StandInOllama


def main() -> int:
    server = StandInOllama().start()
    try:
        with tempfile.TemporaryDirectory(prefix="copied-alone-") as scratch:
            alone = Path(scratch) / "bin" / SCRIPT.name
            alone.parent.mkdir()
            shutil.copy(SCRIPT, alone)
            expected = distinct_pictures(Path(scratch) / "images", 2)
            run = subprocess.run(
                [
                    "uv",
                    "run",
                    "--no-project",
                    str(alone),
                    str(Path(scratch) / "images"),
                    "--host",
                    server.url,
                ],
                cwd=alone.parent,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            written = {path: path.read_text() for path in expected if path.exists()}
            if run.returncode != 0 or written != expected:
                print(
                    f"uv run of the script alone failed (exit {run.returncode}):\n{run.stderr}",
                    file=sys.stderr,
                )
                return 1
            print(f"uv run of the script copied alone: captioned {len(written)} images, exit 0")
            return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
