"""data.py: which image files a YOLOv5 split entry (folder, .txt list, image, or a list of them) names."""

from __future__ import annotations

import os
import re

import pytest

from yolo_prune_plugin.backend.data import IMG_SUFFIXES, image_files
from yolo_prune_plugin.errors import ConfigError


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return paths


def test_folder_is_listed_recursively_with_suffix_filter_and_any_case(tmp_path):
    root = tmp_path / "images"
    _touch(root / "b.jpg", root / "a.PNG", root / "sub" / "deep" / "c.JpEg", root / "sub" / "d.webp",
           root / "notes.txt", root / "e.jpg.bak", root / "labels.cache", root / "noext")
    assert image_files(root) == [root / "a.PNG", root / "b.jpg", root / "sub" / "d.webp",
                                 root / "sub" / "deep" / "c.JpEg"]


def test_every_known_suffix_is_an_image(tmp_path):
    files = _touch(*(tmp_path / f"x{i}{s}" for i, s in enumerate(IMG_SUFFIXES)))
    assert image_files(tmp_path) == sorted(files)
    assert ".jpg" in IMG_SUFFIXES and ".png" in IMG_SUFFIXES and ".txt" not in IMG_SUFFIXES


def test_txt_list_resolves_relative_lines_against_its_folder(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    a, b = _touch(tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "b.jpg")
    lst = lists / "train.txt"
    lists.mkdir()
    lst.write_text(f"../imgs/b.jpg\n\n  ./../imgs/a.jpg  \n{a}\n", encoding="utf-8")  # blank, padded, absolute
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not against the working directory
    assert image_files(lst) == [a, b]
    assert image_files(os.path.relpath(lst, elsewhere)) == [a, b]  # a relative entry without root: the cwd's


def test_root_resolves_relative_entries_but_not_absolute_ones(tmp_path):
    (a,) = _touch(tmp_path / "ds" / "images" / "train" / "a.jpg")
    (b,) = _touch(tmp_path / "other" / "b.jpg")
    assert image_files("images/train", root=tmp_path / "ds") == [a]
    assert image_files(str(b), root=tmp_path / "ds") == [b]


def test_list_of_entries_is_merged_deduplicated_and_sorted(tmp_path):
    a, b, c = _touch(tmp_path / "f1" / "z.jpg", tmp_path / "f1" / "a.jpg", tmp_path / "f2" / "m.png")
    lst = tmp_path / "l.txt"
    lst.write_text("f1/z.jpg\nf2/m.png\nf2/../f1/a.jpg\n")  # the same files under other spellings
    out = image_files([tmp_path / "f2", lst, str(tmp_path / "f1"), c])
    assert out == sorted([a, b, c]) == [b, a, c]
    assert image_files((tmp_path / "f1", tmp_path / "f1")) == [b, a]  # a tuple works too


def test_a_single_image_file_is_an_entry(tmp_path):
    (a,) = _touch(tmp_path / "only.JPG")
    assert image_files(a) == [a]


def test_results_are_absolute_and_resolved(tmp_path, monkeypatch):
    (a,) = _touch(tmp_path / "d" / "a.jpg")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    assert image_files("link") == [a.resolve()]
    assert all(p.is_absolute() for p in image_files("d"))


def test_empty_folder_is_no_images_not_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert image_files(tmp_path / "empty") == []


@pytest.mark.parametrize("name", ["missing", "missing.txt", "data.yaml"])
def test_bad_entry_is_config_error_naming_the_path(tmp_path, name):
    bad = tmp_path / name
    if name == "data.yaml":
        bad.write_text("train: x\n")  # exists, but neither folder, list nor image
    _touch(tmp_path / "ok" / "a.jpg")
    with pytest.raises(ConfigError, match="^" + re.escape(str(bad)) + r": split entry is neither an image folder, a \.txt list nor an image"):
        image_files([tmp_path / "ok", bad])
