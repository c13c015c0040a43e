"""Write example_workflows/*.json (as the ComfyUI frontend saves them) from compact descriptions.

    python tools/make_workflows.py                 # starts a temporary ComfyUI for /object_info
    python tools/make_workflows.py --url http://127.0.0.1:8188
    python tools/make_workflows.py --check         # exit 1 if a committed file is out of date

Each workflow below is a few lines of Python: nodes with positions, widget values by name and
links by output name. The node's sockets, widget order and defaults come from the server's
/object_info, laid out the way frontend 1.32 serialises a graph (socket inputs, then widget
inputs; ``widgets_values`` in widget order with the seed's "control after generate" value and the
upload/player widgets' values). tests/test_browser_workflows.py loads every file in the real
frontend and checks it serialises back to the same nodes, links and widget values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the `tools` package importable
    sys.path.append(str(REPO_ROOT))
from clap2diffusion_core.training.textfit import TextFitConfig  # noqa: E402 (the node's defaults)
from tools.run_workflow import has_control_widget  # noqa: E402 (the frontend's rule, in one place)

OUT_DIR = REPO_ROOT / "example_workflows"

FRONTEND_VERSION = "1.32.9"
CORE = {"cnr_id": "comfy-core", "ver": "0.3.75"}
PACK = {"cnr_id": "comfyui-clap2diffusion", "ver": "0.1.0"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}

# The files users put in their models folders (names the workflows ask for).
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
            "v1-5-pruned-emaonly-fp16.safetensors?download=true")
CLAP = "clap-htsat-unfused"
CLAP_URL = "https://huggingface.co/laion/clap-htsat-unfused"
STAGE1 = "audio_projector_stage1.safetensors"
STAGE3 = "audio_projector_stage3_finetuned.safetensors"
# The frontend downloads only .safetensors model links: the fp16 safetensors copy of ControlNet 1.1.
CONTROLNET = "control_v11p_sd15_scribble_fp16.safetensors"
CONTROLNET_URL = ("https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                  "control_v11p_sd15_scribble_fp16.safetensors")
LORA = "your_sd15_lora.safetensors"

# Frontend colours for the prompt nodes (as core templates use them).
GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}
GROUP_COLORS = {"model": "#3f789e", "audio": "#8A8", "sample": "#b58b2a", "control": "#a1309b"}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos


# --------------------------------------------------------------------------------------------
# the builder


def _spec(spec: list[Any]) -> tuple[str, dict[str, Any]]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", {**options, "options": kind}
    return str(kind), options


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    info: Mapping[str, Any] | None  # object_info entry; None for Notes
    title: str | None = None
    widgets: dict[str, Any] = field(default_factory=dict)
    links_in: dict[str, int] = field(default_factory=dict)  # input name -> link id
    links_out: dict[int, list[int]] = field(default_factory=dict)  # output slot -> link ids
    extra: dict[str, Any] = field(default_factory=dict)  # color, bgcolor
    properties: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, output: int | str) -> tuple[Node, int]:
        """``node["MODEL"]`` or ``node[0]``: an output to link from."""
        if isinstance(output, str):
            names = list(self.info["output_name"])
            if output not in names:
                raise KeyError(f"{self.type} has no output {output!r} (has {names})")
            output = names.index(output)
        return self, output

    @property
    def out(self) -> tuple[Node, int]:
        return self, 0


class Workflow:
    """A graph in the frontend's workflow format (version 0.4)."""

    def __init__(self, name: str, object_info: Mapping[str, Any]):
        self.name = name
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.links: list[list[Any]] = []
        self.groups: list[dict[str, Any]] = []

    # -- nodes and links

    def node(self, type: str, pos: tuple[float, float], size: tuple[float, float], *, title: str | None = None,
             colors: Mapping[str, str] | None = None, models: list[dict[str, str]] | None = None,
             **values: Any) -> Node:
        """Add a node. ``values``: widget values by name, or ``(node, slot)`` to link an input."""
        if type not in self.object_info:
            raise KeyError(f"node type {type!r} is not on this server")
        info = self.object_info[type]
        node = Node(len(self.nodes) + 1, type, pos, size, info, title, extra=dict(colors or {}))
        self.nodes.append(node)
        widget_names = {name for name, _ in self.widget_specs(info)}
        socket_names = {name for name, _, _ in self.socket_specs(info)}
        for name, value in values.items():
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Node):
                if name not in widget_names | socket_names:
                    raise KeyError(f"{type} has no input {name!r}")
                self.connect(value, node, name)
            elif name in widget_names:
                node.widgets[name] = value
            else:
                raise KeyError(f"{type} has no widget {name!r} (widgets: {sorted(widget_names)})")
        node.properties = {"Node name for S&R": type, **(PACK if type.startswith("C2D_") else CORE)}
        if models:
            node.properties["models"] = models
        return node

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float], title: str) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", pos, size, None, title,
                    widgets={"text": text}, extra=dict(NOTE_COLOR))
        self.nodes.append(node)
        return node

    def connect(self, source: tuple[Node, int], target: Node, input_name: str) -> None:
        origin, slot = source
        out_type = origin.info["output"][slot]
        in_type = self.input_type(target.info, input_name)
        if out_type != in_type and "*" not in (out_type, in_type):
            raise TypeError(f"{origin.type}[{slot}] is {out_type}, {target.type}.{input_name} wants {in_type}")
        link_id = len(self.links) + 1
        self.links.append([link_id, origin.id, slot, target.id, self.input_slot(target, input_name), out_type])
        target.links_in[input_name] = link_id
        origin.links_out.setdefault(slot, []).append(link_id)

    def group(self, title: str, nodes: list[Node], color: str, pad: float = 20.0) -> None:
        """A group around ``nodes`` (their title bars included)."""
        left = min(n.pos[0] for n in nodes) - pad
        top = min(n.pos[1] for n in nodes) - TITLE_HEIGHT - pad - 36  # room for the group's title
        right = max(n.pos[0] + n.size[0] for n in nodes) + pad
        bottom = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title,
                            "bounding": [left, top, right - left, bottom - top],
                            "color": color, "font_size": 24, "flags": {}})

    # -- object_info helpers

    @staticmethod
    def _ordered(info: Mapping[str, Any]) -> list[tuple[str, str, list[Any]]]:
        """(section, name, spec) in the order the server declares the inputs."""
        inputs, order = info.get("input", {}), info.get("input_order", {})
        return [(section, name, inputs[section][name])
                for section in ("required", "optional")
                for name in order.get(section, list(inputs.get(section, {})))]

    @classmethod
    def widget_specs(cls, info: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
        return [(name, spec) for _, name, spec in cls._ordered(info)
                if _spec(spec)[0] in WIDGET_TYPES and not _spec(spec)[1].get("forceInput")]

    @classmethod
    def socket_specs(cls, info: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
        """(name, type, optional) of the link-only inputs."""
        return [(name, _spec(spec)[0], section == "optional") for section, name, spec in cls._ordered(info)
                if not (_spec(spec)[0] in WIDGET_TYPES and not _spec(spec)[1].get("forceInput"))]

    def input_slot(self, node: Node, name: str) -> int:
        """The input's index in the frontend's ``inputs`` list (links name it by index)."""
        names = [n for n, _, _ in self.socket_specs(node.info)] + [n for n, _ in self.widget_specs(node.info)]
        return names.index(name)

    @classmethod
    def input_type(cls, info: Mapping[str, Any], name: str) -> str:
        for _, input_name, spec in cls._ordered(info):
            if input_name == name:
                return _spec(spec)[0]
        raise KeyError(name)

    def frontend_inputs(self, node: Node) -> list[dict[str, Any]]:
        """The node's ``inputs`` as frontend 1.32 saves them: sockets, then every widget (each
        widget has a socket too), then the widgets the frontend adds for upload combos."""
        info = node.info
        entries: list[dict[str, Any]] = []
        for name, kind, optional in self.socket_specs(info):
            entries.append({"localized_name": name, "name": name, **({"shape": 7} if optional else {}),
                            "type": kind, "link": node.links_in.get(name)})
        optional_widgets = {name for name, _ in self._optional(info)}
        for name, spec in self.widget_specs(info):
            entries.append({"localized_name": name, "name": name,
                            **({"shape": 7} if name in optional_widgets else {}),
                            "type": _spec(spec)[0], "widget": {"name": name}, "link": node.links_in.get(name)})
        for name, kind, label, _ in self._frontend_widgets(info):
            entries.append({"localized_name": label, "name": name, "type": kind, "widget": {"name": name},
                            "link": None})
        return entries

    def _optional(self, info: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
        return [(name, spec) for section, name, spec in self._ordered(info) if section == "optional"]

    @classmethod
    def _frontend_widgets(cls, info: Mapping[str, Any]) -> list[tuple[str, str, str, Any]]:
        """(name, type, label, saved value) of the widgets the frontend adds after the node's own:
        the audio player (ours: web/clap2diffusion.js) and the upload buttons."""
        extra: list[tuple[str, str, str, Any]] = []
        for _, spec in cls.widget_specs(info):
            options = _spec(spec)[1]
            if options.get("audio_upload"):
                # As a loaded graph saves them again (a fresh node says "choose file to upload", "").
                extra += [("audioUI", "AUDIO_UI", "audioUI", None), ("upload", "AUDIOUPLOAD", "upload", None)]
            elif options.get("image_upload"):
                extra += [("upload", "IMAGEUPLOAD", "upload", "image")]
        return extra

    def widgets_values(self, node: Node) -> list[Any]:
        if node.info is None:  # a Note
            return [node.widgets["text"]]
        values: list[Any] = []
        for name, spec in self.widget_specs(node.info):
            kind, options = _spec(spec)
            # The frontend's own fallbacks where the server gives no default.
            fallback = {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(kind)
            value = node.widgets.get(name, options.get("default", fallback))
            if value is None and kind == "COMBO":
                value = (options.get("options") or [None])[0]
            if kind == "COMBO" and options.get("options") and not self._file_combo(node.type, name) \
                    and value not in options["options"]:
                raise ValueError(f"{node.type}.{name}={value!r} is not one of {options['options']}")
            values.append(value)
            if has_control_widget(name, kind, options):
                values.append(node.widgets.get(f"{name}:control", "fixed"))
        values += [value for _, _, _, value in self._frontend_widgets(node.info)]
        return values

    @staticmethod
    def _file_combo(node_type: str, name: str) -> bool:
        """Combos that list files (their options depend on the machine, so any name is fine)."""
        return name.endswith(("_name", "audio", "image")) or node_type in ("C2D_LoadAudio", "LoadImage")

    # -- output

    def execution_order(self) -> dict[int, int]:
        """LiteGraph's ``order``: a topological order, nodes without inputs first."""
        deps = {n.id: {self.links[lid - 1][1] for lid in n.links_in.values()} for n in self.nodes}
        order: dict[int, int] = {}
        remaining = [n.id for n in self.nodes]
        while remaining:
            ready = [nid for nid in remaining if deps[nid] <= set(order)]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            # Sources first in id order, as the frontend numbers them.
            for nid in sorted(ready, key=lambda i: (bool(deps[i]), i)):
                order[nid] = len(order)
                remaining.remove(nid)
        return order

    def to_json(self) -> dict[str, Any]:
        order = self.execution_order()
        nodes = []
        for node in self.nodes:
            entry: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(node.pos),
                                     "size": list(node.size), "flags": {}, "order": order[node.id], "mode": 0}
            if node.info is None:
                entry.update(inputs=[], outputs=[])
            else:
                entry["inputs"] = self.frontend_inputs(node)
                entry["outputs"] = []
                for slot, (kind, name) in enumerate(zip(node.info["output"], node.info["output_name"])):
                    output: dict[str, Any] = {"localized_name": name, "name": name}
                    if (node.info.get("output_is_list") or [False] * (slot + 1))[slot]:
                        output["shape"] = 6  # LiteGraph's grid: "a list, downstream runs once per item"
                    output["type"] = kind
                    if slot in node.links_out:
                        output["slot_index"] = slot
                    output["links"] = node.links_out.get(slot, [])
                    entry["outputs"].append(output)
            if node.title:
                entry["title"] = node.title
            entry["properties"] = node.properties
            entry["widgets_values"] = self.widgets_values(node)
            entry.update(node.extra)
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"clap2diffusion/example_workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            # No saved view ("ds"): the frontend fits the whole graph into the window on load.
            "extra": {"frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


# --------------------------------------------------------------------------------------------
# shared pieces

def note_text(title: str, what: str, files: list[str], tips: list[str]) -> str:
    """The MarkdownNote every workflow carries: what it does, which files go where, the knobs."""
    lines = [f"## {title}", "", what, "", "### Model files", ""]
    lines += [f"- {line}" for line in files]
    lines += ["", "A sound (wav, flac, mp3, ogg, or a video's audio) goes in `ComfyUI/input/`, or use the "
              "**choose file to upload** button on Load Audio.", "", "### Tips", ""]
    lines += [f"- {tip}" for tip in tips]
    return "\n".join(lines) + "\n"


def files_block(clap2diffusion: str | None, *extra: str) -> list[str]:
    """Which file goes in which ComfyUI/models folder."""
    files = [
        f"`models/checkpoints/{SD15}`: any SD1.5 checkpoint ([download]({SD15_URL}))",
        f"`models/clap/{CLAP}/`: the whole [laion/clap-htsat-unfused]({CLAP_URL}) folder (config.json, "
        "model.safetensors, tokenizer and preprocessor files), or a laion-clap checkpoint such as "
        "`630k-audioset-best.pt`",
    ]
    if clap2diffusion:
        files.append(f"`models/clap2diffusion/{clap2diffusion}`: a trained CLAP2Diffusion file (from the "
                     "pack's training, `python -m clap2diffusion_core.training`; the pack's `checkpoints/` "
                     "folder is searched too)")
    return files + list(extra)


def checkpoint(wf: Workflow, pos: tuple[float, float]) -> Node:
    return wf.node("CheckpointLoaderSimple", pos, (315, 98), ckpt_name=SD15,
                   models=[{"name": SD15, "url": SD15_URL, "directory": "checkpoints"}])


def prompts(wf: Workflow, clip: tuple[Node, int], pos: tuple[float, float],
            text: str = "a beach", negative: str = "blurry, low quality, watermark") -> tuple[Node, Node]:
    x, y = pos
    positive = wf.node("CLIPTextEncode", (x, y), (380, 120), title="Positive prompt", colors=GREEN,
                       clip=clip, text=text)
    negative_node = wf.node("CLIPTextEncode", (x, y + 170), (380, 100), title="Negative prompt", colors=RED,
                            clip=clip, text=negative)
    return positive, negative_node


@dataclass
class SoundChain:
    load: Node
    encode: Node
    decompose: Node
    project: Node

    def nodes(self) -> list[Node]:
        return [self.load, self.encode, self.decompose, self.project]


AUDIO_ROW = 680  # the sound group's top row, below the sampling group


def loaders(wf: Workflow, pos: tuple[float, float], clap2diffusion: str) -> tuple[Node, Node]:
    x, y = pos
    clap = wf.node("C2D_ClapLoader", (x, y), (315, 58), clap_name=CLAP)
    c2d = wf.node("C2D_Clap2DiffusionLoader", (x, y + 100), (315, 58), clap2diffusion_name=clap2diffusion)
    return clap, c2d


def sound_chain(wf: Workflow, pos: tuple[float, float], sound: str, clap: Node, clap2diffusion: Node,
                levels: tuple[float, float, float] = (1.0, 1.0, 1.0), label: str = "") -> SoundChain:
    """Load Audio -> CLAP Encode -> Hierarchical Decompose -> Audio Project, left to right from
    ``pos`` (Load Audio sits 200 px lower, under the loaders when they are at ``pos``)."""
    x, y = pos
    suffix = f" ({label})" if label else ""
    load = wf.node("C2D_LoadAudio", (x, y + 200), (315, 170), title=f"Load Audio{suffix}" if label else None,
                   audio=sound, max_seconds=0.0)
    encode = wf.node("C2D_ClapEncode", (x + 350, y + 200), (290, 82), clap_model=clap.out, audio=load.out,
                     window_mode="first")
    fg, bg, amb = levels
    decompose = wf.node("C2D_HierarchicalDecompose", (x + 680, y), (320, 430),
                        title=f"Hierarchical Decompose{suffix}" if label else None,
                        clap2diffusion=clap2diffusion.out, clap_embeds=encode.out,
                        foreground=fg, background=bg, ambience=amb, temperature=0.0)
    project = wf.node("C2D_AudioProject", (x + 1040, y), (230, 66), audio_levels=decompose.out,
                      clap2diffusion=clap2diffusion.out)
    return SoundChain(load, encode, decompose, project)


def apply_to_model(wf: Workflow, model, chain: SoundChain, clap2diffusion: Node) -> Node:
    """Apply Audio to Model at full strength over all steps, beside the prompts (the adapter examples)."""
    return wf.node("C2D_ApplyAudioToModel", (800, 0), (300, 170), model=model, audio_tokens=chain.project.out,
                   clap2diffusion=clap2diffusion.out, strength=1.0, start_percent=0.0, end_percent=1.0)


def sample(wf: Workflow, pos: tuple[float, float], model, positive, negative, vae, prefix: str,
           size: int = 512, steps: int = 20) -> list[Node]:
    """EmptyLatentImage + KSampler -> VAEDecode -> SaveImage."""
    x, y = pos
    latent = wf.node("EmptyLatentImage", (x, y + 330), (300, 106), width=size, height=size, batch_size=1)
    sampler = wf.node("KSampler", (x, y), (300, 262), model=model, positive=positive, negative=negative,
                      latent_image=latent.out, seed=42, steps=steps, cfg=7.0, sampler_name="euler",
                      scheduler="normal", denoise=1.0)
    decode = wf.node("VAEDecode", (x + 340, y), (210, 46), samples=sampler.out, vae=vae)
    save = wf.node("SaveImage", (x + 340, y + 90), (400, 450), images=decode.out, filename_prefix=prefix)
    return [sampler, latent, decode, save]


# --------------------------------------------------------------------------------------------
# the workflows


def audio_text_to_image(wf: Workflow) -> None:
    """Conditioning injection: the audio tokens join the positive prompt's tokens (any stage file)."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0))
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE1)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d)
    apply = wf.node("C2D_ApplyAudioToConditioning", (800, 0), (290, 82), conditioning=positive.out,
                    audio_tokens=chain.project.out, strength=1.0)
    tail = sample(wf, (1130, 0), ckpt["MODEL"], apply.out, negative.out, ckpt["VAE"], "clap2diffusion")
    wf.note(note_text(
        "Sound + text -> image (CLAP2Diffusion)",
        "The sound is split into foreground / background / ambience tokens, projected to 77 audio "
        "tokens and appended to the positive prompt's tokens: the prompt and the sound share the "
        "cross-attention. A stage 1 CLAP2Diffusion file is enough (stage 2/3 files work too).",
        files_block(STAGE1),
        ["**Apply Audio to Conditioning -> strength**: 0 gives exactly the text-only image; 1-1.5 lets "
         "the sound shape the scene.",
         "**Hierarchical Decompose**: scale the foreground (events: thunder), background (scenes: rain) "
         "and ambience (mood) levels; after a run its preview shows which audio token went to which level.",
         "**CLAP Encode -> window_mode**: sounds longer than 10 s use the first 10 s, the mean of all "
         "windows, or one image per window (per_window).",
         "The negative prompt stays audio-free."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> audio tokens", [clap, c2d, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Add the sound to the prompt, sample", [apply, *tail], GROUP_COLORS["sample"])


def audio_adapter(wf: Workflow) -> None:
    """Model injection: gated audio cross-attention in every UNet cross-attention layer."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0), text="a beach at dusk")
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE3)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d, levels=(1.5, 1.0, 0.5))
    apply = apply_to_model(wf, ckpt["MODEL"], chain, c2d)
    tail = sample(wf, (1140, 0), apply.out, positive.out, negative.out, ckpt["VAE"], "clap2diffusion_adapter")
    wf.note(note_text(
        "Sound -> image through audio cross-attention (CLAP2Diffusion adapter)",
        "Apply Audio to Model adds a gated audio cross-attention beside the text one in every "
        "cross-attention layer of the UNet; foreground tokens act mostly on the late blocks, "
        "background on the middle, ambience on the early ones. It returns a patched copy of the "
        "MODEL, so LoRA and ControlNet still stack. **Needs a stage 2 or 3 file** (one with adapter "
        "layers), wired from its loader both to Audio Project and to Apply Audio to Model: the adapter "
        "only accepts tokens made by its own file.",
        files_block(STAGE3),
        ["**foreground / background / ambience** on Hierarchical Decompose weight each level "
         "(here: more events, less mood); the tokens carry them to Apply Audio to Model, which applies "
         "them once, in the audio attention.",
         "**strength** 0 gives exactly the image without the sound; **start/end_percent** limit the "
         "sound to part of the sampling.",
         "The unconditional (negative) rows hear silence, so CFG pushes toward the sound."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> audio tokens", [clap, c2d, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Audio attention in the UNet, sample", [apply, *tail], GROUP_COLORS["sample"])


def audio_controlnet(wf: Workflow) -> None:
    """Audio conditioning into ControlNet Apply: the hint fixes the layout, the sound the scene."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0))
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE1)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d)
    apply = wf.node("C2D_ApplyAudioToConditioning", (800, 0), (290, 82), conditioning=positive.out,
                    audio_tokens=chain.project.out, strength=1.0)
    # The hint: a white horizon line on black (a scribble), made by core nodes so no file is needed.
    canvas = wf.node("EmptyImage", (800, -420), (270, 130), title="Hint: black canvas",
                     width=512, height=512, batch_size=1, color=0)
    line = wf.node("EmptyImage", (800, -250), (270, 130), title="Hint: white line",
                   width=512, height=8, batch_size=1, color=16777215)
    hint = wf.node("ImageCompositeMasked", (1110, -420), (270, 146), title="Hint: horizon at mid height",
                   destination=canvas.out, source=line.out, x=0, y=252, resize_source=False)
    preview = wf.node("PreviewImage", (1420, -420), (250, 270), title="Hint", images=hint.out)
    controlnet = wf.node("ControlNetLoader", (1110, -230), (300, 58), control_net_name=CONTROLNET,
                         models=[{"name": CONTROLNET, "url": CONTROLNET_URL, "directory": "controlnet"}])
    control = wf.node("ControlNetApplyAdvanced", (1130, 0), (300, 186), positive=apply.out,
                      negative=negative.out, control_net=controlnet.out, image=hint.out, vae=ckpt["VAE"],
                      strength=0.8, start_percent=0.0, end_percent=1.0)
    tail = sample(wf, (1470, 0), ckpt["MODEL"], control["positive"], control["negative"], ckpt["VAE"],
                  "clap2diffusion_controlnet")
    wf.note(note_text(
        "Sound + text + ControlNet -> image",
        "The sound joins the positive prompt (Apply Audio to Conditioning) and the result goes "
        "through core **Apply ControlNet** like any prompt: the hint fixes the layout (here a "
        "horizon line, drawn with core image nodes), the sound and the text the scene. Replace the "
        "hint nodes with **Load Image** (and a preprocessor such as Canny) for your own control image.",
        files_block(STAGE1, f"`models/controlnet/{CONTROLNET}`: an SD1.5 ControlNet, scribble here "
                    f"([download]({CONTROLNET_URL}))"),
        ["ControlNet never sees the audio tokens: it only adds its residuals, so both stack.",
         "Lower the ControlNet **strength** if the hint dominates."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> audio tokens", [clap, c2d, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Control hint", [canvas, line, hint, preview, controlnet], GROUP_COLORS["control"])
    wf.group("4 · Prompt + sound + ControlNet, sample", [apply, control, *tail], GROUP_COLORS["sample"])


def audio_lora(wf: Workflow) -> None:
    """LoRA, then the audio adapter on the LoRA'd model: the patches stack."""
    ckpt = checkpoint(wf, (0, 0))
    lora = wf.node("LoraLoader", (0, 150), (315, 130), model=ckpt["MODEL"], clip=ckpt["CLIP"], lora_name=LORA,
                   strength_model=0.8, strength_clip=0.8)
    positive, negative = prompts(wf, lora["CLIP"], (360, 0))
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE3)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d)
    apply = apply_to_model(wf, lora["MODEL"], chain, c2d)
    tail = sample(wf, (1140, 0), apply.out, positive.out, negative.out, ckpt["VAE"], "clap2diffusion_lora")
    wf.note(note_text(
        "Sound + text + LoRA -> image",
        "Load LoRA patches the UNet and CLIP weights; Apply Audio to Model then adds the audio "
        "cross-attention on top. The LoRA also reaches the attention projections the audio "
        "attention shares, and the MODEL before the audio node stays unchanged. **Needs a stage 2 "
        "or 3 file.** (With a stage 1 file, use Apply Audio to Conditioning on the positive prompt "
        "instead.)",
        files_block(STAGE3, f"`models/loras/{LORA}`: any SD1.5 LoRA"),
        ["Put Apply Audio to Model after the LoRA loader (the order of model patches is free, but "
         "this keeps the graph readable).",
         "Both prompts take the LoRA's CLIP."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model, LoRA and prompt", [ckpt, lora, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> audio tokens", [clap, c2d, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Audio attention on the LoRA model, sample", [apply, *tail], GROUP_COLORS["sample"])


def two_sounds(wf: Workflow) -> None:
    """Two sounds with separate strengths: two Apply Audio to Model, chained."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0), text="a beach")
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE3)
    first = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d, label="sound 1")
    second = sound_chain(wf, (0, AUDIO_ROW + 500), "seagulls.wav", clap, c2d, label="sound 2")
    apply_first = wf.node("C2D_ApplyAudioToModel", (800, 0), (300, 170), title="Apply Audio to Model (sound 1)",
                          model=ckpt["MODEL"], audio_tokens=first.project.out, clap2diffusion=c2d.out,
                          strength=1.0, start_percent=0.0, end_percent=1.0)
    apply_second = wf.node("C2D_ApplyAudioToModel", (1140, 0), (300, 170), title="Apply Audio to Model (sound 2)",
                           model=apply_first.out, audio_tokens=second.project.out, clap2diffusion=c2d.out,
                           strength=0.5, start_percent=0.0, end_percent=1.0)
    tail = sample(wf, (1480, 0), apply_second.out, positive.out, negative.out, ckpt["VAE"],
                  "clap2diffusion_two_sounds")
    wf.note(note_text(
        "Two sounds, separate strengths",
        "Each sound gets its own Load Audio -> CLAP Encode -> Hierarchical Decompose -> Audio Project "
        "chain (the CLAP and CLAP2Diffusion loaders are shared), and its own **Apply Audio to Model**: "
        "the second patches the model the first returns, so both audio attentions act, each with "
        "its own strength (and the level weights of its own Hierarchical Decompose). The one "
        "CLAP2Diffusion loader feeds both Audio Projects and both Apply Audio to Model nodes. "
        "**Needs a stage 2 or 3 file.**",
        files_block(STAGE3),
        ["Here sound 1 (thunder) at strength 1.0, sound 2 (seagulls) at 0.5.",
         "Give each sound its own **start/end_percent** to let one shape the layout (early steps) "
         "and the other the details (late steps).",
         "Chain a third the same way."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Two sounds -> audio tokens", [clap, c2d, *first.nodes(), *second.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · One audio attention per sound, sample", [apply_first, apply_second, *tail],
             GROUP_COLORS["sample"])


def audio_to_prompt(wf: Workflow) -> None:
    """The training-free path: CLAP names what it hears; the words join the prompt."""
    ckpt = checkpoint(wf, (0, 0))
    clap = wf.node("C2D_ClapLoader", (0, AUDIO_ROW), (315, 58), clap_name=CLAP)
    load = wf.node("C2D_LoadAudio", (0, AUDIO_ROW + 100), (315, 170), audio="thunder.wav", max_seconds=0.0)
    describe = wf.node("C2D_AudioToPrompt", (360, AUDIO_ROW), (420, 560), clap_model=clap.out, audio=load.out,
                       window_mode="mean", foreground_count=3, background_count=2, ambience_count=1,
                       threshold=0.15, template="a beach, {audio}, photograph")
    positive = wf.node("CLIPTextEncode", (380, 0), (380, 120), title="Positive prompt (words from the sound)",
                       colors=GREEN, clip=ckpt["CLIP"], text=describe["prompt"])
    negative = wf.node("CLIPTextEncode", (380, 170), (380, 100), title="Negative prompt", colors=RED,
                       clip=ckpt["CLIP"], text="blurry, low quality, watermark")
    tail = sample(wf, (820, 0), ckpt["MODEL"], positive.out, negative.out, ckpt["VAE"],
                  "clap2diffusion_audio_to_prompt")
    wf.note(note_text(
        "Sound -> prompt words -> image (no CLAP2Diffusion file)",
        "Audio to Prompt compares the sound with a vocabulary of sound labels in CLAP's shared "
        "audio-text space and writes the best matches per level (foreground events, background "
        "scenes, ambience) into the template at `{audio}`. The prompt goes to CLIP Text Encode: "
        "no trained CLAP2Diffusion file is needed.",
        files_block(None),
        ["The preview on Audio to Prompt charts each label's score against the **threshold**.",
         "Its other outputs carry each level's words alone, to place them yourself.",
         "**per_window** gives one prompt (and one image) per 10 s window of a long sound."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt (the words come from the sound)", [ckpt, positive, negative],
             GROUP_COLORS["model"])
    wf.group("2 · Sound -> prompt words", [clap, load, describe], GROUP_COLORS["audio"])
    wf.group("3 · Sample", tail, GROUP_COLORS["sample"])


def sound_to_frames(wf: Workflow) -> None:
    """Meaning over time: one CLAP embedding per frame -> one token row per latent -> an animation."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0), text="a city street at night, film still")
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE1)
    load = wf.node("C2D_LoadAudio", (0, AUDIO_ROW + 200), (315, 170), audio="thunder.wav", max_seconds=0.0)
    frames = wf.node("C2D_ClapEncodeFrames", (350, AUDIO_ROW), (300, 250), clap_model=clap.out, audio=load.out,
                     fps=8.0, frames=0, window_seconds=10.0, hop_seconds=0.5, smoothing_seconds=0.5,
                     change_threshold=0.05)
    decompose = wf.node("C2D_HierarchicalDecompose", (690, AUDIO_ROW), (320, 430), clap2diffusion=c2d.out,
                        clap_embeds=frames["clap_embeds"], foreground=1.0, background=1.0, ambience=1.0,
                        temperature=0.0)
    project = wf.node("C2D_AudioProject", (1050, AUDIO_ROW), (230, 66), audio_levels=decompose.out,
                      clap2diffusion=c2d.out)
    energy = wf.node("C2D_AudioEnergyCurves", (350, AUDIO_ROW + 300), (300, 130), audio=load.out, fps=8.0,
                     frames=0, range_db=60.0)
    scale = wf.node("C2D_ScaleAudioTokensPerFrame", (1050, AUDIO_ROW + 110), (300, 130),
                    audio_tokens=project.out, weights=energy["loudness"], multiply=0.5, add=0.75)
    apply = wf.node("C2D_ApplyAudioToConditioning", (800, 0), (290, 82), conditioning=positive.out,
                    audio_tokens=scale.out, strength=1.0)
    latent = wf.node("EmptyLatentImage", (1130, 330), (300, 106), width=512, height=512,
                     batch_size=frames["frames"])
    sampler = wf.node("KSampler", (1130, 0), (300, 262), model=ckpt["MODEL"], positive=apply.out,
                      negative=negative.out, latent_image=latent.out, seed=42, steps=20, cfg=7.0,
                      sampler_name="euler", scheduler="normal", denoise=1.0)
    decode = wf.node("VAEDecode", (1470, 0), (210, 46), samples=sampler.out, vae=ckpt["VAE"])
    save = wf.node("SaveAnimatedWEBP", (1470, 90), (400, 450), images=decode.out,
                   filename_prefix="clap2diffusion_frames", fps=8.0, lossless=False, quality=85,
                   method="default")
    wf.note(note_text(
        "Sound -> frames (meaning over time)",
        "CLAP Encode Frames gives one embedding per frame (a window centred on each frame), so each "
        "latent of the batch hears its own moment of the sound: frame i gets the sound of frame i. "
        "The frames count sets the batch size; loudness scales each frame's audio tokens. The frames "
        "are saved as an animated WEBP at the same fps.",
        files_block(STAGE1),
        ["**fps** must match on CLAP Encode Frames, Audio Energy Curves and Save Animated WEBP.",
         "A 20 s sound at 8 fps is 160 frames: one latent each. Lower the fps or set **frames** to "
         "keep the batch within memory.",
         "**hop_seconds**: one CLAP pass every half second, frames between interpolated; 0 encodes "
         "every frame.",
         "Add **Audio to Prompt Schedule** on the embeddings for keyframe text (\"0\": \"...\", "
         "\"80\": \"...\") for prompt-schedule nodes, and a timeline picture."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> one token row per frame", [clap, c2d, load, frames, decompose, project, energy, scale],
             GROUP_COLORS["audio"])
    wf.group("3 · Add the sound to the prompt, sample the batch, save the animation",
             [apply, latent, sampler, decode, save], GROUP_COLORS["sample"])


def text_fit(wf: Workflow, ckpt: Node, clap: Node) -> Node:
    """Fit Audio Projector (from text) at the node's defaults: the closed-form fit, no gradient steps."""
    return wf.node("C2D_FitAudioProjectorFromText", (0, AUDIO_ROW + 420), (315, 230), clip=ckpt["CLIP"],
                   clap_model=clap.out, corpus_size=1024, steps=TextFitConfig().steps, seed=0, extra_captions="")


def audio_from_text_fit(wf: Workflow) -> None:
    """No CLAP2Diffusion file yet: fit one from text (the user's CLAP and checkpoint), then use it."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0))
    clap = wf.node("C2D_ClapLoader", (0, AUDIO_ROW), (315, 58), clap_name=CLAP)
    fit = text_fit(wf, ckpt, clap)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, fit)
    apply = wf.node("C2D_ApplyAudioToConditioning", (800, 0), (290, 82), conditioning=positive.out,
                    audio_tokens=chain.project.out, strength=1.0)
    tail = sample(wf, (1130, 0), ckpt["MODEL"], apply.out, negative.out, ckpt["VAE"], "clap2diffusion_textfit")
    wf.note(note_text(
        "Sound + text -> image, with no CLAP2Diffusion file (fit from text)",
        "Fit Audio Projector (from text) makes a stage-1 CLAP2Diffusion file from your CLAP and this "
        "checkpoint's text encoder, with no data set: it learns from sound captions (CLAP's text embedding "
        "of each caption -> the text encoder's conditioning of it) and then gets CLAP's audio embedding. "
        "The first run fits (minutes on a CPU, seconds on a GPU) and saves the file in "
        "`models/clap2diffusion/`; later runs with the same inputs load it in under a second.",
        files_block(None),
        ["**Fit -> corpus_size / steps / seed**: change any and a new file is fitted (named from the inputs).",
         "**Fit -> extra_captions**: your own sound captions, one per line, for sounds the vocabulary lacks.",
         "A text-fitted file knows what CLAP's text tower knows about a sound; it has no adapters, so it "
         "works with Apply Audio to Conditioning, not Apply Audio to Model.",
         "**Apply Audio to Conditioning -> strength**: 0 gives exactly the text-only image."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Fit from text, sound -> audio tokens", [clap, fit, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Add the sound to the prompt, sample", [apply, *tail], GROUP_COLORS["sample"])


def audio_guidance(wf: Workflow) -> None:
    """A guidance scale of its own for the sound, with core nodes only: DualCFGGuider's cond1 is the
    prompt with the sound, cond2 the prompt alone, so cfg_conds scales the sound's effect and
    cfg_cond2_negative the text's."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0))
    clap, c2d = loaders(wf, (0, AUDIO_ROW), STAGE1)
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, c2d)
    apply = wf.node("C2D_ApplyAudioToConditioning", (800, 0), (290, 82), conditioning=positive.out,
                    audio_tokens=chain.project.out, strength=1.0)
    guider = wf.node("DualCFGGuider", (1130, 0), (300, 190), title="DualCFGGuider (sound scale, text scale)",
                     model=ckpt["MODEL"], cond1=apply.out, cond2=positive.out, negative=negative.out,
                     cfg_conds=10.0, cfg_cond2_negative=7.0, style="regular")
    # Kept above the sound group (AUDIO_ROW), which sits below this column.
    noise = wf.node("RandomNoise", (1130, 230), (300, 82), noise_seed=42)
    sampler = wf.node("KSamplerSelect", (1130, 350), (300, 58), sampler_name="euler")
    sigmas = wf.node("BasicScheduler", (1130, 440), (300, 106), model=ckpt["MODEL"], scheduler="normal",
                     steps=20, denoise=1.0)
    latent = wf.node("EmptyLatentImage", (1470, 380), (270, 106), width=512, height=512, batch_size=1)
    run = wf.node("SamplerCustomAdvanced", (1470, 0), (270, 330), noise=noise.out, guider=guider.out,
                  sampler=sampler.out, sigmas=sigmas.out, latent_image=latent.out)
    decode = wf.node("VAEDecode", (1780, 0), (210, 46), samples=run["output"], vae=ckpt["VAE"])
    save = wf.node("SaveImage", (1780, 90), (400, 450), images=decode.out, filename_prefix="clap2diffusion_guidance")
    wf.note(note_text(
        "Sound + text -> image, with a guidance scale for the sound",
        "Core **DualCFGGuider** gets three prompts: **cond1** = the prompt with the sound (Apply Audio "
        "to Conditioning), **cond2** = the same prompt without it, and the negative. Each step it "
        "predicts all three and, in the `regular` style, takes negative + **cfg_cond2_negative** x "
        "(prompt - negative) + **cfg_conds** x (prompt with sound - prompt): the text and the sound "
        "each get their own scale. A stage 1 CLAP2Diffusion file is enough.",
        files_block(STAGE1),
        ["**cfg_conds**: how hard the sound pushes. Equal to cfg_cond2_negative, it is the guidance a "
         "KSampler at that cfg gives the prompt with the sound; lower: less sound; 0: the text-only "
         "image.",
         "**cfg_cond2_negative**: the text's CFG against the negative, as KSampler's cfg.",
         "**style nested**: the sound's scale multiplies the text's (cfg_conds 1 is KSampler's "
         "guidance, 2 twice the sound's push).",
         "With Apply Audio to Conditioning at strength 0, cond1 is cond2: cfg_conds changes nothing.",
         "Three model passes per step instead of KSampler's two."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Sound -> audio tokens", [clap, c2d, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Prompt with and without the sound, two guidance scales, sample",
             [apply, guider, noise, sampler, sigmas, latent, run, decode, save], GROUP_COLORS["sample"])


def audio_adapter_from_text(wf: Workflow) -> None:
    """No CLAP2Diffusion file at all: fit one from text, distil its adapter from the checkpoint,
    then the method's own injection (Apply Audio to Model)."""
    ckpt = checkpoint(wf, (0, 0))
    positive, negative = prompts(wf, ckpt["CLIP"], (360, 0), text="a beach at dusk")
    clap = wf.node("C2D_ClapLoader", (0, AUDIO_ROW), (315, 58), clap_name=CLAP)
    fit = text_fit(wf, ckpt, clap)
    distil = wf.node("C2D_DistilAudioAdapter", (0, AUDIO_ROW + 700), (340, 420), model=ckpt["MODEL"],
                     clip=ckpt["CLIP"], clap_model=clap.out, clap2diffusion=fit.out, vae=ckpt["VAE"], steps=4000,
                     batch_size=8, learning_rate=1e-4, resolution=512, seed=0, corpus_size=1024, preview_every=500,
                     extra_captions="")
    chain = sound_chain(wf, (0, AUDIO_ROW), "thunder.wav", clap, distil)
    apply = apply_to_model(wf, ckpt["MODEL"], chain, distil)
    tail = sample(wf, (1140, 0), apply.out, positive.out, negative.out, ckpt["VAE"], "clap2diffusion_distilled")
    wf.note(note_text(
        "Sound -> image through audio cross-attention, with no CLAP2Diffusion file (fit + distil)",
        "Fit Audio Projector (from text) makes a stage-1 file from your CLAP and this checkpoint's text "
        "encoder; Distil Audio Adapter then teaches the audio adapter from the checkpoint itself (teacher: "
        "the UNet on a sound caption's text; student: the UNet on an empty prompt plus the adapter fed that "
        "caption's CLAP embedding). No data set. Both files are saved in `models/clap2diffusion/` and reused "
        "by later runs with the same inputs. **The distillation is GPU work** (about 1-2 h for SD1.5 at the "
        "defaults, an estimate; see docs/DISTILLATION.md); Cancel keeps its progress and a new queue resumes.",
        files_block(None),
        ["**Distil -> preview_every**: a preview on the node shows teacher / student / empty prompt for "
         "three held-out captions; the middle column should drift from the right one towards the left one.",
         "**Distil -> steps / batch_size / learning_rate / resolution / seed**: change any and a new file is "
         "made (named from the inputs).",
         "**Apply Audio to Model -> strength**: 0 gives exactly the image without the sound.",
         "The distilled file also drives Apply Audio to Conditioning."]),
        (-480, -60), (440, 800), "Read me: model files")
    wf.group("1 · Model and prompt", [ckpt, positive, negative], GROUP_COLORS["model"])
    wf.group("2 · Fit, distil, sound -> audio tokens", [clap, fit, distil, *chain.nodes()], GROUP_COLORS["audio"])
    wf.group("3 · Audio attention in the UNet, sample", [apply, *tail], GROUP_COLORS["sample"])


WORKFLOWS: dict[str, Callable[[Workflow], None]] = {
    "audio_text_to_image": audio_text_to_image,
    "audio_adapter": audio_adapter,
    "audio_controlnet": audio_controlnet,
    "audio_lora": audio_lora,
    "two_sounds": two_sounds,
    "audio_to_prompt": audio_to_prompt,
    "sound_to_frames": sound_to_frames,
    "audio_from_text_fit": audio_from_text_fit,
    "audio_guidance": audio_guidance,
    "audio_adapter_from_text": audio_adapter_from_text,
}


def build(name: str, object_info: Mapping[str, Any]) -> dict[str, Any]:
    wf = Workflow(name, object_info)
    WORKFLOWS[name](wf)
    return wf.to_json()


def dumps(workflow: Mapping[str, Any]) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# main


def fetch_object_info(url: str | None) -> dict[str, Any]:
    from tools.comfy_server import ComfyClient, ComfyServer, make_base_dir

    if url:
        return ComfyClient(url).object_info()
    with tempfile.TemporaryDirectory(prefix="c2d-workflows-") as tmp:
        print("starting a temporary ComfyUI for /object_info ...", file=sys.stderr, flush=True)
        with ComfyServer(make_base_dir(Path(tmp))) as server:
            return server.client.object_info()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *WORKFLOWS], help="workflows to write (default: all)")
    parser.add_argument("--url", help="a running ComfyUI with this pack (default: start one)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare with the files; write nothing")
    args = parser.parse_args(argv)
    object_info = fetch_object_info(args.url)
    stale = []
    for name in args.names or list(WORKFLOWS):
        text = dumps(build(name, object_info))
        path = args.out / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print("out of date (run python tools/make_workflows.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
