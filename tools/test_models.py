"""Random-weight test models of the real architectures, built on demand and cached.

No Stable Diffusion or CLAP weights can be downloaded here, so tests and the demo run on models
that have the real architectures and file formats but random weights:

- ``checkpoints/tiny-sd15.safetensors``: a single-file SD1.5 checkpoint that ComfyUI's own
  ``CheckpointLoaderSimple`` detects as SD15 (tiny UNet, TAESD as the VAE, a full CLIP-L).
- ``checkpoints/vega-sdxl-random.safetensors``: a single-file SDXL-family checkpoint that
  ``CheckpointLoaderSimple`` detects as ``Segmind_Vega`` (the full Vega UNet, 745M parameters, no
  tiny SDXL is detected), TAESD as the VAE, a full CLIP-L and CLIP-G; 3.1 GB in fp16, so it is
  built only on demand (``sdxl_checkpoint()``, ``--print sdxl_checkpoint``), not by ``build_all``.
- ``controlnet/tiny-sd15-controlnet.safetensors``: a ``control_model.``-prefixed ControlNet for it.
- ``loras/tiny-sd15-lora.safetensors``: a kohya-style LoRA on the UNet attention projections.
- ``clap/tiny-clap-htsat-unfused/``: a transformers ``ClapModel`` folder (HTSAT-tiny + RoBERTa)
  with feature extractor and an offline-trained byte-level BPE tokenizer.
- ``sounds/*.wav``: a few synthetic sounds (48 kHz / 44.1 kHz, mono / stereo, 1-12 s).
- ``clap2diffusion/tiny-clap2diffusion-stage1.safetensors``: from
  ``clap2diffusion_core.testing.random_checkpoint`` once the core package provides it.
- ``clap2diffusion/tiny-clap2diffusion-stage3.safetensors``: the same with adapter layers for the
  tiny UNet (gates open), for Apply Audio to Model.

Everything is seeded, so a build is deterministic, and cached under
``.cache/test-models/<VERSION>/`` in the layout of ComfyUI's ``models/`` folder (bump
``VERSION`` whenever an artifact changes). CLI: ``python tools/test_models.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: must not shadow ComfyUI's `nodes`
from clap2diffusion_core.unet_configs import (  # noqa: E402
    SD15_UNET_CONFIG,
    SEGMIND_VEGA_UNET_CONFIG,
    TINY_SD15_UNET_CONFIG,
    unet_kwargs,
)

VERSION = "v2"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "test-models" / VERSION

log = logging.getLogger("test_models")

# File names, relative to the cache root (mirrors ComfyUI's models/ layout).
SD15_CHECKPOINT = "checkpoints/tiny-sd15.safetensors"
CONTROLNET = "controlnet/tiny-sd15-controlnet.safetensors"
LORA = "loras/tiny-sd15-lora.safetensors"
CLAP_FOLDER = "clap/tiny-clap-htsat-unfused"
CLAP2DIFFUSION = "clap2diffusion/tiny-clap2diffusion-stage1.safetensors"
CLAP2DIFFUSION_ADAPTER = "clap2diffusion/tiny-clap2diffusion-stage3.safetensors"
# Not part of build_all (3.1 GB, about a minute to build): sdxl_checkpoint() builds it on demand.
SDXL_CHECKPOINT = "checkpoints/vega-sdxl-random.safetensors"
SOUNDS_DIR = "sounds"

# The tiny SD1.5 UNet (clap2diffusion_core/unet_configs.py): SD1.5 on a single level.
TINY_UNET_CONFIG: dict[str, Any] = unet_kwargs(TINY_SD15_UNET_CONFIG)


@dataclass(frozen=True)
class TestModels:
    """Paths of the built test models. ``clap2diffusion`` is None until the core provides it."""

    root: Path
    sd15_checkpoint: Path
    controlnet: Path
    lora: Path
    clap_folder: Path
    sounds: dict[str, Path] = field(default_factory=dict)
    clap2diffusion: Path | None = None
    clap2diffusion_adapter: Path | None = None  # stage 3, adapters for the tiny UNet

    def folders(self) -> dict[str, Path]:
        """ComfyUI model folder name -> the folder holding our file(s), for extra_model_paths."""
        folders = {
            "checkpoints": self.sd15_checkpoint.parent,
            "controlnet": self.controlnet.parent,
            "loras": self.lora.parent,
            "clap": self.clap_folder.parent,
        }
        if self.clap2diffusion is not None:
            folders["clap2diffusion"] = self.clap2diffusion.parent
        return folders


# --------------------------------------------------------------------------------------------
# ComfyUI import (only tools and tests do this; clap2diffusion_core never imports ComfyUI)


def comfyui_path() -> Path:
    """The ComfyUI checkout: ``$COMFYUI_PATH`` if set, else the pack's own ``.comfyui``."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()


