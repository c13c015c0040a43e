"""Fit Audio Projector (from text) on an SDXL-family checkpoint through a real ComfyUI server
(issue 12): the cached Segmind Vega test checkpoint (tools/test_models.py; ComfyUI detects it as
Segmind_Vega, with the full CLIP-L + CLIP-G) -> fit -> Apply Audio to Conditioning (tokens and pooled
vector) -> KSampler -> an image.

One test, kept small: 4 captions, 2 fit steps, 64 px, one sampling step. The Vega UNet and CLIP-G
take about 8 GB in the server in fp32, so the test links the checkpoint in only for itself and asks
the server to drop its models and caches afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import pixels
from test_textfit_server import FIT, _fitted, clean_fits, fit_to_image  # noqa: F401 (clean_fits: fixture)

from clap2diffusion_core.checkpoint import read_metadata
from tools import test_models as tm


@pytest.fixture
def vega(comfy, comfy_server):  # noqa: ANN001
    """The SDXL-family test checkpoint in the session server's checkpoints folder, for this test only."""
    path = tm.sdxl_checkpoint()
    link = comfy_server.base_dir / "models" / "checkpoints" / path.name
    link.symlink_to(path)
    try:
        yield path.name
    finally:
        link.unlink()
        comfy.free(unload_models=True, free_memory=True)


@pytest.mark.usefixtures("clean_fits")
def test_textfit_sdxl_fits_applies_tokens_and_pooled_and_samples(comfy, comfy_server, vega):
    def graph(**kwargs) -> dict:  # noqa: ANN003
        return fit_to_image(seed=201, steps=2, corpus_size=4, checkpoint=vega, **kwargs).prompt()

    sound = comfy.execute(graph(), timeout=900)
    files = _fitted(comfy_server)
    assert len(files) == 1 and files[0].name.startswith("textfit-sdxl-"), files
    meta = read_metadata(files[0])
    assert (meta["base_family"], meta["context_dim"], meta["pooled_dim"]) == ("sdxl", "2048", "1280")
    assert meta["text_encoder"].startswith("sdxl CLIP-L + CLIP-G (comfy SDXLClipModel)")
    image = pixels(sound.images[-1])
    assert image.shape == (64, 64, 3) and image.std() > 0
    fit_id = next(k for k, v in fit_to_image(seed=201, checkpoint=vega).nodes.items() if v["class_type"] == FIT)
    print(f"\nSDXL fit node: {sound.node_times.get(fit_id, float('nan')):.1f} s (4 captions, 2 steps)")

    # Strength 0: exactly the text-only image (the same graph without any audio node).
    silent = comfy.execute(graph(strength=0.0), timeout=600)
    text_only = comfy.execute(graph(sound=False), timeout=600)
    np.testing.assert_array_equal(pixels(silent.images[-1]), pixels(text_only.images[-1]))
    assert not np.array_equal(image, pixels(text_only.images[-1]))  # and the sound did change it
