"""Benchmark: how busy the captioner keeps Ollama, and what it costs on the client.

    python tests/bench.py            # the whole table (about 4 minutes on 2 cores)
    python tests/bench.py --quick    # fewer images, same rows
    python tests/bench.py --script OTHER.py   # the same rows for another version of the script

The captioner runs as a real subprocess against stand-in servers (tests/stand_in_ollama.py)
whose every answer takes a fixed latency once it has one of the server's slots. The server's
capacity is then slots / latency images per second; throughput is measured on the server's
side, from the first request's arrival to the last answer, so interpreter start-up and folder
listing do not blur it (they are reported separately, as time to first request).
Figures are printed, not asserted: the tests check behaviour, this measures speed.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw
from stand_in_ollama import THINKING_MODEL, VISION_MODEL, StandInOllama

SCRIPT = Path(__file__).resolve().parent.parent / "llava-caption-ollama.py"  # or --script
CAPTION = "a red vintage car parked on a cobblestone street, warm evening light, film photograph"
LATENCY = 0.25


def photo(path: Path, size: tuple[int, int], seed: int, quality: int = 90) -> None:
    """A picture with some detail, so that decoding and encoding cost what photos cost."""
    image = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    draw = ImageDraw.Draw(image)
    width, height = size
    for shape in range(40):
        x, y = (seed * 7919 + shape * 104729) % width, (seed * 104723 + shape * 7927) % height
        colour = ((shape * 61 + seed) % 256, (shape * 17) % 256, (shape * 113 + seed) % 256)
        draw.ellipse([x, y, x + width // 5, y + height // 5], fill=colour)
    grain = Image.merge("RGB", [Image.effect_noise(size, 64)] * 3)  # camera noise: JPEGs of real size
    Image.blend(image, grain, 0.25).save(path, quality=quality)


def folder_of_photos(root: Path, name: str, count: int, size: tuple[int, int]) -> Path:
    folder = root / name
    folder.mkdir()
    template = folder / "template.jpg"
    photo(template, size, seed=1)
    for index in range(count):
        shutil.copyfile(template, folder / f"{index:05d}.jpg")
    template.unlink()
    return folder


def remove_captions(folder: Path) -> None:
    for caption in folder.glob("*.txt"):
        caption.unlink()


# The child's own peak RSS: a forked child's ru_maxrss starts from its parent's peak
# (getrusage(2): "the maximum resident set size ... of the parent at fork"), so the child
# reports its VmHWM itself as it exits.
RUN_AND_REPORT_PEAK = """
import atexit, runpy, sys
script, out = sys.argv[1], sys.argv[2]
def report():
    with open("/proc/self/status") as status, open(out, "w") as report:
        report.write(status.read())
atexit.register(report)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


script = SCRIPT


def run_captioner(folder: Path, servers: list[StandInOllama], jobs: int, *extra: str) -> dict:
    """Run the real script once; return its wall time, CPU seconds and peak RSS."""
    remove_captions(folder)
    hosts = [arg for server in servers for arg in ("--host", server.url)]
    status_file = folder.parent / "status.txt"
    arguments = [str(folder), *hosts, "--jobs", str(jobs), "-q", *extra]
    command = [sys.executable, "-c", RUN_AND_REPORT_PEAK, str(script), str(status_file), *arguments]
    started = time.monotonic()
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"the captioner failed:\n{process.stderr.decode()}")
    peak_kb = next(
        int(line.split()[1]) for line in status_file.read_text().splitlines() if line.startswith("VmHWM")
    )
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall": wall,
        "started": started,
        "cpu": usage.ru_utime + usage.ru_stime,  # all children so far: callers take differences
        "peak_rss_mb": peak_kb / 1024,
        "chats": [chat for server in servers for chat in server.chats],
    }


def served_rate(chats: list) -> float:
    window = max(chat.answered_at for chat in chats) - min(chat.received_at for chat in chats)
    return len(chats) / window


def servers_with(count: int, slots: int, latency: float = LATENCY) -> list[StandInOllama]:
    return [
        StandInOllama(slots=slots, latency=latency, answer=lambda chat: CAPTION).start() for _ in range(count)
    ]


def throughput_row(folder: Path, slots: int, jobs: int, servers: int = 1) -> tuple[float, float]:
    stand_ins = servers_with(servers, slots)
    try:
        result = run_captioner(folder, stand_ins, jobs)
    finally:
        for stand_in in stand_ins:
            stand_in.stop()
    rate = served_rate(result["chats"])
    capacity = servers * slots / LATENCY
    return rate, rate / capacity


