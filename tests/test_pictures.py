"""tools/pictures.py (make pictures): the screenshot it picks whatever the browser test names it,
and the small PNG it writes. The pictures themselves come from the tests that draw them."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from tools.pictures import pick_screenshot, shrink


def _png(path, mtime: float, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    os.utime(path, (mtime, mtime))
    return path


def test_pictures_pick_the_clean_screenshot_then_the_plain_one_then_the_newest(tmp_path) -> None:
    _png(tmp_path / "audio_text_to_image_error_missing_sound.png", 9)
    _png(tmp_path / "audio_lora.png", 8)
    older = _png(tmp_path / "1.32.9" / "audio_text_to_image.png", 1)
    newer = _png(tmp_path / "1.58.1" / "audio_text_to_image-run.png", 2)
    assert pick_screenshot(tmp_path) == older  # the plain name beats a newer variant
    older.unlink()
    assert pick_screenshot(tmp_path) == newer  # one per frontend: the newest
    clean = _png(tmp_path / "1.49.6" / "audio_text_to_image_loaded.png", 0)
    assert pick_screenshot(tmp_path) == clean  # the graph as opened beats any run


def test_pictures_without_a_screenshot_say_which_test_makes_it(tmp_path) -> None:
    _png(tmp_path / "error_audio_text_to_image.png", 1)
    with pytest.raises(FileNotFoundError, match="test_browser_workflows.py -k audio_text_to_image"):
        pick_screenshot(tmp_path)


def test_pictures_are_shrunk_to_small_palette_pngs(tmp_path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (2400, 1350), (200, 100, 50)).save(big)
    out = shrink(big, tmp_path / "out" / "small.png")
    with Image.open(out) as image:
        assert image.size == (1600, 900) and image.mode == "P"
    small = _png(tmp_path / "tiny.png", 1, size=(322, 272))
    with Image.open(shrink(small, tmp_path / "tiny_out.png")) as image:
        assert image.size == (322, 272)  # never enlarged
