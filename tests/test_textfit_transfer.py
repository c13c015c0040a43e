"""The text fit at its shipped defaults transfers from text to audio (issue 23).

Each test fits the default corpus (1,024 captions, the test's own 40 first, as ``--captions`` puts
them) at ``TextFitConfig()``, the CLI's and the node's defaults, on a constructed CLAP whose answer is
known, with the tiny SD1.5's CLIP-L targets (mean pairwise cosine >= 0.85: one dominant shared
direction, as real conditioning has). The CLAP embeddings are constructed directly (what the aligned
test CLAP of tests/textfit_support.py returns for them), so the test runs the CLI's recipe on cached
embeddings:

- text: caption ``i`` at ``unit(common * u + unit(r_i))`` (``u`` shared by all captions);
- audio of the first 40 captions: ``unit(t_c + shift * g + spread * e_s)`` (``g`` the clouds' shared
  offset, ``e_s`` per sound).

The recipe's settings were chosen on a third construction (common 1.0, shift 1.5, spread 1.2, seed 0);
the two here are held out. The ridge floor (noisy CLAP text -> the same targets, least squares) is
computed in the same test.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from training_support import one_thread  # noqa: F401 (module-wide fixture)

from clap2diffusion_core.training.captions import build_corpus
from clap2diffusion_core.training.textfit import TextFitConfig, bridge_noise, fit_text, retrieval_top1

SOUNDS = 40
CONSTRUCTIONS = {  # the clouds' shared offset (gap) and each sound's own spread differ
    "small-gap-wide-spread": {"common": 1.5, "shift": 1.0, "spread": 1.5, "seed": 1},
    "large-gap-narrow-spread": {"common": 0.7, "shift": 2.0, "spread": 0.9, "seed": 2},
}


def construct(m: int, common: float, shift: float, spread: float, seed: int, dim: int = 512):
    """``(text [m, dim], audio [SOUNDS, dim])``: unit rows; sound ``s`` belongs to caption ``s``."""
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(dim, generator=gen), dim=0)
    text = F.normalize(common * u + F.normalize(torch.randn(m, dim, generator=gen), dim=-1), dim=-1)
    g = F.normalize(torch.randn(dim, generator=gen), dim=0)
    e = F.normalize(torch.randn(SOUNDS, dim, generator=gen), dim=-1)
    return text, F.normalize(text[:SOUNDS] + shift * g + spread * e, dim=-1)


def ridge_floor(text: torch.Tensor, audio: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The best of two ridge maps (plain, and on 8 noisy copies at the default noise): CLAP -> targets."""
    best = {"text": 0.0, "audio": 0.0}
    gen = torch.Generator().manual_seed(11)
    for copies in (1, 8):
        x = text if copies == 1 else torch.cat([bridge_noise(text, TextFitConfig.noise, gen) for _ in range(copies)])
        x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        w = torch.linalg.solve(x1.T @ x1 + 1e-6 * len(x) * torch.eye(x1.shape[1], dtype=torch.float64),
                               x1.T @ targets.repeat(copies, 1).double()).float()

        def top1(q: torch.Tensor, t: torch.Tensor, w: torch.Tensor = w) -> float:
            s = F.normalize(torch.cat([q, torch.ones(len(q), 1)], 1) @ w, dim=-1) @ F.normalize(t, dim=-1).T
            return float((s.argmax(1) == torch.arange(len(q))).float().mean())

        best["text"] = max(best["text"], top1(text, targets))
        best["audio"] = max(best["audio"], top1(audio, targets[:SOUNDS]))
    return best


@pytest.fixture(scope="module")
def corpus_targets(test_models):
    from clap2diffusion_core.training.encoders import load_text_encoder

    own = [c.text for c in build_corpus(SOUNDS, seed=5)]
    captions = [c.text for c in build_corpus(1024, 0, own)]  # the CLI's corpus with --captions
    assert captions[:SOUNDS] == own
    clip = load_text_encoder(test_models.sd15_checkpoint)
    with torch.no_grad():
        targets = torch.cat([clip.pooled(captions[i:i + 128]) for i in range(0, len(captions), 128)])
    unit = F.normalize(targets, dim=-1)
    cos = unit @ unit.T
    mean_off = float((cos.sum() - cos.diagonal().sum()) / (cos.numel() - len(cos)))
    assert mean_off >= 0.85, mean_off  # a dominant shared direction
    return captions, targets


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_textfit_transfers_at_the_shipped_defaults(corpus_targets, name):
    captions, targets = corpus_targets
    text, audio = construct(len(captions), **CONSTRUCTIONS[name])
    truth = torch.arange(SOUNDS)
    defaults = TextFitConfig()
    assert (defaults.recipe, defaults.steps, defaults.noise) == (2, 0, 1.0) and len(captions) == 1024
    scores = {"floor": ridge_floor(text, audio, targets)}
    for label, config in (("bridged", defaults), ("no_bridge", TextFitConfig(noise=0.0))):
        model = fit_text(text, targets, config)
        scores[label] = {"text": retrieval_top1(model, text, targets, torch.arange(len(captions))),
                         "audio": retrieval_top1(model, audio, targets[:SOUNDS], truth)}
    raw = float(((audio @ text[:SOUNDS].T).argmax(1) == truth).float().mean())
    print(f"\n{name}: raw CLAP audio->text top-1 {raw:.3f}; top-1 (text over 1,024, audio over {SOUNDS}):",
          json.dumps(scores))
    bridged, floor = scores["bridged"], scores["floor"]
    assert bridged["text"] >= 0.9
    assert bridged["audio"] >= 0.8
    assert bridged["audio"] >= floor["audio"] + 0.3 and bridged["text"] > floor["text"]
