"""The review page (--review) in a real browser: headless Chromium opens it from file:// and checks what
a person would: cards with their thumbnails, search, filters and their counts, hostile names and captions
shown as text, the redo list, and the review -> redo -> --only loop.

Pages come two ways, both written by the captioner's own code: by a run (`--review`), and by
`build_page`, which hands its Review data no run produces on demand (hostile strings, every status and
flag at once, 20,000 images)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import time
from pathlib import Path
from unittest import mock

import pytest
from browser import alert_shown, open_page, save_downloads_in, screenshot, start_chromium, wait_for_file
from conftest import JOURNAL, SCRIPT, captioner, distinct_pictures, picture, run_script
from PIL import Image, ImageDraw, ImageFilter
from stand_in_ollama import Reply, describe

TEMPLATE = SCRIPT.parent / "review-template.html"
TOKEN = "__REVIEW_DATA__"
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror=window.pwned=1>'
LOOSE_END_TAGS = "</script x><img src=x onerror=window.pwned=6> <!-- <script/x></script/x>"


# ---- The page as the captioner makes it ----

# The run a page built by build_page shows, unless a test says otherwise. Its prefix is the trigger
# words of SHOWCASE's captions: the page flags the captions that lack them.
RUN = {"model": "llava:13b", "prompt": "Describe the image in one line.", "prefix": "ohwx style"}


def build_page(page: Path, images: list, run: dict | None = None) -> Path:
    """Write `page` for `images` (dicts as in the page's data; an optional "jpeg" key holds a
    thumbnail's bytes) with the captioner's own Review, as a run writes it: the data is escaped
    into the template, and the thumbnails written into chunk scripts beside the page, by the code
    under test. The flags a page works out (over_clip, short, no_trigger) come from the captions
    and the run's prefix; of an image's own flags only those a run sets ("recovered") count.
    The run took 754 s at 41.5 tokens/s."""
    run = {**RUN, **(run or {})}
    config = captioner.Config(
        folders=[page.parent],
        prompt=captioner.Template(run["prompt"]),
        model=run["model"],
        prefix=captioner.Template(run["prefix"], source="--prefix"),
        review=page,
    )
    review = captioner.Review(page, config)
    for record in images:
        image = page.parent / record["path"]
        flags = [flag for flag in record["flags"] if flag == "recovered"]
        timing = {key: record[key] for key in ("seconds", "tokens")}
        review.image(image, record["status"], record["caption"], record["reason"], flags=flags, **timing)
        if record.get("jpeg"):
            review.keep_thumbnail(image, record["jpeg"])
    page.parent.mkdir(parents=True, exist_ok=True)
    summary = captioner.Summary(seconds=754.0, tokens=415, generation_ns=10_000_000_000)
    # Without the flush to disk of each file written: 200 of them for 20,000 images, a second of
    # the suite's time spent on what these tests never look at.
    with mock.patch.object(os, "fsync", lambda descriptor: None):
        review.write(summary, captioner.Stop())
    return page


def page_images(page: Path) -> list:
    """The images as the page's data holds them (the flags it worked out included)."""
    html = page.read_text(encoding="utf-8")
    opening = '<script type="application/json" id="review-data">'
    start = html.index(opening) + len(opening)
    return json.loads(html[start : html.index("</script>", start)])["images"]


def image(path: str, status: str = "captioned", caption: str = "", **fields) -> dict:
    words = len(caption.split())
    return {
        "path": path,
        "folder": path.rpartition("/")[0],
        "status": status,
        "caption": caption,
        "reason": "",
        "seconds": 3.2 if status == "captioned" else None,
        "tokens": 60 if status == "captioned" else None,
        "clip_tokens": round(words * 1.3),
        "words": words,
        "flags": [],
        **fields,
    }


def scene(seed: int, size=(512, 384)) -> Image.Image:
    """A small generated landscape: sky, sun, two ridges of hills, a lake or a meadow."""
    rnd = random.Random(seed)
    width, height = size
    palettes = [
        ((255, 170, 110), (120, 80, 170), (70, 50, 110), (40, 30, 70)),
        ((150, 205, 255), (230, 245, 255), (70, 120, 90), (35, 80, 55)),
        ((255, 214, 150), (250, 120, 90), (110, 70, 80), (60, 40, 60)),
        ((30, 40, 90), (110, 90, 170), (40, 50, 90), (20, 25, 50)),
        ((200, 230, 250), (250, 250, 240), (150, 160, 175), (90, 100, 120)),
    ]
    top, bottom, far, near = palettes[seed % len(palettes)]
    picture = Image.new("RGB", size)
    draw = ImageDraw.Draw(picture)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    sun_x, sun_y = rnd.randint(width // 8, width * 7 // 8), rnd.randint(height // 8, height // 2)
    radius = round(height * rnd.uniform(0.05, 0.1))
    draw.ellipse([sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius], fill=(255, 240, 200))
    for color, base, spread in ((far, 0.55, 0.25), (near, 0.72, 0.2)):
        points = [(0, height)]
        for x in range(0, width + 32, 32):
            points.append((x, height * (base + rnd.uniform(-spread, spread) / 2)))
        points.append((width, height))
        draw.polygon(points, fill=color)
    if seed % 3 == 0:
        draw.rectangle([0, int(height * 0.85), width, height], fill=tuple(min(255, c + 40) for c in top))
    return picture.filter(ImageFilter.SMOOTH)


def jpeg(picture: Image.Image, side: int = 256) -> bytes:
    thumbnail = picture.copy()
    thumbnail.thumbnail((side, side))
    out = io.BytesIO()
    thumbnail.save(out, "JPEG", quality=70)
    return out.getvalue()


# path | status | flags | caption, or the reason of a failure
SHOWCASE = """
alps/IMG 0001.jpg | captioned | | ohwx style, snow-capped mountains at sunset, violet sky, dark pine ridge in the
    foreground, watercolor, soft light
alps/IMG 0002.jpg | captioned | | ohwx style, rolling green hills under a pale blue sky, low sun, quiet meadow, flat shading
alps/IMG 0003.jpg | failed | | the model refused: I'm sorry, I can't help with that.
alps/IMG 0004.jpg | captioned | | ohwx style, the image shows a night sky over mountains, a full moon, purple haze,
    layered ridges, quiet and cold
alps/IMG 0005.jpg | before | | ohwx style, misty grey peaks, pale sun, snowfield, muted tones, minimal composition
alps/café #1 100%.jpg | captioned | short no_trigger | mountains.
alps/IMG 0007.jpg | captioned | over_clip | ohwx style, an orange sunset over layered purple mountains, the sun half
    hidden behind the second ridge, long rays through thin clouds, a cold blue valley below, pine trees in silhouette
    on the nearest slope, soft watercolor washes with visible paper grain, calm and warm, wide panoramic composition,
    a lone hawk circling high above the valley, mist rising from the river
alps/IMG 0008.jpg | captioned | recovered | ohwx style, warm evening light over two hill ridges, sun low on the left,
    gradient sky, poster art
coast/beach 01.jpg | captioned | | ohwx style, a calm lake below dark hills, orange sky, reflections, flat vector illustration
coast/beach 02.jpg | failed | | Ollama answered 500: model runner has unexpectedly stopped
coast/beach 03.jpg | not_attempted | |
coast/beach 04.jpg | captioned | no_trigger | the image shows a sunrise over green hills, blue sky, small white sun,
    bright and fresh
coast/beach 05.jpg | before | | ohwx style, night over the bay, moon above the ridges, violet and navy, calm water
coast/beach 06.jpg | captioned | over_clip | ohwx style, dusk over a quiet coast, long blue shadows across the sand,
    peach and lilac sky, layered hills fading into haze, a thin crescent moon, calm water reflecting the last light,
    flat poster illustration with gentle grain, a small wooden pier reaching into the bay, two gulls resting on its
    posts, a lighthouse blinking far away on the headland
coast/beach 07.jpg | failed | | the model refused: I cannot describe this image.
coast/beach 08.jpg | captioned | | ohwx style, overcast day, grey mountains, white sky, snow, minimal palette, wide view
what?.png | not_attempted | |
coast/beach 09.jpg | captioned | | ohwx style, the image shows warm hills at golden hour, hazy sun, pink clouds, painterly
"""


def showcase(folder: Path) -> list:
    """A run of 18 images over two folders and the page's own: every status, reason and flag."""
    images = []
    for number, entry in enumerate(re.split(r"\n(?! )", SHOWCASE.strip())):
        path, status, flags, text = (part.strip() for part in entry.split("|"))
        text = " ".join(text.split())
        picture = scene(number)
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(folder / path, "PNG" if path.endswith(".png") else "JPEG", quality=85)
        fields = {"flags": flags.split(), "jpeg": jpeg(picture)}
        if status == "captioned":
            fields.update(seconds=round(1.5 + number * 0.37, 1), tokens=40 + number * 7)
        if status == "failed":
            images.append(image(path, status, reason=text, **fields))
        else:
            images.append(image(path, status, text, **fields))
    return images


# ---- What the page shows, read back in the browser ----


def shown_paths(driver) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll('#cards .card')].map(c => c.dataset.path)"
    )


