"""Small CLAP pieces for tests: a word-level tokenizer over a fixed word list, a shrunk CLAP config."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import ClapConfig, PreTrainedTokenizerFast

WORDS = "<s> <pad> </s> <unk> a the sound of thunder rain dog barking on beach waves".split()


def small_config(fused: bool = False) -> ClapConfig:
    """The HTS-AT + RoBERTa architecture, shrunk so a 10 s window encodes in well under a second."""
    audio = dict(
        depths=[1, 1, 1, 1],
        patch_embeds_hidden_size=32,
        num_attention_heads=[1, 2, 4, 8],
        hidden_size=256,  # 32 * 2 ** 3: the last Swin stage's width
        enable_fusion=fused,
        fusion_type="aff_2d" if fused else None,
    )
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
    )
    return ClapConfig(audio_config=audio, text_config=text, projection_dim=512)


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A RoBERTa-style (``<s> … </s>``) tokenizer whose ids are the positions in ``words``.

    ``words`` must start with ``<s> <pad> </s> <unk>``; no hub access is needed.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def narrow_config() -> ClapConfig:
    """:func:`small_config` with an even narrower HTS-AT (8 channels, one head per stage), for tests
    that stream hundreds of windows through a real server: the spectrogram front end and the
    window plumbing are full size, the network is not the point."""
    audio = dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=8, num_attention_heads=[1, 1, 1, 1], hidden_size=64)
    return ClapConfig(audio_config=audio, text_config=small_config().text_config.to_dict(), projection_dim=512)
