"""Benchmark: how busy the captioner keeps Ollama, and what it costs on the client.

    python tests/bench.py            # the whole table (about 6 minutes on 2 cores: 2 of them the pace)
    python tests/bench.py --quick    # fewer images, same rows
    python tests/bench.py --script OTHER.py   # the same rows for another version of the script
    python tests/bench.py --ray      # only the rows of --ray local against the threaded client
    python tests/bench.py --rows slots,two-servers   # only some groups of rows (--help lists them)

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


def api_rows(root: Path, scale: int) -> None:
    """The same 4-slot stand-in through each API, and what --jobs keeps 8 slots full."""
    folder = folder_of_photos(root, "apis", 160 // scale, (1600, 1200))
    print("| API | --jobs | images/s | share of capacity |")
    print("|---|---:|---:|---:|")
    for label, flavour, extra in (
        ("Ollama", "", ()),
        ("OpenAI-compatible (vLLM's shapes)", "vllm", ("--api", "openai")),
    ):
        settings = {"flavour": flavour} if flavour else {}
        stand_in = StandInOllama(slots=4, latency=LATENCY, answer=lambda chat: CAPTION, **settings).start()
        try:
            result = run_captioner(folder, [stand_in], 5, *extra)
        finally:
            stand_in.stop()
        chats = [chat for chat in result["chats"] if chat.picture().size != (64, 64)]  # not the probe
        rate = served_rate(chats)
        print(f"| {label} | 5 | {rate:.2f} | {rate / (4 / LATENCY):.1%} |")
    print()
    print("--jobs against an 8-slot OpenAI-compatible stand-in (share of capacity):")
    shares = []
    for jobs in (6, 8, 9, 10, 12):
        stand_in = StandInOllama(
            slots=8, latency=LATENCY, answer=lambda chat: CAPTION, flavour="vllm"
        ).start()
        try:
            result = run_captioner(folder, [stand_in], jobs, "--api", "openai")
        finally:
            stand_in.stop()
        chats = [chat for chat in result["chats"] if chat.picture().size != (64, 64)]
        shares.append(f"--jobs {jobs}: {served_rate(chats) / (8 / LATENCY):.1%}")
    print("  " + "; ".join(shares))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per row")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the captioner to measure")
    parser.add_argument("--ray", action="store_true", help="only the rows of --ray local (needs Ray)")
    parser.add_argument(
        "--rows", type=lambda text: text.split(","), help=f"only these groups of rows: {', '.join(ROWS)}"
    )
    args = parser.parse_args()
    if args.rows and set(args.rows) - set(ROWS):
        parser.error(f"--rows: no such group: {', '.join(sorted(set(args.rows) - set(ROWS)))}")
    global script
    script = args.script.resolve()
    scale = 4 if args.quick else 1
    root = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    try:
        report(root, scale, ["ray"] if args.ray else args.rows or list(ROWS))
    finally:
        shutil.rmtree(root)


def slots_rows(root: Path, scale: int) -> None:
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


def two_servers_row(root: Path, scale: int) -> None:
    folder = folder_of_photos(root, "two", 160 // scale, (1600, 1200))
    one, _ = throughput_row(folder, slots=4, jobs=5, servers=1)
    two, share = throughput_row(folder, slots=4, jobs=5, servers=2)
    print(
        f"two servers (4 slots each, --jobs 5): {two:.2f} images/s against {one:.2f} with one: {two / one:.2f}x"
    )
    print(f"  ({share:.1%} of the two servers' capacity)")
    print()


def report(root: Path, scale: int, rows: list[str]) -> None:
    for name in rows:
        ROWS[name](root, scale)


def pace_rows(root: Path, scale: int) -> None:
    """The pace against a real minute (the tests check it in seconds): --rpm 60, and a stand-in
    whose headers say it takes 30 requests a minute; the most requests any 60 s held, and 429s."""
    count = 40 // scale  # some 40 s and 80 s
    folder = folder_of_photos(root, "pace", count, (640, 480))
    print("| limit | images | requests in the busiest 60 s | requests/min overall | 429s |")
    print("|---|---:|---:|---:|---:|")
    for label, settings, extra in (
        ("--rpm 60", {}, ("--rpm", "60")),
        ("server: 30 a minute (x-ratelimit-*)", {"rate_limit": (30, 10**9)}, ()),
    ):
        stand_in = StandInOllama(slots=4, answer=lambda chat: CAPTION, flavour="vllm", **settings).start()
        try:
            result = run_captioner(folder, [stand_in], 4, "--api", "openai", *extra)
        finally:
            stand_in.stop()
        times = sorted(chat.received_at for chat in result["chats"])
        busiest = max(sum(1 for t in times if start <= t < start + 60) for start in times)
        overall = 60 * (len(times) - 1) / (times[-1] - times[0])
        print(f"| {label} | {count} | {busiest} | {overall:.1f} | {len(stand_in.refused_for_rate)} |")
    print()


def styles_rows(root: Path, scale: int) -> None:
    """Two styles per image (--also): each image prepared once, its two requests back to back;
    requests served against the server's capacity, with the second style's prompt asking for the
    first's caption ({caption:.tags}: sent only once that answer is in) and without."""
    count = 80 // scale
    folder = folder_of_photos(root, "styles", count, (1600, 1200))
    prompts = root / "style-prompts"
    prompts.mkdir()
    (prompts / "tags.txt").write_text("List tags.")
    (prompts / "long.txt").write_text("Describe it.")
    (prompts / "grounded.txt").write_text("Describe it, with these tags: {caption:.tags}")
    print("| two styles per image, 4 slots, --jobs 5 | images | requests/s | share of capacity |")
    print("|---|---:|---:|---:|")
    for label, prompt in (
        ("independent", "long.txt"),
        ("the second asks for the first's caption", "grounded.txt"),
    ):
        for tags in folder.glob("*.tags"):
            tags.unlink()
        stand_in = servers_with(1, slots=4)
        try:
            result = run_captioner(
                folder,
                stand_in,
                5,
                "--prompt",
                str(prompts / prompt),
                "--also",
                f"{prompts / 'tags.txt'}:.tags",
            )
        finally:
            stand_in[0].stop()
        rate = served_rate(result["chats"])
        print(f"| {label} | {count} | {rate:.2f} | {rate / (4 / LATENCY):.1%} |")
    print()


