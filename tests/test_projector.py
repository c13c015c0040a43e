"""The audio projector: decomposed audio -> 77 tokens of the UNet's context size, mean norm 60."""

from dataclasses import replace

import pytest
import torch

from clap2diffusion_core.levels import split_by_prior
from clap2diffusion_core.model import CLAP2DiffusionModel
from clap2diffusion_core.projector import AudioProjector, ProjectorConfig
from clap2diffusion_core.testing import random_model


def encode(model, batch=3, seed=1):
    torch.manual_seed(seed)
    return model.encode(torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1))


def mean_norm_per_level(tokens: torch.Tensor, token_levels: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` mean L2 norm of each level's tokens."""
    norms = tokens.norm(dim=-1)
    return torch.stack([norms[:, token_levels == level].mean(dim=1) for level in range(3)], dim=1)


def test_default_size_is_about_2_2m_parameters():
    projector = AudioProjector(ProjectorConfig())
    assert 2.0e6 < sum(p.numel() for p in projector.parameters()) < 2.4e6


@pytest.mark.parametrize("context_dim", [768, 1024, 2048])
def test_tokens_have_the_context_size_and_mean_norm_target(context_dim):
    model = random_model(context_dim=context_dim)
    tokens = model.project(encode(model)).tokens
    assert tokens.shape == (3, 77, context_dim)
    torch.testing.assert_close(tokens.norm(dim=-1).mean(dim=1), torch.full((3,), 60.0), atol=1e-3, rtol=0)


def test_norm_target_comes_from_the_config():
    # A model built from its own config (as a file with norm_target 25 would be), not a patched one.
    base = random_model()
    config = replace(base.config, projector=replace(base.config.projector, norm_target=25.0))
    model = CLAP2DiffusionModel(config).eval()
    model.load_state_dict(base.state_dict())
    mean_norm = model.project(encode(model)).tokens.norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(mean_norm, torch.full((3,), 25.0), atol=1e-3, rtol=0)


def test_tokens_are_split_across_levels_by_the_prior():
    assert split_by_prior(77) == (39, 23, 15)
    levels = random_model().projector.token_levels
    assert torch.bincount(levels).tolist() == [39, 23, 15]


def test_adaptive_level_weights_set_the_levels_relative_norms():
    """Doubling one level's adaptive weight doubles its tokens' norm relative to the other levels."""
    model = random_model()
    levels = encode(model, batch=1)
    doubled = levels.level_weights * torch.tensor([2.0, 1.0, 1.0])
    token_levels = model.projector.token_levels
    before = mean_norm_per_level(model.project(levels).tokens, token_levels)
    after = mean_norm_per_level(model.project(replace(levels, level_weights=doubled)).tokens, token_levels)
    ratio_before = before[:, 0] / before[:, 1]
    ratio_after = after[:, 0] / after[:, 1]
    torch.testing.assert_close(ratio_after, 2 * ratio_before, rtol=1e-4, atol=0)
    torch.testing.assert_close(before[:, 1] / before[:, 2], after[:, 1] / after[:, 2], rtol=1e-4, atol=0)


def test_user_level_weights_are_carried_by_the_tokens_and_applied_once_by_weighted():
    model = random_model()
    levels = encode(model)
    base = model.project(levels)
    scaled = model.project(levels.with_level_scale(1.0, 0.0, 2.0))
    # The projection itself ignores them (the model injection applies them in the adapter) ...
    torch.testing.assert_close(scaled.tokens, base.tokens)
    assert scaled.level_scale.tolist() == [1.0, 0.0, 2.0]
    # ... and the conditioning injection applies them to that level's tokens only.
    weighted, token_levels = scaled.weighted(), scaled.token_levels
    torch.testing.assert_close(weighted[:, token_levels == 0], base.tokens[:, token_levels == 0])
    assert weighted[:, token_levels == 1].abs().max() == 0
    torch.testing.assert_close(weighted[:, token_levels == 2], 2 * base.tokens[:, token_levels == 2])


def test_different_sounds_give_different_tokens_and_silence_is_its_own():
    model = random_model()
    out = model.project(encode(model, batch=2))
    assert not torch.allclose(out.tokens[0], out.tokens[1])
    silence = model.silence_tokens()
    assert silence.shape == (1, 77, 768)
    assert not torch.allclose(silence[0], out.tokens[0]) and not torch.allclose(silence[0], out.tokens[1])


def test_tokens_name_the_file_that_made_them_and_projection_never_computes_silence(monkeypatch):
    model, other = random_model(seed=0), random_model(seed=1)
    assert model.fingerprint != other.fingerprint
    monkeypatch.setattr(CLAP2DiffusionModel, "silence_tokens", lambda *a: pytest.fail("silence on the data path"))
    tokens = model.project(encode(model))
    assert tokens.source == model.fingerprint
    model.check_tokens(tokens)
    with pytest.raises(ValueError, match="made by the CLAP2Diffusion file .*wire the same CLAP2Diffusion Loader"):
        other.check_tokens(tokens, "Apply Audio to Model")
    with pytest.raises(ValueError, match="wire the same CLAP2Diffusion Loader into Hierarchical Decompose and Audio"):
        other.project(encode(model))