def thinking_rows(root: Path, scale: int) -> None:
    """A model that can think, with thinking turned off (the default) and on (--think), against one
    that cannot: every token, thinking included, takes 10 ms, as on a GPU at 100 tokens/s."""
    folder = folder_of_photos(root, "thinking", max(4, 16 // scale), (800, 600))
    models = {"llava:13b": VISION_MODEL, "qwen3-vl:8b": THINKING_MODEL}
    rows = [("a model that cannot think", "llava:13b", ()), ("a thinking model (default)", "qwen3-vl:8b", ())]
    rows.append(("the thinking model with --think", "qwen3-vl:8b", ("--think",)))
    print("| model | images/s | thinking tokens sent |")
    print("|---|---:|---:|")
    for label, model, extra in rows:
        server = StandInOllama(
            models=models, slots=2, token_latency=0.01, answer=lambda chat: CAPTION
        ).start()
        try:
            result = run_captioner(folder, [server], 2, "--model", model, *extra)
        finally:
            server.stop()
        thinking = sum(chat.thinking_sent for chat in result["chats"])
        print(f"| {label} | {served_rate(result['chats']):.2f} | {thinking} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per row")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the captioner to measure")
    args = parser.parse_args()
    global script
    script = args.script.resolve()
    scale = 4 if args.quick else 1
    root = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    try:
        report(root, scale)
    finally:
        shutil.rmtree(root)


def report(root: Path, scale: int) -> None:
    print(f"stand-in latency {LATENCY} s per answer; capacity = slots / latency; 1600x1200 JPEG photos")
    print()
    print("| server slots | --jobs | images | images/s | share of capacity | --jobs 1 images/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for slots in (1, 4, 8):
        count = 40 * slots // scale
        folder = folder_of_photos(root, f"slots{slots}", count, (1600, 1200))
        rate, share = throughput_row(folder, slots, jobs=slots + 1)
        baseline_folder = folder_of_photos(root, f"baseline{slots}", max(8, 40 // scale), (1600, 1200))
        baseline, _ = throughput_row(baseline_folder, slots, jobs=1)
        print(
            f"| {slots} | {slots + 1} | {count} | {rate:.2f} | {share:.1%} | {baseline:.2f} | {rate / baseline:.2f}x |"
        )
    print()

    thinking_rows(root, scale)

    folder = folder_of_photos(root, "two", 160 // scale, (1600, 1200))
    one, _ = throughput_row(folder, slots=4, jobs=5, servers=1)
    two, share = throughput_row(folder, slots=4, jobs=5, servers=2)
    print(
        f"two servers (4 slots each, --jobs 5): {two:.2f} images/s against {one:.2f} with one: {two / one:.2f}x"
    )
    print(f"  ({share:.1%} of the two servers' capacity)")
    print()

    big = folder_of_photos(root, "big", 20 // scale, (6000, 4000))
    original = (big / "00000.jpg").stat().st_size
    fast = servers_with(1, slots=4, latency=0.0)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        result = run_captioner(big, fast, 4)
    finally:
        fast[0].stop()
    result["cpu"] -= cpu_before.ru_utime + cpu_before.ru_stime
    sent = sum(len(base64.b64encode(chat.images[0])) for chat in result["chats"]) / len(result["chats"])
    print(
        f"6000x4000 JPEG ({original:,} bytes on disk, {len(base64.b64encode(b'x' * original)):,} as base64):"
    )
    print(
        f"  base64 bytes sent per image: {sent:,.0f}  ({len(base64.b64encode(b'x' * original)) / sent:.1f}x less)"
    )
    print(
        f"  client CPU per image: {result['cpu'] / len(result['chats']):.3f} s (whole process, start-up included)"
    )
    print()

    many = root / "many"
    many.mkdir()
    Image.new("RGB", (64, 48), "red").save(many / "template.png")
    count = 20000 // scale
    for index in range(count):
        os.link(many / "template.png", many / f"{index:05d}.png")
    (many / "template.png").unlink()
    fast = servers_with(1, slots=8, latency=0.0)
    try:
        result = run_captioner(many, fast, 9)
    finally:
        fast[0].stop()
    first = min(chat.received_at for chat in result["chats"]) - result["started"]
    print(f"folder of {count:,} small images:")
    print(f"  first request {first:.2f} s after the command started (interpreter start-up included)")
    print(
        f"  peak RSS {result['peak_rss_mb']:.0f} MB; {count / result['wall']:.0f} images/s with an instant server"
    )
    baseline = run_captioner(many, fast, 9, "--dry-run")["peak_rss_mb"]
    print(f"  (a --dry-run over the same folder, which imports everything and lists it: {baseline:.0f} MB)")


if __name__ == "__main__":
    main()
