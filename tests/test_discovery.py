"""Which images a run finds, in what order, and which it refuses to caption."""

from __future__ import annotations

import os

from conftest import closed_port_url, picture


def listed(run) -> list:
    return run.out.splitlines()


def test_dry_run_lists_images_of_every_extension_in_sorted_order_and_sends_nothing(tmp_path, caption, server):
    for name in ["b.JPG", "a.png", "c.jpeg", "d.webp", "e.gif", "f.bmp", "g.tif", "h.TIFF", "i.avif"]:
        picture(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "j.jpg.txt").write_text("a caption, not an image")

    run = caption(tmp_path, "--dry-run")

    assert run.code == 0
    assert listed(run) == [
        "a.png",
        "b.JPG",
        "c.jpeg",
        "d.webp",
        "e.gif",
        "f.bmp",
        "g.tif",
        "h.TIFF",
        "i.avif",
    ]
    assert "would caption 9" in run.err
    assert server.chats == []
    assert [p.name for p in tmp_path.glob("*.txt")] == ["j.jpg.txt"]  # there before the run


def test_dry_run_needs_no_server(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    run = caption(tmp_path, "--dry-run", host=closed_port_url())
    assert run.code == 0
    assert listed(run) == ["a.jpg"]


def test_hidden_files_and_temporary_files_are_ignored(tmp_path, caption):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / ".hidden.jpg")
    picture(tmp_path / ".thumbs" / "b.jpg")
    assert listed(caption(tmp_path, "--dry-run", "-r")) == ["a.jpg"]


def test_subfolders_only_with_recursive(tmp_path, caption):
    picture(tmp_path / "top.jpg")
    picture(tmp_path / "b" / "two.jpg")
    picture(tmp_path / "a" / "deeper" / "three.png")

    assert listed(caption(tmp_path, "--dry-run")) == ["top.jpg"]
    assert listed(caption(tmp_path, "--dry-run", "--recursive")) == [
        os.path.join("a", "deeper", "three.png"),
        os.path.join("b", "two.jpg"),
        "top.jpg",
    ]


def test_recursive_follows_folder_links_but_not_loops(tmp_path, caption, server):
    picture(tmp_path / "data" / "a.jpg")
    (tmp_path / "data" / "back-to-top").symlink_to(tmp_path)
    (tmp_path / "data" / "self").symlink_to(tmp_path / "data")

    run = caption(tmp_path / "data", "-r")

    assert run.code == 0
    assert len(server.chats) == 1
    assert (tmp_path / "data" / "a.txt").exists()


def test_images_sharing_a_stem_are_both_reported_and_neither_captioned(tmp_path, caption, server):
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.jpg")

    run = caption(tmp_path)

    assert run.code == 1
    assert len(server.chats) == 1  # only b.jpg
    assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "b.txt").exists()
    assert "a.jpg: shares a.txt with a.png" in run.err
    assert "a.png: shares a.txt with a.jpg" in run.err
    assert "failed 2" in run.err


def test_same_stem_in_different_folders_is_no_conflict(tmp_path, caption):
    picture(tmp_path / "x" / "a.jpg")
    picture(tmp_path / "y" / "a.jpg")
    run = caption(tmp_path, "-r")
    assert run.code == 0
    assert (tmp_path / "x" / "a.txt").exists() and (tmp_path / "y" / "a.txt").exists()


def test_a_subfolder_named_like_an_images_stem_is_no_twin(tmp_path, caption):
    # Twins are two images that would write one caption file; a folder writes none.
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "a" / "b.jpg")
    run = caption(tmp_path, "-r")
    assert run.code == 0, run.err
    assert (tmp_path / "a.txt").exists() and (tmp_path / "a" / "b.txt").exists()


def test_missing_folder_is_a_start_error(tmp_path, caption):
    run = caption(tmp_path / "nope")
    assert run.code == 2
    assert "nope is not a folder" in run.err


def test_limit_captions_at_most_n_images(tmp_path, caption, server):
    for name in "abcde":
        picture(tmp_path / f"{name}.jpg")
    (tmp_path / "a.txt").write_text("already")

    run = caption(tmp_path, "--limit", 2)

    assert run.code == 0
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["a.txt", "b.txt", "c.txt"]
    assert len(server.chats) == 2
