"""Conditioning injection: audio tokens appended to the text tokens."""

import pytest
import torch

from clap2diffusion_core.conditioning import append_audio_tokens


def test_appends_scaled_audio_after_the_text():
    text, audio = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    out = append_audio_tokens(text, audio, 0.5)
    assert out.shape == (1, 154, 768)
    assert torch.equal(out[:, :77], text)
    torch.testing.assert_close(out[:, 77:], audio * 0.5)


def test_one_sound_for_a_batch_of_prompts_and_one_prompt_for_a_batch_of_windows():
    assert append_audio_tokens(
        torch.randn(3, 77, 768), torch.randn(1, 77, 768), 1
    ).shape == (3, 154, 768)
    assert append_audio_tokens(
        torch.randn(1, 77, 768), torch.randn(4, 77, 768), 1
    ).shape == (4, 154, 768)
    with pytest.raises(ValueError, match="batch sizes differ"):
        append_audio_tokens(torch.randn(2, 77, 768), torch.randn(3, 77, 768), 1)


def test_context_size_mismatch_names_the_cause():
    with pytest.raises(ValueError, match="context size 1024 .* has 768"):
        append_audio_tokens(torch.randn(1, 77, 768), torch.randn(1, 77, 1024), 1)


def test_follows_the_text_dtype_and_device():
    out = append_audio_tokens(
        torch.randn(1, 77, 768, dtype=torch.float16), torch.randn(1, 77, 768), 1
    )
    assert out.dtype == torch.float16