def import_comfy() -> None:
    """Make ComfyUI's top-level modules importable in this process, forced onto the CPU.

    ComfyUI must come first on sys.path: its ``nodes.py`` would otherwise be shadowed by the
    pack's ``nodes/`` package whenever the repo root is on the path too.
    """
    path = str(comfyui_path())
    if not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        raise RuntimeError(f"ComfyUI not found at {path}: run `make setup` or set COMFYUI_PATH")
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    if "comfy.model_management" not in sys.modules:
        # model_management probes the device at import: decide before it is imported.
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True


# --------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (for library initialisers) without disturbing the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Fill every parameter from one seeded generator, independent of torch's initialisers.

    ComfyUI builds its modules with ``disable_weight_init`` (uninitialised memory), so this is
    what makes them deterministic. Fan-in scaling keeps activations O(1) through the few blocks of
    the tiny models, so fp16 stays finite; zero-initialised convs in the real models get random
    values here too, so every part of the network changes the output.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            values = torch.randn(param.shape, generator=gen) * (gain / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        else:  # biases
            values = 0.02 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))


def _atomic_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _save_safetensors(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a half-written file must never look like a cached model."""
    from safetensors.torch import save_file

    tmp = _atomic_path(target)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, target)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One builder at a time per cache (pytest and `make demo` may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(target: Path, build: Callable[[Path], None], force: bool) -> Path:
    if force and target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if not target.exists():
        start = time.perf_counter()
        build(target)
        log.info("built %s in %.1fs", target.name, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect the root logger's warnings inside the block (ComfyUI logs through it)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger().removeHandler(handler)


def _metadata(kind: str, seed: int) -> dict[str, str]:
    return {"clap2diffusion_test_model": kind, "seed": str(seed), "test_models_version": VERSION}


# --------------------------------------------------------------------------------------------
# SD1.5 checkpoint, ControlNet, LoRA


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """ComfyUI's UNetModel in the tiny SD1.5 configuration, random weights."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**TINY_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    _randomize(unet, seed)
    return unet


def sd15_unet_model(full: bool = False, seed: int = 0):  # noqa: ANN201  (a comfy ModelPatcher)
    """A ComfyUI MODEL of an SD1.5 UNet with random weights, as the checkpoint loader makes it: the
    tiny test configuration, or with ``full`` the real SD1.5 architecture (860M parameters; for a
    GPU). The benchmarks and timing tools build theirs here."""
    import_comfy()
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if full:
        unet = UNetModel(**unet_kwargs(SD15_UNET_CONFIG), operations=comfy.ops.disable_weight_init)
        _randomize(unet, seed)
    else:
        unet = tiny_unet(seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    del unet
    return comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]


def sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The full single-file checkpoint state dict (fp16), in the original SD key layout."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in tiny_unet(seed).state_dict().items():
        sd[f"model.diffusion_model.{key}"] = value

    for key, value in _random_taesd(seed + 1).items():
        sd[f"first_stage_model.{key}"] = value
    for key, value in _random_clip_l(seed + 2).items():
        sd[f"cond_stage_model.transformer.{key}"] = value
    return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}


def _random_taesd(seed: int) -> dict[str, torch.Tensor]:
    """TAESD as the VAE: ComfyUI's VAE class recognises ``taesd_decoder.*`` (2.45M parameters
    instead of the 84M of the full SD VAE, whose config ComfyUI fixes)."""
    import_comfy()
    from comfy.taesd.taesd import TAESD

    taesd = TAESD(latent_channels=4)
    _randomize(taesd, seed)
    with torch.no_grad():  # identity latent scaling, as in TAESD's own files
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return taesd.state_dict()


