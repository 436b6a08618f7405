"""What reaches the model: every picture arrives upright, RGB, small enough, in a format llava decodes."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from conftest import picture, run_script
from PIL import Image


def received(server, index: int = 0) -> Image.Image:
    return server.chats[index].picture()


def two_band_photo(path, size=(600, 400), **save):
    """Top half red, bottom half blue: which way up it arrives shows at a glance."""
    image = Image.new("RGB", size, "red")
    image.paste(Image.new("RGB", (size[0], size[1] // 2), "blue"), (0, size[1] // 2))
    image.save(path, **save)
    return path


@pytest.mark.parametrize("name", ["a.webp", "a.tiff", "a.bmp", "a.gif", "a.avif"])
def test_formats_llava_cannot_read_arrive_as_jpeg(tmp_path, caption, server, name):
    picture(tmp_path / name, size=(320, 200), color=(30, 120, 200))

    run = caption(tmp_path)

    assert run.code == 0, run.err
    sent = received(server)
    assert sent.format == "JPEG" and sent.mode == "RGB" and sent.size == (320, 200)
    assert max(abs(a - b) for a, b in zip(sent.getpixel((160, 100)), (30, 120, 200))) < 8
    assert (tmp_path / "a.txt").read_text() == "A JPEG picture, 320x200 pixels."


def test_a_large_photo_arrives_no_larger_than_1344_pixels(tmp_path, caption, server):
    two_band_photo(tmp_path / "big.jpg", size=(6000, 4000), quality=85)
    caption(tmp_path)
    assert received(server).size == (1344, 896)


def test_max_size_sets_the_longer_side(tmp_path, caption, server):
    two_band_photo(tmp_path / "tall.png", size=(400, 1000))
    caption(tmp_path, "--max-size", 500)
    assert received(server).size == (200, 500)


def test_exif_rotated_photo_arrives_upright_and_at_the_right_size(tmp_path, caption, server):
    # Stored sideways (the red band on the right), with orientation 6: "rotate 90° clockwise to view".
    upright = Image.open(two_band_photo(tmp_path / "upright.png", size=(600, 400)))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "upright.png").unlink()

    caption(tmp_path)

    sent = received(server)
    assert sent.size == (600, 400)
    assert sent.getpixel((300, 50))[0] > 200 and sent.getpixel((300, 350))[2] > 200  # red on top


def test_transparency_is_flattened_onto_white(tmp_path, caption, server):
    picture(tmp_path / "logo.png", size=(100, 100), mode="RGBA", color=(0, 0, 0, 0))
    caption(tmp_path)
    assert received(server).getpixel((50, 50)) == (255, 255, 255)


def test_cmyk_and_16_bit_pictures_arrive_with_their_colours(tmp_path, caption, server):
    picture(tmp_path / "print.jpg", size=(64, 48), mode="CMYK", color=(0, 255, 255, 0), quality=95)  # red ink
    Image.new("I;16", (65, 48), 32768).save(tmp_path / "scan.png")  # mid grey, 16-bit

    caption(tmp_path)

    red, grey = sorted((chat.picture() for chat in server.chats), key=lambda sent: sent.width)
    assert red.mode == "RGB" and red.getpixel((32, 24))[0] > 200 and red.getpixel((32, 24))[1] < 60
    assert 110 < grey.getpixel((32, 24))[0] < 146


def test_animation_sends_its_first_frame(tmp_path, caption, server):
    frames = [Image.new("RGB", (80, 60), color) for color in ("lime", "red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)

    caption(tmp_path)

    assert received(server).getpixel((40, 30))[1] > 200


def test_a_small_plain_jpeg_or_png_is_sent_byte_for_byte(tmp_path, caption, server):
    photo = picture(tmp_path / "a.jpg", size=(800, 600), quality=92).read_bytes()
    screenshot = picture(tmp_path / "b.png", size=(800, 600)).read_bytes()

    caption(tmp_path)

    assert sorted(chat.images[0] for chat in server.chats) == sorted([photo, screenshot])


def test_max_size_zero_sends_the_original_bytes(tmp_path, caption, server):
    original = two_band_photo(tmp_path / "big.jpg", size=(3000, 2000), quality=85).read_bytes()
    caption(tmp_path, "--max-size", 0)
    assert server.chats[0].images[0] == original


def broken_files(folder):
    whole = two_band_photo(folder / "whole.jpg", size=(800, 600), quality=90).read_bytes()
    (folder / "half.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "letter.jpg").write_text("Dear Sir, this is not a photo.")
    # A 13000x13000 grey PNG (169 MB once decoded) whose data stops after its first row: its header
    # is all Pillow reads before refusing it, and making a whole one would cost a second of CPU.
    (folder / "bomb.png").write_bytes(png_header_only(13000, 13000))


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    first_row = zlib.compress(bytes(1 + width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", first_row) + chunk(b"IEND", b"")


def test_broken_files_fail_one_by_one_and_the_rest_is_captioned(tmp_path, caption, server):
    broken_files(tmp_path)

    run = caption(tmp_path)

    assert run.code == 1
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["whole.txt"]
    failures = [line for line in run.err.splitlines() if line.startswith("  failed ")]
    assert failures[:2] == [
        (
            "  failed bomb.png: refused: more pixels than Pillow's safety limit of 89,478,485 "
            "(a possible decompression bomb)"
        ),
        "  failed empty.png: empty file",
    ]
    assert failures[2].startswith("  failed half.jpg: cannot decode: image file is truncated")
    assert failures[3] == "  failed letter.jpg: not an image (or a format Pillow cannot read)"
    assert "Traceback" not in run.err


def quadrant_photo(size=(200, 120)) -> Image.Image:
    """Red top-left quadrant on blue: any rotation or mirror moves the red."""
    image = Image.new("RGB", size, "blue")
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), "red"), (0, 0))
    return image


# What a camera stores for each EXIF orientation: the upright picture transformed so that the
# viewer's correction (the tag) brings it back.
STORED = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_every_exif_orientation_arrives_upright(tmp_path, caption, server, orientation):
    stored = quadrant_photo()
    for step in STORED[orientation]:
        stored = stored.transpose(step)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    assert caption(tmp_path).code == 0

    sent = received(server)
    assert sent.size == (200, 120)
    assert sent.getpixel((20, 20))[0] > 200  # red top-left
    assert sent.getpixel((180, 20))[2] > 200 and sent.getpixel((20, 100))[2] > 200


def test_an_animated_or_transparent_png_is_never_sent_as_it_is(tmp_path, caption, server):
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("lime", "red")]
    frames[0].save(tmp_path / "moving.png", save_all=True, append_images=frames[1:])
    picture(tmp_path / "glass.png", size=(61, 40), mode="RGBA", color=(0, 0, 0, 0))
    picture(tmp_path / "keyed.png", size=(62, 40), color=(0, 255, 0), transparency=(0, 255, 0))  # tRNS
    originals = {path.read_bytes() for path in tmp_path.glob("*.png")}

    assert caption(tmp_path).code == 0

    assert {chat.images[0] for chat in server.chats}.isdisjoint(originals)
    assert {(chat.picture().format, chat.picture().size) for chat in server.chats} == {
        ("JPEG", (60, 40)),
        ("JPEG", (61, 40)),
        ("JPEG", (62, 40)),
    }


def test_library_chatter_stays_out_of_the_output(tmp_path, server):
    # A TIFF damaged mid-strip: libtiff writes "LZWDecode: Not enough data..." to file
    # descriptor 2 by itself, and Pillow warns about its EXIF.
    whole = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(whole, "TIFF", compression="tiff_lzw")
    data = whole.getvalue()
    (tmp_path / "damaged.tif").write_bytes(
        data[: len(data) // 2] + b"\0" * 100 + data[len(data) // 2 + 100 :]
    )
    (tmp_path / "short.tif").write_bytes(data[:300])
    picture(tmp_path / "fine.jpg")

    result = run_script(tmp_path, "--host", server.url)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "LZWDecode" in line or "Warning" in line or "warn" in line]
    assert any(line.startswith("  failed damaged.tif: cannot decode: ") for line in lines)
    assert (tmp_path / "fine.txt").exists()


@pytest.mark.parametrize(
    "size, sent",
    [
        ((10, 12), (32, 32)),  # a favicon: some encoders crash the runner under 28-32 px
        ((3000, 20), (1344, 32)),  # a strip: shrunk to 1344x9, then padded
        ((60, 4000), (32, 1344)),  # 20x1344 after shrinking: padded to 32 wide (at most 1:50)
        ((2000, 400), (1344, 269)),  # an ordinary panorama is left as it is
    ],
)
def test_pictures_too_small_or_too_thin_for_vision_encoders_are_padded_with_white(
    tmp_path, caption, server, size, sent
):
    picture(tmp_path / "a.png", size=size, color="blue")

    assert caption(tmp_path).code == 0

    received_picture = received(server)
    assert received_picture.size == sent
    centre = received_picture.getpixel((sent[0] // 2, sent[1] // 2))
    assert centre[2] > 200 and centre[0] < 60  # the picture itself, in the middle
    if sent != size and sent[1] > size[1]:
        assert min(received_picture.getpixel((sent[0] // 2, 0))) > 245  # white around it (JPEG)
