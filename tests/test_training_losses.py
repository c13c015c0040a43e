"""Training objectives, schedules and stage configs."""

from __future__ import annotations

import math

import pytest
import torch

from clap2diffusion_core.levels import LEVEL_PRIOR
from clap2diffusion_core.training import losses
from clap2diffusion_core.training.config import load_config
from clap2diffusion_core.training.schedules import TemperatureSchedule
from clap2diffusion_core.types import AudioLevels


def _levels(assignment: torch.Tensor, tokens: torch.Tensor | None = None) -> AudioLevels:
    b, k, _ = assignment.shape
    return AudioLevels(tokens=tokens if tokens is not None else torch.randn(b, k, 8), assignment=assignment,
                       level_weights=torch.full((b, 3), 1 / 3), level_scale=torch.ones(3), temperature=1.0)


def test_info_nce_is_low_for_matching_pairs_and_high_for_shuffled_ones():
    text = torch.randn(6, 32)
    assert losses.info_nce(text * 3, text) < 0.01
    assert losses.info_nce(text.roll(1, 0), text) > 1.0


def test_info_nce_does_not_treat_repeated_captions_as_negatives():
    text = torch.randn(2, 32).repeat_interleave(2, 0)  # two clips per caption
    audio = text + 0.01 * torch.randn_like(text)
    unmasked = losses.info_nce(audio, text)
    masked = losses.info_nce(audio, text, caption_index=torch.tensor([0, 0, 1, 1]))
    assert unmasked > math.log(2) - 0.1  # a coin flip between the two identical captions
    assert masked < 0.01


def test_direction_mse_ignores_scale():
    text = torch.randn(4, 16)
    assert losses.direction_mse(60 * text, text) < 1e-10
    assert losses.direction_mse(-text, text) == pytest.approx(4.0)


def test_orthogonality_is_zero_for_orthogonal_levels_and_grows_when_they_align():
    one_hot = torch.eye(3).repeat(1, 1).unsqueeze(0)  # token k -> level k
    apart = _levels(one_hot, torch.eye(3, 8).unsqueeze(0))
    same = _levels(one_hot, torch.ones(1, 3, 8))
    assert losses.orthogonality(apart) == pytest.approx(0.0, abs=1e-6)
    assert losses.orthogonality(same) == pytest.approx(3.0)  # three pairs, |cos| = 1 each


def test_entropy_is_largest_for_even_assignments():
    even = _levels(torch.full((2, 5, 3), 1 / 3))
    sharp = _levels(torch.nn.functional.one_hot(torch.zeros(2, 5, dtype=torch.long), 3).float())
    assert losses.assignment_entropy(even) == pytest.approx(math.log(3))
    assert losses.assignment_entropy(sharp) == pytest.approx(0.0, abs=1e-5)


def test_prior_kl_is_zero_at_the_5_3_2_split():
    usage = torch.tensor(LEVEL_PRIOR).expand(2, 10, 3)
    assert losses.prior_kl(_levels(usage.clone()), LEVEL_PRIOR) == pytest.approx(0.0, abs=1e-6)
    assert losses.prior_kl(_levels(torch.full((2, 10, 3), 1 / 3)), LEVEL_PRIOR) > 0.01


def test_temperature_holds_then_anneals_cosine_from_2_to_0_5_across_stages():
    schedule = TemperatureSchedule(start=2.0, end=0.5, warmup_steps=200, anneal_steps=5000)
    assert schedule(0) == schedule(199) == 2.0
    midpoint = 200 + (5000 - 200) // 2
    assert schedule(midpoint) == pytest.approx(1.25)
    assert schedule(5000) == schedule(9000) == 0.5
    values = [schedule(s) for s in range(0, 5001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    stage2 = TemperatureSchedule(offset=3000)  # stage 2 continues where stage 1 stopped
    assert stage2(0) == schedule(3000) and stage2(2000) == 0.5


def test_shipped_configs_carry_the_original_numbers():
    s1 = load_config("stage1")
    s2 = load_config("stage2", ["sd15=x.safetensors"])
    s3 = load_config("stage3", ["sd15=x.safetensors"])
    assert (s1.steps, s2.steps, s3.steps) == (3000, 2000, 1000)
    assert (s1.optim.lr, s2.optim.lr, s3.optim.lr) == (1e-4, 5e-5, 1e-5)
    assert (s1.loss.infonce, s1.loss.mse, s1.loss.epsilon) == (1.0, 0.5, 0.0)
    assert (s2.loss.orthogonality, s2.loss.entropy, s2.loss.epsilon) == (0.1, 0.01, 1.0)
    assert s3.optim.max_grad_norm == 0.5
    assert "adapter" in s2.model.train and "adapter" not in s1.model.train
    assert s1.temperature(0) == 2.0 and s3.temperature(0) == 0.5


def test_config_overrides_are_typed_and_typos_are_errors():
    config = load_config("stage1", ["optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "data.batch_size=32"])
    assert (config.optim.lr, config.optim.betas, config.data.batch_size) == (3e-4, (0.8, 0.9), 32)
    with pytest.raises(ValueError, match=r"optim\.: unknown keys \['learning_rate'\]"):
        load_config("stage1", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="set sd15"):
        load_config("stage2")
    with pytest.raises(FileNotFoundError, match="stage1"):
        load_config("stage9")