def _random_clip_l(seed: int) -> dict[str, torch.Tensor]:
    """A full random CLIP-L (ComfyUI's own config, fixed by the SD15 and SDXL model types), keys
    ``text_model.*`` as in the original checkpoints."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**json.loads((comfyui_path() / "comfy" / "sd1_clip_config.json").read_text()))
    with _seeded(seed):
        clip = CLIPTextModel(config)
    # transformers 4.x nests the weights under `text_model.`, 5.x does not.
    return {f"text_model.{k.removeprefix('text_model.')}": v for k, v in clip.state_dict().items()}


def build_sd15_checkpoint(target: Path, seed: int = 0) -> None:
    _save_safetensors(sd15_state_dict(seed), target, _metadata("sd15", seed))


# --------------------------------------------------------------------------------------------
# SDXL-family checkpoint (Segmind Vega)


def vega_unet(seed: int = 0, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """ComfyUI's UNetModel in Segmind Vega's configuration (745M parameters), random weights.

    Built in fp16 directly: the fp32 copy alone would be 3 GB on a shared machine.
    """
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_kwargs(SEGMIND_VEGA_UNET_CONFIG), dtype=dtype, operations=comfy.ops.disable_weight_init)
    _randomize(unet, seed)
    return unet


def _random_clip_g(seed: int) -> dict[str, torch.Tensor]:
    """A full random OpenCLIP ViT-bigG text tower (ComfyUI's ``clip_config_bigg.json``, 695M
    parameters) as transformers ``CLIPTextModelWithProjection`` keys, fp16."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**json.loads((comfyui_path() / "comfy" / "clip_config_bigg.json").read_text()))
    with _seeded(seed):
        clip = CLIPTextModelWithProjection(config)
    return {k: v.half() for k, v in clip.state_dict().items()}


def sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The single-file SDXL-family checkpoint (fp16) in the original layout: ``model.diffusion_model.*``,
    ``first_stage_model.*`` (TAESD), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L)
    and ``conditioner.embedders.1.model.*`` (CLIP-G in the OpenCLIP layout: fused ``in_proj``,
    ``resblocks``, ``text_projection`` as ``x @ W``), converted by ComfyUI's own save path
    (``SDXL.process_clip_state_dict_for_saving``), so it is laid out as ComfyUI writes SDXL files.
    """
    import_comfy()
    import comfy.supported_models

    sd: dict[str, torch.Tensor] = {}
    for key, value in vega_unet(seed).state_dict().items():
        sd[f"model.diffusion_model.{key}"] = value
    for key, value in _random_taesd(seed + 1).items():
        sd[f"first_stage_model.{key}"] = value.half()
    clip = {f"clip_l.transformer.{k}": v.half() for k, v in _random_clip_l(seed + 2).items()}
    clip.update({f"clip_g.transformer.{k}": v for k, v in _random_clip_g(seed + 3).items()})
    config = comfy.supported_models.Segmind_Vega(unet_kwargs(SEGMIND_VEGA_UNET_CONFIG))
    sd.update(config.process_clip_state_dict_for_saving(clip))
    return sd


def build_sdxl_checkpoint(target: Path, seed: int = 0) -> None:
    _save_safetensors(sdxl_state_dict(seed), target, _metadata("sdxl-segmind-vega", seed))


def sdxl_checkpoint(root: Path | str | None = None, *, force: bool = False, seed: int = 0) -> Path:
    """Build (or reuse) the SDXL-family test checkpoint under ``root`` (default the cache)."""
    root = Path(root) if root is not None else DEFAULT_CACHE
    with _build_lock(root):
        return _cached(root / SDXL_CHECKPOINT, lambda p: build_sdxl_checkpoint(p, seed), force)


def build_controlnet(target: Path, seed: int = 0) -> None:
    """comfy.cldm.cldm.ControlNet with the tiny UNet's config and an RGB hint, fp16."""
    import_comfy()
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in TINY_UNET_CONFIG.items() if k not in ("out_channels", "transformer_depth_output")}
    net = ControlNet(hint_channels=3, **config, operations=comfy.ops.disable_weight_init)
    # Small gain: the zero convs of a trained ControlNet add modest residuals, not a takeover.
    _randomize(net, seed + 10, gain=0.5)
    sd = {f"control_model.{k}": v.half() for k, v in net.state_dict().items()}
    _save_safetensors(sd, target, _metadata("controlnet", seed))