def option_counts(driver) -> dict:
    return driver.execute_script(
        """const counts = {};
        for (const row of document.querySelectorAll('#filters .opt')) {
          (counts[row.dataset.group] ||= {})[row.dataset.value] =
            Number(row.querySelector('.count').textContent.replace(/\\D/g, ''));
        }
        return counts;"""
    )


def toggle(driver, group: str, value: str) -> float:
    """Click a filter option as a person would; the seconds it took to filter and show the cards."""
    return driver.execute_script(
        """const input = [...document.querySelectorAll('#filters input')]
            .find(i => i.dataset.group === arguments[0] && i.value === arguments[1]);
        const start = performance.now();
        input.click();
        document.body.offsetHeight;  // layout included
        return (performance.now() - start) / 1000;""",
        group,
        value,
    )


def type_search(driver, text: str) -> float:
    return driver.execute_script(
        """const box = document.getElementById('search');
        const start = performance.now();
        box.value = arguments[0];
        box.dispatchEvent(new Event('input'));
        document.body.offsetHeight;
        return (performance.now() - start) / 1000;""",
        text,
    )


def wait_for_thumbnails(driver, everywhere: bool = False, seconds: float = 10) -> int:
    """Wait until every thumbnail on screen (or on the page, scrolling down) is decoded; their number."""
    check = """const all = arguments[0];
        const imgs = [...document.querySelectorAll('#cards img')]
            .filter(img => all || img.getBoundingClientRect().top < innerHeight);
        return imgs.every(img => img.complete && img.naturalWidth > 0) ? imgs.length : -1;"""
    if everywhere:
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    deadline = time.monotonic() + seconds
    while (loaded := driver.execute_script(check, everywhere)) < 0:
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.02)
    return loaded


def reason_group(reason: str) -> str:
    """The page's grouping of failure reasons: the text before the first ':', or the first 40 characters."""
    text = reason.strip()
    head = text.split(":", 1)[0].strip() if text.find(":") > 0 else text
    return head if len(head) <= 40 else head[:40].rstrip() + "\u2026"


def values(record: dict, group: str, marked=frozenset(), edited=frozenset()) -> list:
    folder = record["folder"] or "."
    return {
        "status": [record["status"]],
        "reason": [reason_group(record["reason"])] if record["status"] == "failed" else [],
        "flag": record["flags"],
        "folder": [folder],
        "redo": ["marked"] if record["path"] in marked else [],
        "edit": ["edited"] if record["path"] in edited else [],
    }[group]