def several_folders_rows(root: Path, scale: int) -> None:
    """The README's shell loop, one invocation per folder, against one run over every folder."""
    count, size = 20 // (2 if scale > 1 else 1), 30 // scale
    folders = []
    for index in range(count):
        folders.append(folder_of_photos(root, f"loop{index:02d}", size, (800, 600)))
    capacity = 4 / LATENCY
    rates = {}
    for label in ("loop", "one run"):
        stand_in = servers_with(1, slots=4)
        try:
            if label == "loop":
                for folder in folders:
                    run_captioner(folder, stand_in, 5)
            else:
                for folder in folders:
                    remove_captions(folder)
                run_captioner(folders[0], stand_in, 5, *map(str, folders[1:]))
            rates[label] = served_rate(stand_in[0].chats)
        finally:
            stand_in[0].stop()
    print(f"{count} folders x {size} images, 4 slots x {LATENCY} s, --jobs 5:")
    print(
        f"  a shell loop, one run per folder: {rates['loop']:.2f} images/s, {rates['loop'] / capacity:.1%} of capacity"
    )
    print(
        f"  one run over every folder:        {rates['one run']:.2f} images/s, "
        f"{rates['one run'] / capacity:.1%} of capacity ({rates['one run'] / rates['loop']:.2f}x)"
    )
    print()


# The captioner's own preparation path, as its pipeline runs it: a pool as large as the CPUs
# this process may use, each image opened, shrunk and encoded by prepare_image().
PREPARE_ALONE = """
import importlib.util, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
spec = importlib.util.spec_from_file_location("captioner", sys.argv[1])
captioner = importlib.util.module_from_spec(spec)
sys.modules["captioner"] = captioner
spec.loader.exec_module(captioner)
images = sorted(Path(sys.argv[2]).iterdir())
started = time.monotonic()
with ThreadPoolExecutor(captioner.usable_cpus()) as pool:
    list(pool.map(lambda image: captioner.prepare_image(image, 1344), images))
print(len(images) / (time.monotonic() - started))
"""


