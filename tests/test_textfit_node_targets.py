"""The node's SD1.5 targets (issue 23): ComfyUI's CLIP run only up to the longest caption's end token
gives the same values as its full 77-token conditioning, and leaves the CLIP as it found it.

ComfyUI's CLIP always adds all 77 position embeddings, so the node swaps in a view of the first rows
for the call (``fit_nodes.positions_cut``): 1,024 captions then take ~1/4 of the time. SDXL's cut is
checked against ComfyUI's own ``encode_from_tokens`` in tests/test_textfit_sdxl.py (slow).
"""

from __future__ import annotations

import torch
from comfy_pack import load

from clap2diffusion_core.training.textfit import caption_token_mean
from tools import test_models as tm

CAPTIONS = ["a dog barking", "heavy rain on a tin roof with thunder in the distance and wind", "x"]


def test_textfit_node_targets_cut_after_the_longest_caption_equal_the_full_encoding(test_models):
    fit_nodes = load("nodes.fit_nodes")
    tm.import_comfy()
    import comfy.sd

    clip = comfy.sd.load_checkpoint_guess_config(str(test_models.sd15_checkpoint), output_vae=False,
                                                 output_model=False)[1]
    with torch.inference_mode():
        cut = fit_nodes.pooled_targets(clip, CAPTIONS)
        full_states, ends = fit_nodes.sd15_states(clip, CAPTIONS)  # 77 positions, as the distillation reads them
        short_states, _ = fit_nodes.sd15_states(clip, CAPTIONS, cut=True)
        single = clip.encode_from_tokens(clip.tokenize(CAPTIONS[1])).float()  # ComfyUI's own, one caption
    assert full_states.shape[1] == 77 and short_states.shape[1] == int(ends.max()) + 1 < 77
    torch.testing.assert_close(cut, caption_token_mean(full_states, ends), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_states[1:2], single, rtol=1e-5, atol=1e-5)
    # The CLIP is as it was: every tower reads its full position table again.
    tables = [m for m in clip.cond_stage_model.modules() if type(m).__name__ == "CLIPEmbeddings"]
    assert tables and all(m.position_embedding.weight.shape[0] == 77 for m in tables)
    assert not torch.allclose(cut[0], cut[1])
