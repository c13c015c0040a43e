"""Helpers for the training tests: a feature cache written directly (no encoders), fast to build.

Examples come in ``kinds``: every example of a kind shares its caption, its caption's CLIP
features and an image latent pattern, and has a CLAP embedding near its kind's centre, the shape
of the synthetic smoke set without running CLAP, CLIP or a VAE.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clap2diffusion_core.training.features import EMPTY_CAPTION, CacheSpec, FeatureCache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training tests use tiny models: on a shared 2-core machine more threads only add contention
    (10x slower steps under load). Import into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def scratch_dir(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A module fixture's run folder, removed at the fixture's teardown.

    A training run leaves hundreds of MB (checkpoints, resume state: 1.3 GB for the SDXL one), and
    pytest keeps module-scoped folders to the end of the session; CI's disk is shared and has run
    out before. The run is deterministic: rerun the test to look at its files."""
    path = factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


SPEC = CacheSpec(clap="fake-clap", sd15="fake-sd15", resolution=64, clap_mode="first")


def write_fake_cache(root: Path, kinds: int = 4, per_kind: int = 4, latent_size: int = 8, seed: int = 0,
                     shard_size: int = 8, split: str = "train") -> Path:
    gen = torch.Generator().manual_seed(seed)
    n = kinds * per_kind
    kind = torch.arange(kinds).repeat_interleave(per_kind)
    centres = torch.randn(kinds, 512, generator=gen)
    clap = torch.nn.functional.normalize(centres[kind] + 0.3 * torch.randn(n, 512, generator=gen), dim=-1)
    text_pooled = torch.randn(kinds, 768, generator=gen)[kind]
    text = torch.randn(kinds, 77, 768, generator=gen)[kind]
    latents = torch.randn(kinds, 4, latent_size, latent_size, generator=gen)[kind]
    cache = FeatureCache(root)
    cache.claim(SPEC)
    for start in range(0, n, shard_size):
        rows = range(start, min(n, start + shard_size))
        cache.write_shard(
            0,
            {"clap": clap[rows.start:rows.stop], "text": text[rows.start:rows.stop].half(),
             "text_pooled": text_pooled[rows.start:rows.stop], "latents": latents[rows.start:rows.stop].half()},
            [{"id": f"ex{i:03d}", "caption": f"caption of kind {int(kind[i])}", "split": split} for i in rows],
        )
    save_file({"text": torch.randn(1, 77, 768, generator=gen).half(), "text_pooled": torch.randn(1, 768, generator=gen)},
              str(root / EMPTY_CAPTION))
    return root


def stage1_overrides(cache: Path, out: Path, steps: int, **extra: object) -> list[str]:
    """A small, fast stage-1 config over the fake cache."""
    overrides = {
        "steps": steps, "seed": 0, "output_dir": str(out), "data.cache": str(cache), "data.batch_size": 8,
        "data.num_workers": 0, "optim.lr": 2e-3, "optim.warmup_steps": 2, "optim.gradient_accumulation_steps": 1,
        "temperature.warmup_steps": 2, "temperature.anneal_steps": steps, "log_every": 2, "eval_every": 1000,
        "checkpoint_every": 1000, "model.projector": {"width": 64, "num_layers": 2, "num_heads": 4},
    } | extra
    return [f"{k}={_yaml(v)}" for k, v in overrides.items()]


def _yaml(value: object) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