def preparation_rows(root: Path, scale: int) -> None:
    """Image preparation alone (no server), on one core and on every core (taskset)."""
    if not shutil.which("taskset"):
        print("(taskset is not installed: no preparation rows)")
        return
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    print(f"image preparation alone, the captioner's own path and pool (images/s), 1 core vs {cores}:")
    print("| input | 1 core | all cores | ratio |")
    print("|---|---:|---:|---:|")
    for label, ext, size in INPUT_TYPES:
        folder = folder_of_inputs(root, f"prepare-{ext}", ext, size, max(6, 24 // scale))
        rates = []
        for cpus in ("0", cores):
            command = ["taskset", "-c", cpus, sys.executable, "-c", PREPARE_ALONE, str(script), str(folder)]
            rates.append(float(subprocess.run(command, capture_output=True, check=True, text=True).stdout))
        print(f"| {label} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |")
    print()


INPUT_TYPES = [
    ("24 MP JPEG", "jpg", (6000, 4000)),
    ("20 MP PNG", "png", (5472, 3648)),
    ("12 MP WebP", "webp", (4240, 2832)),
]


def folder_of_inputs(root: Path, name: str, ext: str, size: tuple[int, int], count: int) -> Path:
    folder = root / name
    folder.mkdir()
    template = folder / f"template.{ext}"
    photo(template, size, seed=3)
    for index in range(count):
        os.link(template, folder / f"{index:05d}.{ext}")
    template.unlink()
    return folder


def input_type_rows(root: Path, scale: int) -> None:
    """What the client can prepare per second, by input type, against a server that answers at
    once (8 slots): the ceiling a fast GPU would meet."""
    print(f"client ceiling against an instant server (8 slots, --jobs 9), {os.cpu_count()} cores:")
    print("| input | images | images/s | client CPU per image (start-up included) | base64 bytes sent |")
    print("|---|---:|---:|---:|---:|")
    for label, ext, size in INPUT_TYPES:
        count = max(8, 48 // scale)
        folder = folder_of_inputs(root, f"input-{ext}", ext, size, count)
        stand_in = servers_with(1, slots=8, latency=0.0)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            result = run_captioner(folder, stand_in, 9)
        finally:
            stand_in[0].stop()
        cpu = result["cpu"] - (before.ru_utime + before.ru_stime)
        on_disk = len(base64.b64encode(b"x" * next(folder.iterdir()).stat().st_size))
        sent = sum(len(base64.b64encode(chat.images[0])) for chat in result["chats"]) / count
        print(
            f"| {label} | {count} | {served_rate(result['chats']):.1f} | {cpu / count * 1000:.0f} ms "
            f"| {sent:,.0f} ({on_disk / sent:.0f}x less) |"
        )
    print()


def huge_folder_rows(root: Path, scale: int) -> None:
    """A folder of 100,000 small images: how soon the first request goes, the memory the run
    takes, and whether writing keeps up with a server that answers at once."""
    many = root / "many"
    many.mkdir()
    count = 100_000 // scale
    templates = []
    for index in range(2):  # a file has at most 65,000 links on ext4
        templates.append(many / f"template{index}.png")
        Image.new("RGB", (64, 48), "red").save(templates[-1])
    for index in range(count):
        os.link(templates[index % 2], many / f"{index:06d}.png")
    for template in templates:
        template.unlink()
    fast = servers_with(1, slots=8, latency=0.0)
    wall_minus_monotonic = time.time() - time.monotonic()
    try:
        result = run_captioner(many, fast, 9)
    finally:
        fast[0].stop()
    first = min(chat.received_at for chat in result["chats"]) - result["started"]
    last_answer = max(chat.answered_at for chat in result["chats"]) + wall_minus_monotonic
    with os.scandir(many) as listing:
        last_written = max(entry.stat().st_mtime for entry in listing if entry.name.endswith(".txt"))
    print(f"folder of {count:,} small images, instant server (8 slots, --jobs 9):")
    print(f"  first request {first:.2f} s after the command started (interpreter start-up included)")
    print(f"  peak RSS {result['peak_rss_mb']:.0f} MB; {count / result['wall']:.0f} images/s")
    print(f"  writer lag: last caption written {last_written - last_answer:.2f} s after the last answer")
    baseline = run_captioner(many, fast, 9, "--dry-run")["peak_rss_mb"]
    print(f"  (a --dry-run over the same folder, which lists it and imports no client: {baseline:.0f} MB)")
    print()


# Timed inside the page, layout included: what a person waits for after a click.
TIMED_ACTION = """
const start = performance.now();
eval(arguments[0]);
document.body.offsetHeight;
return performance.now() - start;
"""
REVIEW_ACTIONS = {
    "next page": "document.getElementById('page-next').click()",
    "sort by length": "const s = document.getElementById('sort'); s.value = 'length'; s.dispatchEvent(new Event('change'))",
    # Over every caption (no search or filter yet): a preview, then the replace in each caption that
    # has the word, kept in the browser's storage.
    "find & replace preview": "document.getElementById('find').value = 'street'; document.getElementById('replace-with').value = 'road'; document.getElementById('preview-replace').click()",
    "replace": "document.getElementById('apply-replace').click()",
    "search": "const b = document.getElementById('search'); b.value = 'cobblestone'; b.dispatchEvent(new Event('input'))",
    "filter": "document.querySelector('#filters input[data-group=\"flag\"]').click()",
}


def review_rows(root: Path, scale: int) -> None:
    """The review page of a folder of 20,000 captioned images (--review with --dry-run), opened
    from file:// in headless Chromium: how long it takes to open and to answer each action."""
    from browser import open_page, start_chromium

    folder = root / "review"
    folder.mkdir()
    count = 20_000 // scale
    template = folder / "template.png"
    Image.new("RGB", (64, 48), "red").save(template)
    words = ["red", "car", "street", "evening", "light", "old", "film", "photograph", "parked", "cobblestone"]
    for index in range(count):
        os.link(template, folder / f"{index:05d}.png")
        caption = ", ".join(words[(index + k) % len(words)] for k in range(3 + index % 20))
        (folder / f"{index:05d}.txt").write_text(caption)
    template.unlink()
    page = root / "review.html"
    started = time.monotonic()
    command = [sys.executable, str(script), str(folder), "--review", str(page), "--dry-run", "-q"]
    subprocess.run(command, capture_output=True, check=True)
    written = time.monotonic() - started
    driver = start_chromium(root / "downloads")
    try:
        started = time.monotonic()
        open_page(driver, page, seconds=60)
        opened = time.monotonic() - started
        timings = {
            name: driver.execute_script(TIMED_ACTION, action) for name, action in REVIEW_ACTIONS.items()
        }
    finally:
        driver.quit()
    size = page.stat().st_size + sum(
        chunk.stat().st_size for chunk in page.parent.glob(".review.html-thumbnails/*/*")
    )
    print(f"review page of {count:,} captioned images (--review with --dry-run), headless Chromium:")
    print(f"  written in {written:.1f} s ({size / 1e6:.1f} MB with its thumbnails); opened in {opened:.2f} s")
    print("  " + "; ".join(f"{name} {ms:.0f} ms" for name, ms in timings.items()))
    print()


def nothing_to_do_row(root: Path) -> None:
    """An invocation of a shell loop over a folder that is already captioned, with no server."""
    folder = folder_of_photos(root, "done", 50, (800, 600))
    for image in folder.glob("*.jpg"):
        image.with_suffix(".txt").write_text(CAPTION)
    walls = []
    for _ in range(5):
        started = time.monotonic()
        command = [sys.executable, str(script), str(folder), "--host", "127.0.0.1:9", "-q"]
        process = subprocess.run(command, capture_output=True, check=False)
        walls.append(time.monotonic() - started)
        if process.returncode != 0:
            sys.exit(f"the captioner failed:\n{process.stderr.decode()}")
    walls.sort()
    print(f"a folder of 50 images, all captioned, no server: {walls[2]:.3f} s wall (median of 5), exit 0")


def ray_rows(root: Path, scale: int) -> None:
    """--ray local (a Ray started by the run, its workers on this machine's cores) against the
    threaded client: (a) a 4-slot stand-in at LATENCY, (b) 24 MP JPEGs against an instant server,
    where preparation is the limit, (c) the driver's memory per image as the folder grows."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print('--ray rows: Ray is not installed (pip install "ray[client]>=2.60,<2.61")')
        return
    cores = len(os.sched_getaffinity(0))
    print(
        f"--ray local against the threaded client, {cores} cores (Ray's start-up not counted: server side):"
    )
    print("| row | images | threaded images/s | --ray local images/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    # 320 photos (some 20 s): Ray's own processes still start as a run begins, and over 160 (10 s)
    # their start swung the share of capacity from 79% to 96% between runs (measured, 2 cores).
    count = 320 // scale
    folder = folder_of_photos(root, "ray-slots", count, (1600, 1200))
    rates = []
    for extra in ((), ("--ray", "local")):
        stand_in = servers_with(1, slots=4)
        try:
            rates.append(served_rate(run_captioner(folder, stand_in, 5, *extra)["chats"]))
        finally:
            stand_in[0].stop()
    capacity = 4 / LATENCY
    print(
        f"| (a) 4 slots x {LATENCY} s, --jobs 5, 1600x1200 photos | {count} | {rates[0]:.2f} ({rates[0] / capacity:.1%}) "
        f"| {rates[1]:.2f} ({rates[1] / capacity:.1%}) | {rates[1] / rates[0]:.2f}x |"
    )
    count = max(8, 48 // scale)
    folder = folder_of_inputs(root, "ray-jpeg", "jpg", (6000, 4000), count)
    rates = []
    for extra in ((), ("--ray", "local")):
        stand_in = servers_with(1, slots=8, latency=0.0)
        try:
            rates.append(served_rate(run_captioner(folder, stand_in, 9, *extra)["chats"]))
        finally:
            stand_in[0].stop()
    print(
        f"| (b) 24 MP JPEG, instant server (8 slots, --jobs 9) | {count} | {rates[0]:.1f} | {rates[1]:.1f} "
        f"| {rates[1] / rates[0]:.2f}x |"
    )
    print()
    peaks = {}
    for count in (10_000 // scale, 100_000 // scale):  # the range: some 12 minutes here
        many = root / f"ray-many-{count}"
        many.mkdir()
        template = many / "template.png"
        for index in range(count):
            if index % 50_000 == 0:  # ext4 links a file at most 65,000 times
                Image.new("RGB", (64, 48), "red").save(template.with_name("next.png"))
                os.replace(template.with_name("next.png"), template)
            os.link(template, many / f"{index:06d}.png")
        template.unlink()
        for extra in ((), ("--ray", "local")):
            fast = servers_with(1, slots=8, latency=0.0)
            try:
                result = run_captioner(many, fast, 9, *extra)
            finally:
                fast[0].stop()
            peaks[count, bool(extra)] = (result["peak_rss_mb"], count / result["wall"])
    small, large = sorted({count for count, _ in peaks})
    print(
        f"(c) the driver's peak RSS, small images, instant server (8 slots, --jobs 9), {small:,} and {large:,} images:"
    )
    for on_ray, label in ((False, "threaded"), (True, "--ray local")):
        grown = (peaks[large, on_ray][0] - peaks[small, on_ray][0]) * 1024 / (large - small)
        print(
            f"  {label}: {peaks[small, on_ray][0]:.0f} MB and {peaks[large, on_ray][0]:.0f} MB, "
            f"{grown:.2f} KB more per image; {peaks[large, on_ray][1]:.0f} images/s (wall, start-up included)"
        )
    print()


# The table's groups of rows, in the order the whole table prints them (--rows picks some).
ROWS = {
    "slots": slots_rows,
    "thinking": thinking_rows,
    "apis": api_rows,
    "two-servers": two_servers_row,
    "pace": pace_rows,
    "styles": styles_rows,
    "folders": several_folders_rows,
    "preparation": preparation_rows,
    "input-types": input_type_rows,
    "huge-folder": huge_folder_rows,
    "nothing-to-do": lambda root, scale: nothing_to_do_row(root),
    "review": review_rows,
    "ray": ray_rows,
}


if __name__ == "__main__":
    main()