def _unet_weight_shapes() -> dict[str, torch.Size]:
    """Parameter shapes of the tiny UNet, from a meta-device instance (no memory, no init)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**TINY_UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in unet.state_dict().items()}


def lora_target_keys() -> list[str]:
    """UNet module keys (no ``diffusion_model.``) the test LoRA patches: attention q/k/v/out."""
    suffixes = tuple(f".{attn}.{proj}.weight" for attn in ("attn1", "attn2")
                     for proj in ("to_q", "to_k", "to_v", "to_out.0"))
    return [k[: -len(".weight")] for k in _unet_weight_shapes() if k.endswith(suffixes)]


def build_lora(target: Path, seed: int = 0, rank: int = 8) -> None:
    """Kohya-format LoRA (``lora_unet_<key, dots as _>``) with enough weight to change images."""
    shapes = _unet_weight_shapes()
    gen = torch.Generator().manual_seed(seed + 20)
    sd: dict[str, torch.Tensor] = {}
    for key in lora_target_keys():
        out_features, in_features = shapes[f"{key}.weight"]
        name = "lora_unet_" + key.replace(".", "_")
        # delta = up @ down * alpha / rank, about 0.3x the scale of the random base weights.
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
        sd[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * (0.3 / math.sqrt(rank))
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    _save_safetensors({k: v.half() for k, v in sd.items()}, target, _metadata("lora", seed))


# --------------------------------------------------------------------------------------------
# CLAP

# Everyday sound words for the tokenizer: enough for realistic prompts, nothing downloaded.
SOUND_CORPUS = """
thunder rumbles in the distance as heavy rain falls on a tin roof
a dog barks while cars pass by on a wet street
birds chirp and sing in a quiet forest at dawn
ocean waves crash on the beach and seagulls call
wind howls through the trees during a storm
a crowd cheers and claps in a large stadium
a train horn blows and the wheels clatter on the tracks
an engine starts and a motorcycle accelerates away
people talk and laugh in a busy cafe with clinking cups
a baby cries and a woman speaks softly
fire crackles and pops in a fireplace
church bells ring over a city square
footsteps echo in an empty hallway and a door slams
a cat meows and purrs near a window
water drips from a faucet into a sink
an airplane flies overhead with a loud roar
a helicopter hovers and its blades thump
sirens wail as an ambulance speeds through traffic
a man whistles a tune while walking
keys jingle and a lock clicks open
a clock ticks and chimes at noon
frogs croak and insects buzz near a pond at night
a river flows over rocks with a gentle babble
guitar music plays with drums and a singing voice
a piano melody with soft strings in the background
children play and shout in a playground
a lawn mower hums and a leaf blower whirs
typing on a keyboard and a mouse clicking
glass breaks and shatters on a hard floor
a horse gallops and neighs in a field
cows moo and sheep bleat on a farm
a rooster crows in the early morning
a tone beeps and a chirp sweeps upward in pitch
static noise hisses and crackles from a radio
snow crunches under boots in a cold winter wind
"""


def _train_tokenizer(vocab_size: int) -> Any:
    """A RoBERTa-style byte-level BPE tokenizer trained on SOUND_CORPUS (offline)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    # RoBERTa's special tokens at RoBERTa's ids (ClapTextConfig: bos 0, pad 1, eos 2).
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    lines = [line.strip() for line in SOUND_CORPUS.strip().splitlines()]
    bpe.train_from_iterator(lines * 4, vocab_size=min(vocab_size, 2000), min_frequency=2,
                            special_tokens=specials, show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                     sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                     pad_token="<pad>", mask_token="<mask>", model_max_length=512)
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    assert [tokenizer.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3, 4]
    return tokenizer


