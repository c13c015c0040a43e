"""Small CLAP pieces for in-process tests: a word-level tokenizer over a fixed word list."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast


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
