"""The text fit's name for a CLIP (issue 12): the same checkpoint is the same CLIP on every load.

ComfyUI's loader leaves weights a checkpoint does not ship as uninitialised memory (SD1.5 files
carry no CLIP-L text projection). The fingerprint must ignore those and only those, or the same
inputs fit again under a new name whenever that memory differs (it did, in long server sessions).
"""

from __future__ import annotations

import pytest
import torch
from comfy_pack import load

from tools import test_models as tm

UNREAD = "clip_l.transformer.text_projection.weight"


@pytest.fixture(scope="module")
def load_clip(test_models):  # noqa: ANN001
    tm.import_comfy()
    import comfy.sd

    def load_once():  # noqa: ANN202
        return comfy.sd.load_checkpoint_guess_config(str(test_models.sd15_checkpoint), output_vae=False)[1]

    return load_once


def test_textfit_every_load_of_a_checkpoint_gets_the_same_clip_fingerprint(load_clip):  # noqa: ANN001
    fit_nodes = load("nodes.fit_nodes")
    first, second = load_clip(), load_clip()
    state = second.cond_stage_model.state_dict()
    assert UNREAD in state  # the weight exists in ComfyUI's model, though the file has none
    with torch.no_grad():  # what uninitialised memory may hold on another load
        state[UNREAD].copy_(torch.randn(state[UNREAD].shape, generator=torch.Generator().manual_seed(1)))
    assert fit_nodes.clip_fingerprint(first) == fit_nodes.clip_fingerprint(second)


def test_textfit_clip_fingerprint_still_follows_a_weight_the_conditioning_reads(load_clip):  # noqa: ANN001
    fit_nodes = load("nodes.fit_nodes")
    first, second = load_clip(), load_clip()
    read = second.cond_stage_model.state_dict()["clip_l.transformer.text_model.final_layer_norm.weight"]
    with torch.no_grad():
        read[0] += 0.5
    assert fit_nodes.clip_fingerprint(first) != fit_nodes.clip_fingerprint(second)