def build_clap_folder(target: Path, seed: int = 0) -> None:
    """``ClapModel(ClapConfig())`` (the laion/clap-htsat-unfused architecture) saved the way the
    hub folder is: config, fp32 safetensors, feature extractor and tokenizer, loadable offline."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    config = ClapConfig()
    with _seeded(seed + 30):
        model = ClapModel(config).eval()
    # The unfused model takes one random 10 s crop of longer audio, not the fusion mel stack.
    # The band laion/clap-htsat-unfused's own preprocessor_config names (50 Hz - 14 kHz), which the
    # loader now reads from the processor_config.json that save_pretrained writes.
    extractor = ClapFeatureExtractor(truncation="rand_trunc", frequency_min=50, frequency_max=14_000)
    processor = ClapProcessor(feature_extractor=extractor,
                              tokenizer=_train_tokenizer(config.text_config.vocab_size))

    tmp = _atomic_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    (tmp / "TEST_MODEL.md").write_text(
        f"Random-weight ClapModel for tests (seed {seed}, test models {VERSION}). Not a real CLAP.\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------------
# sounds

# name -> (sample rate, channels, seconds)
SOUND_SPECS: dict[str, tuple[int, int, float]] = {
    "thunder.wav": (48_000, 1, 8.0),
    "thunder_44k_stereo.wav": (44_100, 2, 12.0),
    "tone_440hz.wav": (44_100, 1, 2.0),
    "chirp_stereo.wav": (48_000, 2, 5.0),
    "click_1s.wav": (48_000, 1, 1.0),
}


def synth_sound(name: str, seed: int = 0) -> tuple[np.ndarray, int]:
    """One of SOUND_SPECS as float32 ``[T, C]`` in [-1, 1] and its sample rate."""
    rate, channels, seconds = SOUND_SPECS[name]
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    n = int(rate * seconds)
    t = np.arange(n, dtype=np.float64) / rate
    if name.startswith("thunder"):
        # Brown noise (integrated white noise) in a few decaying bursts: a rumble, not a hiss.
        brown = np.cumsum(rng.standard_normal(n))
        brown -= np.convolve(brown, np.ones(2048) / 2048, mode="same")  # remove the drift
        envelope = np.zeros(n)
        for onset in np.sort(rng.uniform(0, seconds * 0.8, size=4)):
            after = np.clip(t - onset, 0, None)
            envelope += (t >= onset) * np.exp(-after / rng.uniform(0.6, 2.0))
        mono = brown * envelope
    elif name.startswith("tone"):
        mono = np.sin(2 * np.pi * 440.0 * t) * np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    elif name.startswith("chirp"):
        f0, f1 = 200.0, 8000.0  # exponential sweep
        mono = np.sin(2 * np.pi * f0 * seconds / math.log(f1 / f0) * ((f1 / f0) ** (t / seconds) - 1))
    else:  # clicks on white noise floor
        mono = 0.01 * rng.standard_normal(n)
        mono[:: rate // 8] = 1.0
    mono = mono / (np.abs(mono).max() + 1e-9) * 0.8
    if channels == 1:
        audio = mono[:, None]
    else:  # stereo with a slight delay on the right, so the channels differ
        audio = np.stack([mono, np.roll(mono, rate // 1000) * 0.9], axis=1)
    return audio.astype(np.float32), rate


def build_sound(target: Path, seed: int = 0) -> None:
    import soundfile

    audio, rate = synth_sound(target.name, seed)
    tmp = _atomic_path(target)
    soundfile.write(str(tmp), audio, rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------------
# CLAP2Diffusion file (the core team's format)


def build_clap2diffusion(target: Path, seed: int = 0, stage: int = 1) -> bool:
    """Build with ``clap2diffusion_core.testing.random_checkpoint``; False if not available yet.

    Stage 2/3 files carry adapter layers for the tiny UNet's cross-attention layers.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # appended: must not shadow ComfyUI's `nodes`
    try:
        from clap2diffusion_core.testing import random_checkpoint
    except ImportError as err:
        if err.name not in ("clap2diffusion_core", "clap2diffusion_core.testing") and \
                "random_checkpoint" not in str(err):
            raise  # a real bug in the core package, not a missing piece
        log.warning("skipping the CLAP2Diffusion test file: clap2diffusion_core.testing."
                    "random_checkpoint does not exist yet (%s)", err)
        return False
    tmp = _atomic_path(target)
    if stage == 1:
        random_checkpoint(str(tmp), context_dim=768, stage=1, seed=seed)
    else:
        random_checkpoint(str(tmp), context_dim=768, stage=stage, seed=seed, layout="tiny")
    os.replace(tmp, target)
    return True