def expected_counts(records: list, selected: dict, query: str = "") -> tuple:
    """What the page must show: the images that match, and for each option of each group the images
    that match the search and every other group (a faceted count)."""
    groups = ("status", "reason", "flag", "folder", "redo", "edit")
    query = query.lower()
    matching, counts = [], {group: {} for group in groups}
    for record in records:
        if query not in "\n".join((record["caption"], record["path"], record["reason"])).lower():
            continue
        failing = [g for g in groups if selected.get(g) and not set(values(record, g)) & selected[g]]
        if not failing:
            matching.append(record["path"])
        for group in groups if not failing else failing if len(failing) == 1 else ():
            for value in values(record, group):
                counts[group][value] = counts[group].get(value, 0) + 1
    return matching, counts


def assert_counts(driver, records: list, selected: dict, query: str = "") -> None:
    matching, counts = expected_counts(records, selected, query)
    assert sorted(shown_paths(driver)) == sorted(matching)
    for group, options in option_counts(driver).items():
        for value, count in options.items():
            assert count == counts[group].get(value, 0), (group, value, selected, query)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("downloads"))
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium, tmp_path):
    """The module's Chromium, saving downloads into this test's tmp_path/downloads."""
    save_downloads_in(chromium, tmp_path / "downloads")
    yield chromium
    chromium.get("about:blank")


# ---- The template itself ----


