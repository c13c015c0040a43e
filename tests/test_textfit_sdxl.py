"""Stage 1 from text alone for SDXL (issue 12): the pooled head, its file, the pooled vector on the
conditioning, and SDXL's targets on both paths (ComfyUI's CLIP, and the single-file checkpoint read
with transformers).

The first tests run on small constructed targets. Two read the cached Segmind Vega test checkpoint
(3.1 GB, built on demand by tools/test_models.py; its CLIP-L + CLIP-G are full size): they are
marked slow, so ``make test-quick`` neither builds nor loads it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from comfy_pack import load
from safetensors import safe_open
from training_support import one_thread  # noqa: F401 (module-wide fixture)

from clap2diffusion_core.checkpoint import build_metadata, load_checkpoint, read_metadata
from clap2diffusion_core.conditioning import apply_audio_to_conditioning, pooled_share
from clap2diffusion_core.errors import CheckpointError
from clap2diffusion_core.training.textfit import (
    Provenance,
    TextFitConfig,
    caption_token_mean,
    fit_text,
    new_model,
    pooled_outputs,
    read_provenance,
    save_text_fit,
    stage1_loss,
)
from clap2diffusion_core.types import AudioTokens
from tools import test_models as tm

SMALL = {"width": 64, "num_layers": 2, "num_heads": 4}


def _targets(m: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``clap [m, 512]`` unit rows, token targets ``[m, 2048]``, pooled targets ``[m, 1280]`` of norm ~3.6."""
    gen = torch.Generator().manual_seed(seed)
    clap = F.normalize(torch.randn(m, 512, generator=gen), dim=-1)
    return clap, torch.randn(m, 2048, generator=gen), torch.randn(m, 1280, generator=gen) * 0.1


def _provenance(config: TextFitConfig) -> Provenance:
    return Provenance(corpus_sha256="c" * 64, corpus_size=16, clap_fingerprint="clapfp",
                      text_encoder_fingerprint="clipfp", text_encoder="sdxl CLIP-L + CLIP-G", text_fit=config)


# ------------------------------------------------------------------------------------------------
# the pooled head


def test_textfit_pooled_head_learns_the_pooled_targets():
    """With pooled targets the fit adds a pooled head; the loss falls, and each caption's pooled
    output moves from chance to its own target (nearest among 16), at the targets' mean norm."""
    clap, tokens, pooled = _targets()
    config = TextFitConfig(steps=80, batch_size=16, noise=0.0, projector=SMALL)
    untrained = new_model(config, 2048, 1280, float(pooled.norm(dim=-1).mean()))
    model = fit_text(clap, tokens, config, pooled=pooled)
    assert model.pooled_head is not None and model.config.pooled_dim == 1280

    index = torch.arange(16)
    with torch.no_grad():
        before = stage1_loss(untrained.eval(), clap, tokens, index, config.final_temperature, config, pooled)
        after = stage1_loss(model, clap, tokens, index, config.final_temperature, config, pooled)
    assert float(after) < 0.5 * float(before)

    cos_before = F.cosine_similarity(pooled_outputs(untrained, clap), pooled)
    out = pooled_outputs(model, clap)
    cos_after = F.cosine_similarity(out, pooled)
    print(f"\npooled head: cosine to own target {cos_before.mean():.3f} -> {cos_after.mean():.3f}")
    assert cos_before.abs().mean() < 0.1 and cos_after.mean() > 0.7
    nearest = (F.normalize(out, dim=-1) @ F.normalize(pooled, dim=-1).T).argmax(dim=1)
    assert torch.equal(nearest, index)
    torch.testing.assert_close(out.norm(dim=-1), pooled.norm(dim=-1).mean().expand(16))


def test_textfit_sdxl_file_roundtrips_with_its_pooled_head(tmp_path):
    clap, tokens, pooled = _targets()
    config = TextFitConfig(steps=3, batch_size=8, projector=SMALL)
    with torch.inference_mode():  # as ComfyUI runs its nodes
        model = fit_text(clap, tokens, config, pooled=pooled)
    path = save_text_fit(model, tmp_path / "fit.safetensors", _provenance(config))
    meta = read_metadata(path)
    assert (meta["base_family"], meta["context_dim"], meta["pooled_dim"], meta["format_version"]) == \
        ("sdxl", "2048", "1280", "2")
    assert read_provenance(path)["text_encoder"] == "sdxl CLIP-L + CLIP-G"

    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    audio = loaded.project(loaded.encode(clap[:2]))
    assert audio.tokens.shape == (2, 77, 2048) and audio.pooled.shape == (2, 1280)
    torch.testing.assert_close(audio.pooled, pooled_outputs(model, clap[:2]))