def _core_fingerprint() -> str:
    """Hash of the core package's top-level sources: the file format lives there, not here."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "clap2diffusion_core").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cached_clap2diffusion(target: Path, seed: int, force: bool, stage: int = 1) -> Path | None:
    """Rebuilt whenever the core's code changes (the core team evolves the format)."""
    stamp = target.with_name(target.name + ".core-fingerprint")
    fingerprint = _core_fingerprint()
    if force or not target.exists() or not stamp.exists() or stamp.read_text() != fingerprint:
        target.unlink(missing_ok=True)
        start = time.perf_counter()
        if not build_clap2diffusion(target, seed, stage):
            return None
        stamp.write_text(fingerprint)
        log.info("built %s in %.1fs", target.name, time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------------------------
# entry points


def build_all(root: Path | str | None = None, *, force: bool = False, seed: int = 0) -> TestModels:
    """Build (or reuse) every test model under ``root`` (default ``.cache/test-models/<VERSION>``)."""
    root = Path(root) if root is not None else DEFAULT_CACHE
    with _build_lock(root):
        ckpt = _cached(root / SD15_CHECKPOINT, lambda p: build_sd15_checkpoint(p, seed), force)
        cnet = _cached(root / CONTROLNET, lambda p: build_controlnet(p, seed), force)
        lora = _cached(root / LORA, lambda p: build_lora(p, seed), force)
        clap = _cached(root / CLAP_FOLDER, lambda p: build_clap_folder(p, seed), force)
        sounds = {name: _cached(root / SOUNDS_DIR / name, lambda p: build_sound(p, seed), force)
                  for name in SOUND_SPECS}
        c2d = _cached_clap2diffusion(root / CLAP2DIFFUSION, seed, force)
        adapter = _cached_clap2diffusion(root / CLAP2DIFFUSION_ADAPTER, seed, force, stage=3)
    return TestModels(root=root, sd15_checkpoint=ckpt, controlnet=cnet, lora=lora,
                      clap_folder=clap, sounds=sounds, clap2diffusion=c2d, clap2diffusion_adapter=adapter)


@torch.inference_mode()
def verify_sd15(checkpoint: Path, lora: Path | None = None, steps: int = 4, size: int = 256) -> torch.Tensor:
    """Load with ComfyUI's own loader, check it is SD15, sample ``steps`` euler steps, decode.

    With ``lora``, also check that ComfyUI consumes every LoRA key. Returns the image [1,H,W,3].
    """
    import_comfy()
    import comfy.lora
    import comfy.sample
    import comfy.sd
    import comfy.utils

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
    model_type = type(model.model.model_config).__name__
    if model_type != "SD15":
        raise AssertionError(f"{checkpoint.name} detected as {model_type}, expected SD15")

    if lora is not None:
        lora_sd = comfy.utils.load_torch_file(str(lora), safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        with _captured_warnings() as warnings:  # ComfyUI only logs keys it cannot place
            patches = comfy.lora.load_lora(lora_sd, key_map)
        expected = len({k.split(".", 1)[0] for k in lora_sd})
        if len(patches) != expected or any("lora key not loaded" in w for w in warnings):
            raise AssertionError(f"LoRA: {len(patches)} of {expected} modules loaded; {warnings[:5]}")
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)

    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed=0)
    samples = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", encode("a beach, thunder"),
                                  encode(""), latent, seed=0, disable_pbar=True)
    image = vae.decode(samples)
    if image.shape != (1, size, size, 3) or not torch.isfinite(image).all() or image.std() < 1e-3:
        raise AssertionError(f"bad image: shape {tuple(image.shape)}, std {float(image.std()):.4f}")
    return image


@torch.inference_mode()
def verify_sdxl(checkpoint: Path, steps: int = 1, size: int = 64) -> tuple[str, torch.Tensor]:
    """Load with ComfyUI's own loader, check the model is SDXL-family with an SDXL CLIP (CLIP-L +
    CLIP-G: tokens ``[1, 77, 2048]``, pooled ``[1, 1280]``), sample and decode.

    Returns ComfyUI's model config class name (``Segmind_Vega``) and the image ``[1, H, W, 3]``.
    """
    import_comfy()
    import comfy.sample
    import comfy.sd
    import comfy.supported_models

    with _captured_warnings() as warnings:  # ComfyUI only logs weights it cannot place
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
    if any("missing" in w or "unexpected" in w for w in warnings):
        raise AssertionError(f"ComfyUI did not place every weight of {checkpoint.name}: {warnings[:3]}")
    model_config = model.model.model_config
    if not isinstance(model_config, comfy.supported_models.SDXL):
        raise AssertionError(f"{checkpoint.name} detected as {type(model_config).__name__}, expected SDXL-family")

    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    # CLIP-G's text projection (the pooled vector's last step) is one weight ComfyUI never reports
    # missing: it must be the file's OpenCLIP ``x @ W`` matrix, transposed into a Linear weight.
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        stored = f.get_tensor("conditioner.embedders.1.model.text_projection")
    if not torch.equal(clip.cond_stage_model.clip_g.transformer.text_projection.weight.to(stored.dtype), stored.t()):
        raise AssertionError("CLIP-G's text_projection did not load from the file")

    positive = encode("a beach, thunder")
    tokens, pooled = positive[0][0], positive[0][1]["pooled_output"]
    if tokens.shape != (1, 77, 2048) or pooled.shape != (1, 1280):
        raise AssertionError(f"SDXL CLIP gave {tuple(tokens.shape)} and pooled {tuple(pooled.shape)}")
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed=0)
    samples = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, encode(""), latent,
                                  seed=0, disable_pbar=True)
    image = vae.decode(samples)
    if image.shape != (1, size, size, 3) or not torch.isfinite(image).all() or image.std() < 1e-3:
        raise AssertionError(f"bad image: shape {tuple(image.shape)}, std {float(image.std()):.4f}")
    return type(model_config).__name__, image


