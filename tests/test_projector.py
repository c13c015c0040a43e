"""The audio projector: decomposed audio -> 77 tokens of the UNet's context size, mean norm 60."""

import pytest
import torch

from clap2diffusion_core.levels import split_by_prior
from clap2diffusion_core.projector import AudioProjector, ProjectorConfig
from clap2diffusion_core.testing import random_model


def encode(model, batch=3, seed=1):
    torch.manual_seed(seed)
    return model.encode(torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1))


def test_default_size_is_about_2_2m_parameters():
    projector = AudioProjector(ProjectorConfig())
    assert 2.0e6 < sum(p.numel() for p in projector.parameters()) < 2.4e6


@pytest.mark.parametrize("context_dim", [768, 1024, 2048])
def test_tokens_have_the_context_size_and_mean_norm_target(context_dim):
    model = random_model(context_dim=context_dim)
    tokens = model.project(encode(model)).tokens
    assert tokens.shape == (3, 77, context_dim)
    torch.testing.assert_close(
        tokens.norm(dim=-1).mean(dim=1), torch.full((3,), 60.0), atol=1e-3, rtol=0
    )


def test_norm_target_comes_from_the_config():
    model = random_model()
    model.projector.config = ProjectorConfig(norm_target=25.0)
    mean_norm = model.project(encode(model)).tokens.norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(mean_norm, torch.full((3,), 25.0), atol=1e-3, rtol=0)


def test_tokens_are_split_across_levels_by_the_prior():
    assert split_by_prior(77) == (39, 23, 15)
    levels = random_model().projector.token_levels
    assert torch.bincount(levels).tolist() == [39, 23, 15]


def test_user_level_scale_multiplies_that_level_only():
    model = random_model()
    levels = encode(model)
    base = model.project(levels).tokens
    scaled = model.project(levels.with_level_scale(1.0, 0.0, 2.0)).tokens
    token_levels = model.projector.token_levels
    torch.testing.assert_close(scaled[:, token_levels == 0], base[:, token_levels == 0])
    assert scaled[:, token_levels == 1].abs().max() == 0
    torch.testing.assert_close(
        scaled[:, token_levels == 2], 2 * base[:, token_levels == 2]
    )


def test_different_sounds_give_different_tokens_and_silence_is_its_own():
    model = random_model()
    out = model.project(encode(model, batch=2))
    assert not torch.allclose(out.tokens[0], out.tokens[1])
    assert out.uncond.shape == (1, 77, 768)
    torch.testing.assert_close(
        out.uncond, model.project(model.encode(torch.zeros(1, 512))).tokens
    )


def test_projection_is_deterministic():
    model = random_model()
    levels = encode(model)
    assert torch.equal(model.project(levels).tokens, model.project(levels).tokens)
