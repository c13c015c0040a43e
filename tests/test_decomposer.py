"""The hierarchical decomposer: K tokens softly assigned to foreground / background / ambience."""

import pytest
import torch

from clap2diffusion_core.decomposer import DecomposerConfig, HierarchicalDecomposer


@pytest.fixture
def decomposer() -> HierarchicalDecomposer:
    torch.manual_seed(0)
    return HierarchicalDecomposer(DecomposerConfig()).eval()


def embeds(batch: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)


def entropy(assignment: torch.Tensor) -> float:
    assignment = assignment.detach()
    return float(-(assignment * assignment.clamp_min(1e-12).log()).sum(-1).mean())


def test_default_size_is_about_0_3m_parameters(decomposer):
    assert 0.25e6 < sum(p.numel() for p in decomposer.parameters()) < 0.35e6


def test_shapes_and_distributions(decomposer):
    levels = decomposer(embeds(4))
    assert levels.tokens.shape == (4, 10, 32)
    assert levels.assignment.shape == (4, 10, 3)
    assert levels.level_weights.shape == (4, 3)
    torch.testing.assert_close(levels.assignment.sum(-1), torch.ones(4, 10))
    torch.testing.assert_close(levels.level_weights.sum(-1), torch.ones(4))
    assert levels.level_scale.tolist() == [1.0, 1.0, 1.0]


def test_higher_temperature_spreads_the_assignment(decomposer):
    e = embeds(8)
    entropies = [
        entropy(decomposer(e, temperature=t).assignment)
        for t in (0.25, 0.5, 1.0, 2.0, 8.0)
    ]
    assert entropies == sorted(entropies)
    assert entropies[-1] > 2 * entropies[0]
    assert entropies[-1] <= torch.log(torch.tensor(3.0)).item() + 1e-6


def test_untrained_decomposer_follows_the_5_3_2_prior():
    torch.manual_seed(0)
    decomposer = HierarchicalDecomposer(DecomposerConfig())
    with torch.no_grad():  # no learned preference: only the prior shapes the assignment
        decomposer.assign_head[1].weight.zero_()
        decomposer.assign_head[1].bias.zero_()
    usage = decomposer(embeds(4), temperature=1.0).level_usage()
    torch.testing.assert_close(usage, torch.tensor([[0.5, 0.3, 0.2]]).expand(4, 3))


def test_each_sample_gets_its_own_level_weights(decomposer):
    weights = decomposer(embeds(4)).level_weights
    assert not torch.allclose(weights[0], weights[1])


def test_rejects_wrong_embedding_size_and_temperature(decomposer):
    with pytest.raises(ValueError, match=r"\[B, 512\]"):
        decomposer(torch.randn(2, 768))
    with pytest.raises(ValueError, match="temperature"):
        decomposer(embeds(1), temperature=0.0)


def test_level_scale_is_carried_for_the_injection(decomposer):
    scaled = decomposer(embeds(1)).with_level_scale(2.0, 0.0, 1.0)
    assert scaled.level_scale.tolist() == [2.0, 0.0, 1.0]