def test_textfit_sd15_files_are_unchanged_by_the_pooled_head(tmp_path):
    """An SD1.5 file has no pooled head, no ``pooled`` config entry, no ``pooled_dim`` metadata, and
    stays format version 1 (what every earlier pack reads)."""
    clap, _, _ = _targets()
    config = TextFitConfig(steps=2, batch_size=8, projector=SMALL)
    model = fit_text(clap, torch.randn(16, 768), config)
    assert model.pooled_head is None and not any(k.startswith("pooled_head.") for k in model.state_dict())
    meta = build_metadata(model.config)
    assert meta["format_version"] == "1" and "pooled_dim" not in meta
    assert set(json.loads(meta["config"])) == {"base_family", "stage", "decomposer", "projector", "adapter"}
    path = save_text_fit(model, tmp_path / "sd15.safetensors", _provenance(config))
    loaded = load_checkpoint(path)
    assert loaded.config.pooled is None and loaded.project(loaded.encode(clap[:1])).pooled is None


def test_textfit_a_pooled_head_file_claiming_no_pooled_dim_is_refused(tmp_path):
    clap, tokens, pooled = _targets()
    model = fit_text(clap, tokens, TextFitConfig(steps=1, batch_size=8, projector=SMALL), pooled=pooled)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    meta = build_metadata(model.config)
    del meta["pooled_dim"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="pooled_dim"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# Apply Audio to Conditioning with a pooled vector


def _audio(context_dim: int = 2048, pooled: torch.Tensor | None = None) -> AudioTokens:
    gen = torch.Generator().manual_seed(1)
    return AudioTokens(tokens=torch.randn(1, 77, context_dim, generator=gen), token_levels=torch.zeros(77, dtype=torch.long),
                       level_scale=torch.ones(3), source="f" * 16, pooled=pooled)


def test_textfit_apply_audio_mixes_the_pooled_vector_by_strength():
    gen = torch.Generator().manual_seed(2)
    text, text_pooled, audio_pooled = torch.randn(1, 77, 2048, generator=gen), torch.randn(1, 1280, generator=gen), \
        torch.randn(1, 1280, generator=gen)
    options = {"pooled_output": text_pooled, "width": 1024, "height": 1024}
    conditioning = [[text, options]]
    audio = _audio(pooled=audio_pooled)

    assert apply_audio_to_conditioning(conditioning, audio, 0.0) is conditioning  # exactly the text-only one
    for strength, share in ((0.5, 0.25), (1.0, 0.5), (2.0, 1.0), (3.0, 1.0)):
        assert pooled_share(strength) == share
        (tokens, out), = apply_audio_to_conditioning(conditioning, audio, strength)
        torch.testing.assert_close(out["pooled_output"], text_pooled + share * (audio_pooled - text_pooled))
        assert tokens.shape == (1, 154, 2048) and out["width"] == 1024
    assert options["pooled_output"] is text_pooled  # the input's options are never changed in place

    # A file without a pooled head (or a conditioning without pooled_output) leaves the pooled vector alone.
    (_, out), = apply_audio_to_conditioning(conditioning, _audio(), 1.0)
    assert out["pooled_output"] is text_pooled


def test_textfit_sd15_file_on_sdxl_conditioning_names_both_families():
    conditioning = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(CheckpointError, match="sd15.*sdxl"):
        apply_audio_to_conditioning(conditioning, _audio(768), 1.0)
    with pytest.raises(CheckpointError, match="pooled"):  # a pooled vector of another width
        apply_audio_to_conditioning(conditioning, _audio(pooled=torch.zeros(1, 768)), 1.0)


# ------------------------------------------------------------------------------------------------
# SDXL's targets: ComfyUI's CLIP (the node) and the checkpoint through transformers (the CLI)

CAPTIONS = ["a dog barking", "heavy rain on a tin roof with thunder in the distance", "x"]


@pytest.fixture(scope="module")
def sdxl_checkpoint():
    return tm.sdxl_checkpoint()


@pytest.mark.slow  # loads the 3.1 GB checkpoint's CLIP-G twice
def test_textfit_sdxl_targets_are_the_same_from_comfyuis_clip_and_from_the_checkpoint(sdxl_checkpoint):
    """The CLI's CLIP-L + CLIP-G (transformers, OpenCLIP keys converted) give the node's targets from
    ComfyUI's own SDXL CLIP: the token mean ``[n, 2048]`` and the pooled vector ``[n, 1280]``."""
    from clap2diffusion_core.training.sdxl_text import checkpoint_text_family, load_sdxl_text_encoder

    assert checkpoint_text_family(sdxl_checkpoint) == "sdxl"
    fit_nodes = load("nodes.fit_nodes")  # puts ComfyUI on the path
    import comfy.sd

    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sdxl_checkpoint), output_vae=False, output_model=False)
    assert fit_nodes.text_encoder_family(clip)[0] == "sdxl"
    with torch.inference_mode():
        node_tokens, node_pooled = fit_nodes.sdxl_targets(clip, CAPTIONS)
        # The node's batched encode is ComfyUI's own encode_from_tokens, caption by caption.
        cond, pooled = clip.encode_from_tokens(clip.tokenize(CAPTIONS[1]), return_pooled=True)
    torch.testing.assert_close(node_pooled[1:2], pooled.float(), rtol=1e-4, atol=1e-4)
    ends = torch.tensor([clip.tokenize(CAPTIONS[1])["l"][0].index((49407, 1.0), 1)])
    torch.testing.assert_close(node_tokens[1:2], caption_token_mean(cond.float(), ends), rtol=1e-4, atol=1e-4)
    del clip
    encoder = load_sdxl_text_encoder(sdxl_checkpoint)
    cli_tokens, cli_pooled = encoder(CAPTIONS)
    assert node_tokens.shape == (3, 2048) and node_pooled.shape == (3, 1280)
    torch.testing.assert_close(cli_tokens, node_tokens, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cli_pooled, node_pooled, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(node_pooled[0], node_pooled[1])  # captions differ, so do their vectors


@pytest.mark.slow  # loads the 3.1 GB checkpoint's CLIP-G
def test_textfit_command_line_fits_sdxl_from_the_single_file_checkpoint(sdxl_checkpoint, test_models, tmp_path, capsys):
    from clap2diffusion_core.training.cli import main

    argv = ["fit-text", "--clap", str(test_models.clap_folder), "--checkpoint", str(sdxl_checkpoint),
            "--out", str(tmp_path), "--corpus-size", "4", "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = tmp_path / report["file"].rsplit("/", 1)[-1]
    assert report["base_family"] == "sdxl" and path.name.startswith("textfit-sdxl-")
    model = load_checkpoint(path)
    assert (model.config.base_family, model.config.context_dim, model.config.pooled_dim) == ("sdxl", 2048, 1280)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["text_encoder"].startswith("sdxl CLIP-L + CLIP-G")
    print(f"\nSDXL fit-text timings: {json.dumps(report['seconds'])}, targets_per_s {report.get('targets_per_s')}")


def test_textfit_sdxl_pooled_vector_follows_per_frame_token_rows():
    """Scale Audio Tokens per Frame makes one token row per frame; an SDXL file's pooled vector gets
    one row per frame too, and each frame's weight scales its share of the pooled mix as it scales
    its tokens: a frame at weight 0 keeps the text's pooled vector."""
    schedule_nodes = load("nodes.schedule_nodes")
    types = load("clap2diffusion_core.types")
    conditioning = load("clap2diffusion_core.conditioning")
    pooled = torch.randn(1, 1280)
    audio = types.AudioTokens(tokens=torch.ones(1, 77, 2048), token_levels=torch.zeros(77, dtype=torch.long),
                              level_scale=torch.ones(3), source="f" * 16, pooled=pooled)
    out = schedule_nodes.ScaleAudioTokensPerFrame.execute(audio, [0.0, 0.5, 1.0], 1.0, 0.0).result[0]
    assert out.tokens.shape == (3, 77, 2048) and out.tokens[0].abs().max() == 0
    assert out.pooled.shape == (3, 1280) and out.pooled_weight.tolist() == [0.0, 0.5, 1.0]

    text = torch.randn(1, 1280)
    (_, options), = conditioning.apply_audio_to_conditioning([[torch.zeros(1, 77, 2048), {"pooled_output": text}]],
                                                            out, 2.0)
    mixed = options["pooled_output"]  # [3, 1280]: shares 0, 0.5, 1 at strength 2
    torch.testing.assert_close(mixed[0], text[0])
    torch.testing.assert_close(mixed[1], 0.5 * (text[0] + pooled[0]))
    torch.testing.assert_close(mixed[2], pooled[0])