def verify_controlnet(path: Path) -> None:
    """ComfyUI's ControlNet loader recognises the file and finds every weight it expects."""
    import_comfy()
    import comfy.controlnet

    control = comfy.controlnet.load_controlnet(str(path))
    if type(control).__name__ != "ControlNet":
        raise AssertionError(f"{path.name} loaded as {type(control).__name__}, expected ControlNet")


@torch.inference_mode()
def verify_clap(folder: Path) -> torch.Tensor:
    """Load the CLAP folder offline with transformers and embed the thunder sound and a text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, ClapModel, ClapProcessor

    processor = ClapProcessor.from_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder))
    model = ClapModel.from_pretrained(str(folder)).eval()
    audio, _ = synth_sound("thunder.wav")
    inputs = processor(audio=[audio[:, 0]], sampling_rate=48_000, return_tensors="pt")
    text = processor.tokenizer(["thunder over the sea"], return_tensors="pt", padding=True)
    with torch.no_grad():
        audio_out = model.get_audio_features(**inputs)
        text_out = model.get_text_features(**text)
    # transformers 4.x returns tensors, 5.x output objects.
    audio_emb = audio_out if isinstance(audio_out, torch.Tensor) else audio_out.pooler_output
    text_emb = text_out if isinstance(text_out, torch.Tensor) else text_out.pooler_output
    if audio_emb.shape != (1, 512) or text_emb.shape != (1, 512):
        raise AssertionError(f"CLAP embeddings {tuple(audio_emb.shape)}, {tuple(text_emb.shape)}")
    return audio_emb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_CACHE, help="cache folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--verify", action="store_true",
                        help="load with ComfyUI / transformers and sample (slower)")
    parser.add_argument("--sdxl", action="store_true",
                        help="also build the SDXL-family checkpoint (Segmind Vega, 3.1 GB; about a minute)")
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    parser.add_argument("--print", dest="fields", nargs="+", metavar="FIELD",
                        help="print only these paths, one a line (e.g. sd15_checkpoint clap_folder sdxl_checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.fields else logging.INFO, format="%(message)s")

    start = time.perf_counter()
    models = build_all(args.root, force=args.force)
    log.info("test models ready in %.1fs under %s", time.perf_counter() - start, models.root)
    # The SDXL checkpoint only when asked for (3.1 GB): --print sdxl_checkpoint, or --sdxl.
    sdxl = (sdxl_checkpoint(args.root, force=args.force)
            if args.sdxl or "sdxl_checkpoint" in (args.fields or ()) else None)
    if args.verify:
        start = time.perf_counter()
        verify_sd15(models.sd15_checkpoint, lora=models.lora)
        verify_controlnet(models.controlnet)
        verify_clap(models.clap_folder)
        if sdxl is not None:
            verify_sdxl(sdxl)
        log.info("verified in %.1fs", time.perf_counter() - start)
    if args.fields:
        print("\n".join(str(sdxl if name == "sdxl_checkpoint" else getattr(models, name)) for name in args.fields))
    elif args.json:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else {n: str(p) for n, p in v.items()}
                              if isinstance(v, dict) else v)
                          for k, v in {**models.__dict__, **({"sdxl_checkpoint": sdxl} if sdxl else {})}.items()},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