def test_the_template_takes_its_data_in_one_place_and_loads_nothing_from_the_network():
    template = TEMPLATE.read_text(encoding="utf-8")
    assert template.count(TOKEN) == 1
    assert f'<script type="application/json" id="review-data">{TOKEN}</script>' in template
    # Data reaches the page as text only; no code is made from strings; nothing comes from elsewhere.
    never = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(")
    elsewhere = ("http:", "https:", "//cdn", "@import", "url(", "src=")
    for word in never + elsewhere:
        assert word not in template, word
    scripts = re.findall(r"<script>(.*?)</script>", template, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in template, (
        f"the Content-Security-Policy must name the script's hash {digest}"
    )


@pytest.mark.browser
def test_the_template_opened_as_it_is_says_what_it_lacks(browser):
    with pytest.raises(AssertionError, match="holds no review data"):
        open_page(browser, TEMPLATE)


# ---- Pages built from the template ----


@pytest.mark.browser
def test_cards_show_thumbnails_captions_and_the_run(browser, tmp_path):
    images = showcase(tmp_path)
    page = build_page(tmp_path / "review.html", images)
    open_page(browser, page)

    assert shown_paths(browser) == sorted((i["path"] for i in images), key=name_order)
    assert wait_for_thumbnails(browser) >= 8
    path = screenshot(browser, tmp_path / "review.png")
    assert Image.open(path).size == (1280, 900)
    assert wait_for_thumbnails(browser, everywhere=True) == len(images)

    header = browser.execute_script("return document.getElementById('run').textContent")
    assert "llava:13b" in header and "41.5" in header and "12 min 34 s" in header
    assert (
        "Most frequent words" in header
        and "ohwx" in header
        and "Captions open with the image shows 23%" in header
    )
    cards = {card["path"]: card for card in card_texts(browser)}
    assert cards["alps/IMG 0003.jpg"]["reason"] == "the model refused: I'm sorry, I can't help with that."
    assert cards["alps/IMG 0001.jpg"]["caption"] == images[0]["caption"]
    assert cards["alps/café #1 100%.jpg"]["flags"] == ["short", "no_trigger"]
    assert cards["what?.png"]["folder"] == "./"
    # The thumbnail opens the original, its name encoded in the link.
    for card in cards.values():
        assert card["href"] == (tmp_path / card["path"]).as_uri()
        assert (tmp_path / card["path"]).is_file()


def name_order(path: str) -> str:
    return path.lower()


def card_texts(driver) -> list:
    return driver.execute_script(
        """return [...document.querySelectorAll('#cards .card')].map(card => ({
          path: card.dataset.path,
          name: card.querySelector('.name').textContent,
          folder: card.querySelector('.folder').textContent,
          caption: (card.querySelector('.caption:not(.empty)') || {}).textContent || '',
          reason: (card.querySelector('.reason') || {}).textContent || '',
          flags: [...card.querySelectorAll('[data-flag]')].map(b => b.dataset.flag),
          href: card.querySelector('a.thumb').href,
          text: card.innerText,
        }));"""
    )


@pytest.mark.browser
def test_each_filter_counts_what_it_shows(browser, tmp_path):
    images = showcase(tmp_path)
    open_page(browser, build_page(tmp_path / "review.html", images))
    assert_counts(browser, images, {})
    counts = option_counts(browser)
    assert counts["status"] == {"captioned": 11, "before": 2, "failed": 3, "not_attempted": 2}
    assert counts["reason"] == {"the model refused": 2, "Ollama answered 500": 1}
    assert counts["flag"] == {"over_clip": 2, "short": 1, "no_trigger": 2, "recovered": 1}
    assert counts["folder"] == {"alps": 8, "coast": 9, ".": 1}

    # Each option alone shows as many cards as its count said.
    for group, options in counts.items():
        for value, count in options.items():
            toggle(browser, group, value)
            assert len(shown_paths(browser)) == count, (group, value)
            toggle(browser, group, value)

    # Together: options of a group add up, groups narrow each other, counts follow the others.
    selected: dict = {}
    for group, value in [
        ("folder", "coast"),
        ("status", "failed"),
        ("status", "captioned"),
        ("flag", "no_trigger"),
    ]:
        toggle(browser, group, value)
        selected.setdefault(group, set()).add(value)
        assert_counts(browser, images, selected)
    assert shown_paths(browser) == ["coast/beach 04.jpg"]

    browser.find_element("id", "clear-filters").click()
    assert len(shown_paths(browser)) == len(images)


@pytest.mark.browser
def test_search_narrows_highlights_and_sorts(browser, tmp_path):
    images = showcase(tmp_path)
    open_page(browser, build_page(tmp_path / "review.html", images))

    browser.find_element("id", "search").send_keys("The Image SHOWS")
    assert_counts(browser, images, {}, "the image shows")
    assert len(shown_paths(browser)) == 3
    marks = browser.execute_script(
        "return [...document.querySelectorAll('#cards .caption mark')].map(m => m.textContent)"
    )
    assert marks == ["the image shows"] * 3
    assert "3 of 18 images" in browser.find_element("id", "shown-count").text

    type_search(browser, "refused")  # failure reasons are searched too
    assert sorted(shown_paths(browser)) == ["alps/IMG 0003.jpg", "coast/beach 07.jpg"]
    type_search(browser, "#1 100%")  # and names, as typed
    assert shown_paths(browser) == ["alps/café #1 100%.jpg"]
    type_search(browser, "no such words")
    assert shown_paths(browser) == [] and "No image matches" in browser.find_element("id", "cards").text
    type_search(browser, "")

    browser.execute_script(
        "const s = document.getElementById('sort'); s.value = 'length'; s.dispatchEvent(new Event('change'))"
    )
    by_length = [p for p in shown_paths(browser)]
    words = {i["path"]: i["words"] if i["caption"] else None for i in images}
    lengths = [words[p] for p in by_length if words[p] is not None]
    assert lengths == sorted(lengths) and all(words[p] is None for p in by_length[len(lengths) :])
    browser.find_element("id", "sort-dir").click()
    assert (
        shown_paths(browser)[0] == max(images, key=lambda i: i["words"])["path"]
    )  # the longest caption first

    browser.execute_script(
        "const s = document.getElementById('sort'); s.value = 'time'; s.dispatchEvent(new Event('change'))"
    )
    seconds = {i["path"]: i["seconds"] for i in images}
    timed = [seconds[p] for p in shown_paths(browser) if seconds[p] is not None]
    assert timed == sorted(timed, reverse=True) and len(timed) == 11


@pytest.mark.browser
def test_hostile_names_and_captions_stay_text(browser, tmp_path):
    hostile = [
        image(f"{HOSTILE_IMG}/{HOSTILE_IMG}.jpg", "captioned", f"a cat {HOSTILE_SCRIPT} {HOSTILE_IMG}"),
        image("b/</script><script>window.pwned=3</script>.jpg", "failed", reason=f"bad: {HOSTILE_SCRIPT}"),
        image(
            "javascript:window.pwned=4.jpg",
            "before",
            "</script><img src=x onerror=window.pwned=5>\u2028&amp;",
        ),
        # A space or a slash after "</script" ends a script too, ">" or not: only "<" escaped stops it.
        image("d.jpg", "failed", reason=LOOSE_END_TAGS),
    ]
    run = {"model": HOSTILE_SCRIPT, "prompt": f"{HOSTILE_IMG}\n{HOSTILE_SCRIPT}", "prefix": HOSTILE_IMG}
    page = build_page(tmp_path / "review.html", hostile, run=run)
    open_page(browser, page)

    assert alert_shown(browser) is None
    assert browser.execute_script("return typeof window.pwned") == "undefined"
    assert (
        browser.execute_script("return document.querySelectorAll('#cards img, #run img, script[src]').length")
        == 0
    )
    cards = {card["path"]: card for card in card_texts(browser)}
    first = cards[f"{HOSTILE_IMG}/{HOSTILE_IMG}.jpg"]
    assert first["name"] == f"{HOSTILE_IMG}.jpg" and first["folder"] == f"{HOSTILE_IMG}/"
    assert first["caption"] == f"a cat {HOSTILE_SCRIPT} {HOSTILE_IMG}"
    assert cards["b/</script><script>window.pwned=3</script>.jpg"]["reason"] == f"bad: {HOSTILE_SCRIPT}"
    third = cards["javascript:window.pwned=4.jpg"]
    assert third["caption"] == "</script><img src=x onerror=window.pwned=5>\u2028&amp;"
    assert third["href"] == (tmp_path / "javascript:window.pwned=4.jpg").as_uri()  # a file, not a script
    assert cards["d.jpg"]["reason"] == LOOSE_END_TAGS
    assert first["href"].startswith(tmp_path.as_uri() + "/")
    browser.find_element("tag name", "summary").click()
    header = browser.find_element("id", "run").text
    assert HOSTILE_SCRIPT in header and HOSTILE_IMG in header

    type_search(browser, HOSTILE_SCRIPT)  # found and highlighted as text
    assert (
        browser.execute_script("return document.querySelector('#cards mark').textContent") == HOSTILE_SCRIPT
    )
    assert browser.execute_script("return typeof window.pwned") == "undefined"
    assert alert_shown(browser) is None


@pytest.mark.browser
def test_the_redo_list_downloads_absolute_paths(browser, tmp_path):
    images = showcase(tmp_path / "data")
    page = build_page(tmp_path / "data" / "review.html", images)
    open_page(browser, page)

    for path in ("alps/café #1 100%.jpg", "what?.png"):
        browser.execute_script(
            "[...document.querySelectorAll('#cards .card')].find(c => c.dataset.path === arguments[0])"
            ".querySelector('.redo-toggle').click()",
            path,
        )
    toggle(browser, "status", "failed")
    browser.find_element("id", "mark-shown").click()
    button = browser.find_element("id", "download-redo")
    assert button.text == "Download redo list (5)"
    toggle(browser, "status", "failed")
    toggle(browser, "redo", "marked")
    assert len(shown_paths(browser)) == 5
    assert all(
        browser.execute_script(
            "return [...document.querySelectorAll('#cards .card')].map(c => c.classList.contains('redo'))"
        )
    )
    button.click()

    lines = wait_for_file(tmp_path / "downloads" / "redo-list.txt").splitlines()
    assert lines[0].startswith("# ") and "--only" in lines[0]
    marked = [
        "alps/IMG 0003.jpg",
        "alps/café #1 100%.jpg",
        "coast/beach 02.jpg",
        "coast/beach 07.jpg",
        "what?.png",
    ]
    assert lines[1:] == sorted((str(tmp_path / "data" / path) for path in marked), key=str.lower)

    # The marks outlive a reload of the page.
    open_page(browser, page)
    assert browser.find_element("id", "download-redo").text == "Download redo list (5)"


@pytest.mark.browser
def test_twenty_thousand_images_are_shown_a_page_at_a_time_and_counted_right(browser, tmp_path):
    rnd = random.Random(7)
    words = [
        "red",
        "blue",
        "old",
        "young",
        "woman",
        "man",
        "dog",
        "cat",
        "street",
        "field",
        "forest",
        "window",
        "light",
        "shadow",
        "smiling",
        "sitting",
    ]
    thumb = jpeg(scene(1, (64, 48)), 48)
    statuses = ["captioned"] * 14 + ["before"] * 4 + ["failed", "not_attempted"]
    images = []
    for number in range(20_000):
        status = rnd.choice(statuses)
        caption = (
            "" if status in ("failed", "not_attempted") else ", ".join(rnd.sample(words, rnd.randint(3, 12)))
        )
        flags = ["recovered"] if rnd.random() < 0.05 else []  # the others the page works out
        reason = rnd.choice(["the model refused: no", "timed out after 600 s", "Ollama answered 500: boom"])
        images.append(
            image(
                f"set{number % 20:02d}/img{number:05d}.jpg",
                status,
                caption,
                flags=flags,
                jpeg=thumb,
                reason=reason if status == "failed" else "",
                seconds=rnd.uniform(1, 9) if caption else None,
            )
        )
    page = build_page(tmp_path / "review.html", images, run={"prefix": ""})
    images = page_images(page)

    # How fast it opens and filters is measured by tests/bench.py, not asserted here.
    open_page(browser, page)
    assert len(shown_paths(browser)) == 120
    wait_for_thumbnails(browser)
    # Only the chunks of the cards near the screen are loaded: a few of the 200, not the 24 of the page.
    assert browser.execute_script("return document.querySelectorAll('script[src]').length") <= 8

    type_search(browser, "woman")
    toggle(browser, "status", "failed")
    toggle(browser, "folder", "set07")
    toggle(browser, "status", "failed")
    type_search(browser, "")
    browser.execute_script(
        "const s = document.getElementById('sort'); s.value = 'length'; s.dispatchEvent(new Event('change'))"
    )
    browser.find_element("id", "page-next").click()
    assert browser.find_element("id", "page-info").text == "page 2 of 9"
    toggle(browser, "status", "failed")
    assert_counts(browser, images, {"status": {"failed"}, "folder": {"set07"}})


# ---- Pages written by the captioner (--review) ----


def review(folder: Path, page: Path, *args: object, host: str) -> None:
    run = run_script(folder, "--review", page, "--host", host, *args)
    assert page.is_file(), f"exit {run.returncode}: {run.stderr}"


@pytest.mark.browser
def test_a_run_writes_a_page_that_shows_it(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    expected = distinct_pictures(folder, 4)
    hostile = picture(folder / f"{HOSTILE_IMG}.png", size=(50, 32))
    said = f"A red square with {HOSTILE_SCRIPT} written on it"
    special = {41: Reply(status=400, error="image too strange"), 50: said}
    server = make_server(answer=lambda chat: special.get(chat.picture().width) or describe(chat))
    review(folder, tmp_path / "review.html", host=server.url)
    open_page(browser, tmp_path / "review.html")

    assert (
        alert_shown(browser) is None and browser.execute_script("return typeof window.pwned") == "undefined"
    )
    cards = {card["path"]: card for card in card_texts(browser)}
    assert set(cards) == {f"photos/img00{n}.png" for n in range(4)} | {f"photos/{hostile.name}"}
    for caption_file, caption in expected.items():
        card = cards[f"photos/{caption_file.stem}.png"]
        if caption_file.stem == "img001":
            assert "image too strange" in card["reason"]
        else:
            assert card["caption"] == caption_file.read_text(encoding="utf-8") == caption
    assert cards[f"photos/{hostile.name}"]["caption"] == hostile.with_suffix(".txt").read_text(
        encoding="utf-8"
    )
    assert HOSTILE_SCRIPT in cards[f"photos/{hostile.name}"]["caption"]
    assert cards[f"photos/{hostile.name}"]["href"] == hostile.as_uri()
    assert wait_for_thumbnails(browser, everywhere=True) == 5
    assert option_counts(browser)["status"] == {"captioned": 4, "before": 0, "failed": 1, "not_attempted": 0}
    screenshot(browser, tmp_path / "review.png")
    # Nothing of the review can be taken for a picture of the dataset (the journal every pass
    # keeps is the tool's own, hidden).
    kept = [p.name for p in folder.iterdir() if p.suffix != ".txt" and p.name != JOURNAL]
    assert sorted(kept) == sorted([f"img00{n}.png" for n in range(4)] + [hostile.name])


@pytest.mark.browser
def test_a_dry_run_reviews_a_folder_as_it_is_without_sending_anything(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 3)
    (folder / "img000.txt").write_text("an old caption, written by hand", encoding="utf-8")
    (folder / "img002.txt").write_text("another old caption", encoding="utf-8")
    server = make_server()
    review(folder, tmp_path / "review.html", "--dry-run", host=server.url)
    assert not server.chats
    open_page(browser, tmp_path / "review.html")

    cards = {card["path"]: card for card in card_texts(browser)}
    assert cards["photos/img000.png"]["caption"] == "an old caption, written by hand"
    assert browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#cards .card')].map(c => [c.dataset.path, c.dataset.status]))"
    ) == {"photos/img000.png": "before", "photos/img001.png": "not_attempted", "photos/img002.png": "before"}
    assert wait_for_thumbnails(browser, everywhere=True) == 3
    assert "Dry run" in browser.find_element("id", "run").text


@pytest.mark.browser
def test_review_redo_list_and_only_close_the_loop(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 4)
    review(folder, tmp_path / "review.html", host=make_server().url)
    open_page(browser, tmp_path / "review.html")
    for path in ("photos/img001.png", "photos/img003.png"):
        browser.execute_script(
            "[...document.querySelectorAll('#cards .card')].find(c => c.dataset.path === arguments[0])"
            ".querySelector('.redo-toggle').click()",
            path,
        )
    browser.find_element("id", "download-redo").click()
    redo_list = tmp_path / "downloads" / "redo-list.txt"
    assert wait_for_file(redo_list).splitlines()[1:] == [
        str(folder / "img001.png"),
        str(folder / "img003.png"),
    ]

    redoing = make_server(
        answer=lambda chat: f"A redone caption of a {chat.picture().width} pixel wide square."
    )
    run = run_script(folder, "--only", redo_list, "--host", redoing.url)
    assert run.returncode == 0, run.stderr
    assert sorted(chat.picture().width for chat in redoing.chats if chat.picture().width != 64) == [41, 43]
    assert (folder / "img001.txt").read_text(
        encoding="utf-8"
    ) == "A redone caption of a 41 pixel wide square."
    assert (folder / "img000.txt").read_text(encoding="utf-8") == "A PNG picture, 40x32 pixels."

    review(folder, tmp_path / "again.html", "--dry-run", host=redoing.url)
    open_page(browser, tmp_path / "again.html")
    cards = {card["path"]: card for card in card_texts(browser)}
    assert cards["photos/img003.png"]["caption"] == "A redone caption of a 43 pixel wide square."


@pytest.mark.browser
def test_the_redo_list_leaves_out_a_path_with_a_line_break_and_says_so(browser, make_server, tmp_path):
    # A list holds a name a line: a name with a line break would be two names, neither the image's.
    folder = tmp_path / "photos"
    picture(folder / "plain.png", size=(40, 32))
    picture(folder / "line\nbreak.png", size=(41, 32))
    review(folder, tmp_path / "review.html", "--dry-run", host=make_server().url)
    open_page(browser, tmp_path / "review.html")
    browser.find_element("id", "mark-shown").click()
    button = browser.find_element("id", "download-redo")
    assert button.text == "Download redo list (2)"
    button.click()

    lines = wait_for_file(tmp_path / "downloads" / "redo-list.txt").splitlines()
    assert lines[1:] == [
        "# 1 marked image(s) left out: their path holds a line break.",
        str(folder / "plain.png"),
    ]


@pytest.mark.browser
def test_the_page_says_the_tokens_paid_for_and_the_cost(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 2)
    server = make_server()
    review(folder, tmp_path / "review.html", "--price", "1000/2000", host=server.url)
    paid_in = sum(Reply().prompt_tokens for _ in server.chats)
    paid_out = sum(max(1, chat.tokens_sent) for chat in server.chats)
    open_page(browser, tmp_path / "review.html")

    header = browser.find_element("id", "run").text
    assert f"{paid_in:,} + {paid_out:,} tokens paid for" in header
    assert f"{captioner.money((paid_in * 1000 + paid_out * 2000) / 1e6)} spent" in header


@pytest.mark.browser
def test_the_page_shows_no_cost_without_a_price(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 1)
    review(folder, tmp_path / "review.html", host=make_server().url)
    open_page(browser, tmp_path / "review.html")

    header = browser.find_element("id", "run").text
    assert "tokens paid for" in header and "spent" not in header


def tags_but_for_41(tags: str):
    """The stand-in's answer with a .tags style: the tags (by the picture's width), refused for the
    picture 41 wide; a description for any other prompt."""

    def answer(chat):
        if chat.prompt != "List tags.":
            return describe(chat)
        width = chat.picture().width
        return Reply(status=400, error="no tags today") if width == 41 else tags.format(width=width)

    return answer


@pytest.mark.browser
def test_each_card_has_a_line_for_each_style(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 2)
    tags = tmp_path / "tags.txt"
    tags.write_text("List tags.")
    answer = tags_but_for_41("red, <b>tags</b> {width}")

    server = make_server(answer=answer)
    review(folder, tmp_path / "review.html", "--also", f"{tags}:.tags", host=server.url)
    open_page(browser, tmp_path / "review.html")

    lines = browser.execute_script(
        "return [...document.querySelectorAll('.card')].map((card) => [card.dataset.path,"
        " [...card.querySelectorAll('.style-line')].map((line) => [line.dataset.ext, line.className, line.textContent])])"
    )
    lines = dict(lines)
    assert lines["photos/img000.png"] == [[".tags", "style-line", ".tagsred, <b>tags</b> 40"]]
    [[ext, kind, text]] = lines["photos/img001.png"]
    assert (ext, kind) == (".tags", "style-line failed") and "no tags today" in text
    cards = {card["path"]: card for card in card_texts(browser)}
    assert cards["photos/img001.png"]["caption"] == "A PNG picture, 41x32 pixels."  # the main caption's
    # One thumbnail an image, whatever its styles.
    chunks = (tmp_path / ".review.html-thumbnails").rglob("chunk-*.js")
    assert sum(chunk.read_text().count("data:image/jpeg") for chunk in chunks) == 2


# ---- Edits: in place, find & replace, downloaded, applied with --apply-edits ----

HOSTILE_EDIT = f'{HOSTILE_IMG} {HOSTILE_SCRIPT} & "cat"\nשלום עולם, a cat \u202eevil end'


def on_card(driver, path: str, selector: str):
    """The element of a card (on the page shown) that the selector finds."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#cards .card')].find(c => c.dataset.path === arguments[0])"
        ".querySelector(arguments[1])",
        path,
        selector,
    )


def caption_shown(driver, path: str) -> str:
    return driver.execute_script(
        "const card = [...document.querySelectorAll('#cards .card')].find(c => c.dataset.path === arguments[0]);"
        "return (card.querySelector('.caption:not(.empty)') || {}).textContent || ''",
        path,
    )


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_edits_and_find_and_replace_are_downloaded_and_applied_byte_for_byte(browser, make_server, tmp_path):
    data = tmp_path / "data"
    captions = {}
    for number in range(125):  # more than a page of cards (120): the replace reaches the second page
        picture(data / "a" / f"img{number:03d}.png", size=(16, 12))
        captions[f"a/img{number:03d}.txt"] = f"a photo of a cat, number {number}"
    for number in range(3):
        picture(data / "b" / f"img{number:03d}.png", size=(16, 12))
        captions[f"b/img{number:03d}.txt"] = f"a cat in folder b, number {number}"
    # Hostile captions on disk: markup, line breaks, right-to-left text, 50,000 characters.
    captions["a/img001.txt"] = f"{HOSTILE_SCRIPT} <b>cat</b> &amp;"
    captions["a/img002.txt"] = "line one, a cat\nline two\r\nline three"
    captions["a/img003.txt"] = "חתול שחור \u202ecat\u202c " + "a long cat caption " * 2630
    for rel, text in captions.items():
        (data / rel).write_bytes(text.encode("utf-8"))
    images = {path: path.read_bytes() for path in data.rglob("*.png")}
    page = tmp_path / "review.html"
    run = run_script(data / "a", data / "b", "--review", page, "--dry-run", "--host", make_server().url)
    assert run.returncode == 0, run.stderr
    open_page(browser, page)

    # One caption edited in place, typed as a person types it (line break and all).
    on_card(browser, "data/a/img000.png", ".edit-toggle").click()
    area = on_card(browser, "data/a/img000.png", "textarea")
    assert area.get_attribute("value") == captions["a/img000.txt"]
    area.clear()
    area.send_keys(HOSTILE_EDIT)
    on_card(browser, "data/a/img000.png", ".edit-save").click()
    assert caption_shown(browser, "data/a/img000.png") == HOSTILE_EDIT
    assert browser.find_element("id", "download-edits").text == "Download edits (1)"
    # 50,000 characters, set as a paste would.
    long_edit = "ein langer Satz über eine cat, " * 1613 + "שלום"
    on_card(browser, "data/a/img003.png", ".edit-toggle").click()
    browser.execute_script(
        "arguments[0].value = arguments[1]", on_card(browser, "data/a/img003.png", "textarea"), long_edit
    )
    on_card(browser, "data/a/img003.png", ".edit-save").click()
    assert len(long_edit) >= 50_000 and caption_shown(browser, "data/a/img003.png") == long_edit
    assert (
        alert_shown(browser) is None and browser.execute_script("return typeof window.pwned") == "undefined"
    )

    # Find & replace over every caption folder a shows (two pages of cards), none of folder b's.
    toggle(browser, "folder", "data/a")
    assert "125 of 128 images" in browser.find_element("id", "shown-count").text
    browser.find_element("id", "open-replace").click()
    browser.find_element("id", "find").send_keys("cat")
    browser.find_element("id", "replace-with").send_keys("dog")
    browser.find_element("id", "preview-replace").click()
    texts = {rel: text for rel, text in captions.items()}
    texts["a/img000.txt"], texts["a/img003.txt"] = HOSTILE_EDIT, long_edit
    changing = [rel for rel, text in texts.items() if rel.startswith("a/") and "cat" in text]
    occurrences = sum(texts[rel].count("cat") for rel in changing)
    summary = browser.find_element("id", "replace-summary").text
    assert f"{occurrences:,} occurrences in {len(changing)} captions of the 125 images" in summary
    assert len(browser.find_elements("css selector", "#replace-list li")) == 51  # 50 and "... more"
    assert all(caption_shown(browser, f"data/{rel[:-4]}.png").count("dog") == 0 for rel in changing[:5])
    apply_button = browser.find_element("id", "apply-replace")
    assert apply_button.text == f"Replace in {len(changing)} captions"
    apply_button.click()
    expected = {rel: texts[rel].replace("cat", "dog") for rel in changing}
    browser.find_element("id", "page-next").click()
    assert caption_shown(browser, "data/a/img124.png") == expected["a/img124.txt"]
    toggle(browser, "folder", "data/a")
    type_search(browser, "folder b")
    assert caption_shown(browser, "data/b/img001.png") == captions["b/img001.txt"]  # not shown: not replaced
    type_search(browser, "")
    toggle(browser, "edit", "edited")
    assert f"{len(changing)} of 128 images" in browser.find_element("id", "shown-count").text

    # Kept in the browser until downloaded, across a reload; then one file.
    open_page(browser, page)
    assert browser.find_element("id", "download-edits").text == f"Download edits ({len(changing)})"
    browser.find_element("id", "download-edits").click()
    edits_file = tmp_path / "downloads" / "caption-edits.json"
    downloaded = json.loads(wait_for_file(edits_file))
    assert downloaded["llava-caption-edits"] == 1 and "--apply-edits" in downloaded["apply"]
    by_image = {edit["image"]: edit for edit in downloaded["edits"]}
    assert set(by_image) == {str(data / rel[:-4]) + ".png" for rel in changing}
    first = by_image[str(data / "a" / "img000.png")]
    assert first == {
        "image": str(data / "a" / "img000.png"),
        "ext": ".txt",
        "shown": captions["a/img000.txt"],
        "text": expected["a/img000.txt"],
    }
    assert by_image[str(data / "a" / "img002.png")]["shown"] == captions["a/img002.txt"]

    # A caption changed on disk since the page was written is left alone, named, exit 1.
    (data / "a" / "img010.txt").write_bytes(b"changed by hand after the page")
    applied = run_script(data / "a", data / "b", "--apply-edits", edits_file)
    assert applied.returncode == 1, applied.stderr
    assert "changed since the page was written, left alone: a/img010.txt" in applied.stderr
    assert f"applied {len(changing) - 1} edits" in applied.stderr
    for rel, text in captions.items():
        on_disk = (data / rel).read_bytes()
        if rel == "a/img010.txt":
            assert on_disk == b"changed by hand after the page"
        elif rel in expected:
            assert on_disk == expected[rel].encode("utf-8"), rel
        else:
            assert on_disk == text.encode("utf-8"), rel
    assert {path: path.read_bytes() for path in data.rglob("*.png")} == images
    others = sorted(
        p.relative_to(data).as_posix() for p in data.rglob("*") if p.suffix not in (".png", ".txt")
    )
    assert others == ["a", f"a/{JOURNAL}", "b"]  # the folders, and the journal that holds the edits

    # No later pass touches them: an overwrite pass leaves every applied edit alone.
    again = run_script(data / "a", "--existing", "overwrite", "--host", make_server().url)
    assert (
        f"left alone {len([rel for rel in expected if rel.startswith('a/')]) - 1} (edited since written)"
        in again.stderr
    )
    for rel, text in expected.items():
        if rel != "a/img010.txt":
            assert (data / rel).read_bytes() == text.encode("utf-8"), rel


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_a_styles_captions_are_edited_replaced_downloaded_and_applied(browser, make_server, tmp_path):
    folder = tmp_path / "photos"
    distinct_pictures(folder, 3)
    (folder / "img001.tags").write_bytes(b"old tags by hand")
    tags = tmp_path / "tags.txt"
    tags.write_text("List tags.")
    answer = tags_but_for_41("red, tags w{width}")

    page = tmp_path / "review.html"
    also = ["--also", f"{tags}:.tags"]
    run = run_script(
        folder, *also, "--existing", "overwrite", "--review", page, "--host", make_server(answer=answer).url
    )
    assert run.returncode == 1, run.stderr  # img001's tags failed: its file keeps what a person wrote
    main_captions = {path: path.read_bytes() for path in folder.glob("*.txt")}
    open_page(browser, page)

    def edit_tags(path: str, shown: str, text: str) -> None:
        on_card(browser, path, ".edit-toggle").click()
        area = on_card(browser, path, 'textarea[data-ext=".tags"]')
        assert area.get_attribute("value") == shown
        assert on_card(browser, path, 'textarea[data-ext=".txt"]') is not None  # the main one beside it
        area.clear()
        area.send_keys(text)
        on_card(browser, path, ".edit-save").click()

    def tags_line(path: str) -> list:
        return browser.execute_script(
            "const card = [...document.querySelectorAll('#cards .card')].find(c => c.dataset.path === arguments[0]);"
            "const line = card.querySelector('.style-line'); return [line.className, line.textContent]",
            path,
        )

    edit_tags("photos/img000.png", "red, tags w40", "red, hand tags\nline two")
    assert tags_line("photos/img000.png") == ["style-line edited", ".tagsred, hand tags\nline two"]
    assert caption_shown(browser, "photos/img000.png") == "A PNG picture, 40x32 pixels."
    edit_tags("photos/img001.png", "old tags by hand", "tags fixed by hand")  # a failed style's
    assert tags_line("photos/img001.png") == ["style-line edited", ".tagstags fixed by hand"]
    assert browser.find_element("id", "download-edits").text == "Download edits (2)"

    # Find & replace reaches the styles' captions, each named by its extension in the preview.
    browser.find_element("id", "open-replace").click()
    browser.find_element("id", "find").send_keys("red, ")
    browser.find_element("id", "preview-replace").click()
    assert "2 occurrences in 2 captions of the 3 images" in browser.find_element("id", "replace-summary").text
    rows = [row.text for row in browser.find_elements("css selector", "#replace-list li")]
    assert [row.split("\n")[0] for row in rows] == ["photos/img000.png .tags", "photos/img002.png .tags"]
    browser.find_element("id", "apply-replace").click()
    expected = {
        "img000.tags": "hand tags\nline two",
        "img001.tags": "tags fixed by hand",
        "img002.tags": "tags w42",
    }

    # Kept across a reload, downloaded as (image, .tags), applied with the run's --also.
    open_page(browser, page)
    assert tags_line("photos/img002.png")[1] == ".tagstags w42"
    browser.find_element("id", "download-edits").click()
    edits_file = tmp_path / "downloads" / "caption-edits.json"
    downloaded = json.loads(wait_for_file(edits_file))
    assert "--also PROMPT_FILE:.tags --apply-edits" in downloaded["apply"]
    assert sorted((Path(e["image"]).name, e["ext"], e["shown"], e["text"]) for e in downloaded["edits"]) == [
        ("img000.png", ".tags", "red, tags w40", expected["img000.tags"]),
        ("img001.png", ".tags", "old tags by hand", expected["img001.tags"]),
        ("img002.png", ".tags", "red, tags w42", expected["img002.tags"]),
    ]
    refused = run_script(folder, "--apply-edits", edits_file)
    assert refused.returncode == 1 and "refused: 3 edits" in refused.stderr
    applied = run_script(folder, *also, "--apply-edits", edits_file)
    assert applied.returncode == 0 and "applied 3 edits" in applied.stderr, applied.stderr
    for name, text in expected.items():
        assert (folder / name).read_bytes() == text.encode("utf-8"), name
    assert {path: path.read_bytes() for path in folder.glob("*.txt")} == main_captions


def test_the_page_keeps_what_a_failed_images_caption_holds_and_the_caption_extension(
    make_server, caption, tmp_path
):
    # A failed redo keeps the caption before it: that is the text a person edits on the page, and the
    # text --apply-edits checks the file against.
    folder = tmp_path / "photos"
    distinct_pictures(folder, 2)
    (folder / "img000.caption").write_text("an old caption, written by hand", encoding="utf-8")
    server = make_server(
        answer=lambda chat: (
            Reply(status=400, error="image too strange") if chat.picture().width == 40 else describe(chat)
        )
    )
    page = tmp_path / "review.html"
    run = caption(folder, "--existing", "overwrite", "--ext", ".caption", "--review", page, host=server.url)
    assert run.code == 1, run.err
    records = {record["path"]: record for record in page_images(page)}
    assert records["photos/img000.png"]["status"] == "failed"
    assert records["photos/img000.png"]["kept"] == "an old caption, written by hand"
    assert (
        records["photos/img001.png"]["status"] == "captioned" and "kept" not in records["photos/img001.png"]
    )
    html = page.read_text(encoding="utf-8")
    assert '"caption_ext": ".caption"' in html
