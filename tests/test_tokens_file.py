"""The audio-tokens file: what Save Audio Tokens writes and Load Audio Tokens reads."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from clap2diffusion_core.checkpoint import save_checkpoint
from clap2diffusion_core.errors import Clap2DiffusionError, TokensFileError
from clap2diffusion_core.testing import random_model
from clap2diffusion_core.tokens_file import load_tokens, save_tokens


@pytest.fixture(scope="module")
def model():
    return random_model(stage=2, layout="tiny", seed=4)


def tokens_of(model, seed=0, levels=(1.5, 1.0, 0.5)):
    gen = torch.Generator().manual_seed(seed)
    embeds = F.normalize(torch.randn(2, 512, generator=gen), dim=-1)
    return model.project(model.encode(embeds).with_level_scale(*levels))


def test_a_round_trip_keeps_tokens_levels_weights_and_source(model, tmp_path):
    tokens = tokens_of(model)
    save_tokens(tokens, tmp_path / "t.safetensors")
    loaded = load_tokens(tmp_path / "t.safetensors")
    assert torch.equal(loaded.tokens, tokens.tokens)
    assert torch.equal(loaded.token_levels, tokens.token_levels)
    assert loaded.level_scale.tolist() == [1.5, 1.0, 0.5]
    assert loaded.source == model.fingerprint
    model.check_tokens(loaded)  # the file's own model accepts them
    with pytest.raises(Clap2DiffusionError, match="made by the CLAP2Diffusion file"):
        random_model(stage=2, layout="tiny", seed=5).check_tokens(loaded)


def test_an_sdxl_files_pooled_vector_survives_the_round_trip(model, tmp_path):
    """Tokens from a file with a pooled head (SDXL) carry the pooled vector [B, 1280] through the file;
    SD1.5 tokens have none before or after."""
    assert load_tokens_after_save(tokens_of(model), tmp_path / "sd15.safetensors").pooled is None
    from clap2diffusion_core.training.textfit import TextFitConfig, new_model

    sdxl = new_model(TextFitConfig(projector={"width": 64, "num_layers": 1, "num_heads": 4}), 2048, 1280, 3.0).eval()
    tokens = tokens_of(sdxl)
    assert tokens.pooled.shape == (2, 1280)
    loaded = load_tokens_after_save(tokens, tmp_path / "sdxl.safetensors")
    assert torch.equal(loaded.pooled, tokens.pooled) and torch.equal(loaded.tokens, tokens.tokens)


def load_tokens_after_save(tokens, path):
    save_tokens(tokens, path)
    return load_tokens(path)


def test_pickles_model_files_and_cut_files_are_refused_naming_what_they_are(model, tmp_path):
    with open(tmp_path / "p.safetensors", "wb") as f:
        pickle.dump({"tokens": [1.0]}, f)
    with pytest.raises(TokensFileError, match="PyTorch pickle"):
        load_tokens(tmp_path / "p.safetensors")
    save_checkpoint(model, tmp_path / "model.safetensors")
    with pytest.raises(TokensFileError, match="not an audio-tokens file \\(format: 'clap2diffusion'"):
        load_tokens(tmp_path / "model.safetensors")
    save_tokens(tokens_of(model), tmp_path / "t.safetensors")
    whole = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TokensFileError, match="truncated"):
        load_tokens(tmp_path / "cut.safetensors")
