"""Run a UI-format workflow (as the ComfyUI frontend saves it) headless, and save its image.

    python tools/run_workflow.py [WORKFLOW.json] [--sound my.wav] [--out out/]

What `make demo` runs. It finds the models in the ComfyUI models folders, and where a real one
is missing (SD1.5 checkpoint, CLAP, CLAP2Diffusion file) it builds the random-weight test
models instead and says so; starts ComfyUI headless with this pack; converts the workflow to an
API prompt using the server's /object_info; points model and sound widgets at files that exist
(with the random SD1.5 checkpoint, also 256 px and 4 steps at most: a CPU runs it in seconds); runs it, writes the image to out/, prints the time of each stage and node, and prints the
image's path as its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = REPO_ROOT / "example_workflows" / "audio_text_to_image.json"

# Widget types; any other input type is a socket (link only).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: never sent to the server.
NOTE_TYPES = {"Note", "MarkdownNote"}
VIRTUAL_TYPES = {"Reroute", "PrimitiveNode", *NOTE_TYPES}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, subgraph, broken link)."""


# --------------------------------------------------------------------------------------------
# UI format -> API format


@dataclass(frozen=True)
class _Link:
    origin: int
    slot: int
    type: str


def _links(workflow: Mapping[str, Any]) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # newer frontends may save links as objects
            links[link["id"]] = _Link(link["origin_id"], link["origin_slot"], str(link.get("type")))
        else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            links[link[0]] = _Link(link[1], link[2], str(link[5]))
    return links


def _spec_kind(spec: list[Any]) -> tuple[str, dict[str, Any]]:
    """("COMBO" | "INT" | ... | socket type, options) of one object_info input spec."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", {**options, "options": kind}
    return str(kind), options


def combo_options(spec: list[Any]) -> list[Any] | None:
    kind, options = _spec_kind(spec)
    return list(options.get("options", [])) if kind == "COMBO" else None


def widget_inputs(node_info: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """The node's widget inputs in the order the frontend lays them out (= widgets_values order)."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order", {})
    widgets = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {})
        for name in order.get(section, list(specs)):
            kind, options = _spec_kind(specs[name])
            if kind in WIDGET_TYPES and not options.get("forceInput", False):
                widgets.append((name, specs[name]))
    return widgets


def has_control_widget(name: str, kind: str, options: Mapping[str, Any]) -> bool:
    """Whether the frontend gives this input a "control after generate" widget (one more value in
    ``widgets_values``): an INT whose spec asks for one, or, where the spec does not say (no key or
    None, not False), an INT named seed / noise_seed. The frontend's own rule: ``flag ?? by name``."""
    flag = options.get("control_after_generate")
    return kind == "INT" and (bool(flag) if flag is not None else name in ("seed", "noise_seed"))


def _has_control_widget(name: str, spec: list[Any]) -> bool:
    return has_control_widget(name, *_spec_kind(spec))


def _is_upload_combo(spec: list[Any]) -> bool:
    _, options = _spec_kind(spec)
    return any(key.endswith("_upload") and value for key, value in options.items())


def map_widget_values(node_info: Mapping[str, Any], values: Any) -> dict[str, Any]:
    """Widget name -> value from a UI node's ``widgets_values`` (a list, or a dict for some nodes)."""
    widgets = widget_inputs(node_info)
    if isinstance(values, dict):
        return {name: values[name] for name, _ in widgets if name in values}
    values = list(values or [])
    mapped: dict[str, Any] = {}
    i = 0
    for name, spec in widgets:
        if i >= len(values):
            break
        mapped[name] = values[i]
        i += 1
        if _has_control_widget(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        if _is_upload_combo(spec):
            # The upload button (and audio/video preview) keep a value too: None or the kind name.
            while i < len(values) and (values[i] is None or values[i] in ("image", "audio", "video")):
                i += 1
    return mapped


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert a frontend-saved workflow to the API prompt the frontend would queue.

    Widget values map onto the node's widget inputs in order (skipping the extra
    control_after_generate and upload-button values); links become ``[node_id, slot]``; widgets
    converted to inputs take their link; Notes and Reroutes vanish; PrimitiveNode values are
    inlined; muted nodes are dropped and bypassed nodes pass their inputs through by type.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported: unpack them in the editor first")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links(workflow)

    for node in nodes.values():
        if node["type"] not in VIRTUAL_TYPES and node["type"] not in object_info:
            raise WorkflowError(f"node {node['id']}: unknown node type {node['type']!r} "
                                "(is the custom node pack that provides it installed?)")

    def source(link_id: int, seen: frozenset[int] = frozenset()) -> list[Any] | tuple[str, Any] | None:
        """Follow a link back through Reroutes and bypassed nodes: a [id, slot] link, a
        ("value", v) for a PrimitiveNode, or None when it ends at a muted/missing node."""
        link = links.get(link_id)
        if link is None or link.origin in seen:
            return None
        origin = nodes.get(link.origin)
        if origin is None or origin.get("mode", 0) == MODE_MUTED:
            return None
        seen = seen | {link.origin}
        if origin["type"] == "PrimitiveNode":
            return ("value", (origin.get("widgets_values") or [None])[0])
        if origin["type"] == "Reroute" or origin.get("mode", 0) == MODE_BYPASSED:
            candidates = [i for i in origin.get("inputs", []) if i.get("link") is not None]
            if origin["type"] != "Reroute":  # bypass: an input of the output's type, same slot first
                out_type = link.type
                candidates = sorted((i for i in candidates if str(i.get("type")) == out_type),
                                    key=lambda i: origin["inputs"].index(i) != link.slot)
            return source(candidates[0]["link"], seen) if candidates else None
        return [str(origin["id"]), link.slot]

    prompt: dict[str, dict[str, Any]] = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        if node["type"] in VIRTUAL_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = map_widget_values(info, node.get("widgets_values"))
        for socket in node.get("inputs", []):
            if socket.get("link") is None:
                continue
            resolved = source(socket["link"])
            if resolved is None:
                inputs.pop(socket["name"], None)
            elif isinstance(resolved, tuple):
                inputs[socket["name"]] = resolved[1]
            else:
                inputs[socket["name"]] = resolved
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]},
        }
    return prompt


# A CLAP2Diffusion file with adapter layers (stage 2 or 3), by the names training gives them.
ADAPTER_FILE = re.compile(r"stage[ _-]?[23]", re.IGNORECASE)


def adapter_loaders(prompt: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Ids of the CLAP2Diffusion Loader nodes whose file needs adapter layers: their audio tokens
    reach an Apply Audio to Model node."""
    consumers: dict[str, set[str]] = {}
    for node_id, node in prompt.items():
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                consumers.setdefault(value[0], set()).add(node_id)
    found = set()
    for node_id, node in prompt.items():
        if node["class_type"] != "C2D_Clap2DiffusionLoader":
            continue
        seen, stack = set(), [node_id]
        while stack:
            for following in consumers.get(stack.pop(), ()):
                if following not in seen:
                    seen.add(following)
                    stack.append(following)
        if any(prompt[n]["class_type"] == "C2D_ApplyAudioToModel" for n in seen):
            found.add(node_id)
    return found


def rewrite_files(prompt: dict[str, dict[str, Any]], object_info: Mapping[str, Any],
                  preferred: Iterable[str]) -> list[str]:
    """Point combo widgets whose value does not exist on this server at files that do.

    The first of ``preferred`` that the combo offers wins, else its first option; a
    CLAP2Diffusion Loader that feeds Apply Audio to Model takes a stage 2/3 file first. Returns
    one line per change, to print.
    """
    preferred = list(preferred)
    needs_adapter = adapter_loaders(prompt)
    changes = []
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        specs = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        for name, value in list(node["inputs"].items()):
            if name not in specs or isinstance(value, list):
                continue
            options = combo_options(specs[name])
            if options is None or value in options:
                continue
            candidates = [p for p in preferred if p in options] + [o for o in options if o not in preferred]
            if node_id in needs_adapter:
                candidates.sort(key=lambda c: not ADAPTER_FILE.search(str(c)))  # stable: keeps the order
            choice = candidates[0] if candidates else None
            if choice is None:
                raise WorkflowError(f"node {node_id} ({node['class_type']}): {name}={value!r} does not "
                                    "exist and there is nothing to choose from")
            node["inputs"][name] = choice
            changes.append(f"node {node_id} ({node['class_type']}) {name}: {value!r} -> {choice!r}")
    return changes


# What random-weight models on a CPU get instead of the workflow's 512 px / 20 steps: the image
# only shows that the graph runs, and the tiny UNet's attention grows with the square of the pixels.
QUICK_SIZE, QUICK_STEPS = 256, 4
#: Frames per-frame nodes make for random models: each frame is a latent of the batch (and its CLAP
#: windows), so a whole 8 s sound at 8 fps (64 latents) would take minutes on a CPU.
QUICK_FRAMES = 4
#: Nodes whose ``frames`` input sets the batch of frames (0: the whole sound); all of a graph's agree.
FRAME_NODES = ("C2D_ClapEncodeFrames", "C2D_AudioEnergyCurves")


def shrink_for_random_models(prompt: dict[str, dict[str, Any]], size: int = QUICK_SIZE,
                             steps: int = QUICK_STEPS, frames: int = QUICK_FRAMES) -> list[str]:
    """Cap latent sizes at ``size`` px, sampler steps at ``steps`` and per-frame nodes at ``frames``
    frames (``frames`` 0, the whole sound, counts as more); one line per change."""
    changes = []
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        caps = {}
        if kind == "EmptyLatentImage":
            caps = {"width": size, "height": size}
        elif kind in ("KSampler", "KSamplerAdvanced", "BasicScheduler"):
            caps = {"steps": steps}
        elif kind == "C2D_FitAudioProjectorFromText":  # a few captions and steps: the plumbing, not the fit
            caps = {"corpus_size": 16, "steps": 10}
        elif kind in FRAME_NODES:
            caps = {"frames": frames}
        elif kind == "C2D_DistilAudioAdapter":  # likewise: the plumbing, not a distillation
            caps = {"corpus_size": 16, "steps": 2, "batch_size": 2, "resolution": 64}
        for name, cap in caps.items():
            value = inputs.get(name)
            whole_sound = name == "frames" and value == 0  # 0 = every frame of the sound: more than any cap
            if isinstance(value, int) and (value > cap or whole_sound):
                inputs[name] = cap
                changes.append(f"node {node_id} ({kind}) {name}: {value} -> {cap} (random-weight models on CPU)")
    return changes


# --------------------------------------------------------------------------------------------
# models


@dataclass
class ModelChoice:
    """Which file each model slot uses, and which are random test models."""

    checkpoint: str
    clap: str
    clap2diffusion: str | None
    clap2diffusion_adapter: str | None = None  # a stage 2/3 file, for Apply Audio to Model
    random: list[str] = field(default_factory=list)
    extra_folders: dict[str, Path] = field(default_factory=dict)  # for extra_model_paths.yaml

    def preferred_names(self) -> list[str]:
        return [n for n in (self.checkpoint, self.clap, self.clap2diffusion, self.clap2diffusion_adapter) if n]


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in suffixes) if folder.is_dir() else []


def _is_sd15(path: Path) -> bool:
    """SD1.5 from the safetensors header alone: UNet cross-attention with a 768 context, no SDXL."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            return key in keys and not any(k.startswith("conditioner.") for k in keys) \
                and f.get_slice(key).get_shape()[1] == 768
    except Exception:
        return False


def find_real_models(comfy: Path) -> dict[str, str | None]:
    """Real model files in the ComfyUI models folders (names as ComfyUI lists them), or None."""
    models = comfy / "models"
    sd15 = next((p for p in _files(models / "checkpoints", (".safetensors",)) if _is_sd15(p)), None)
    clap_dir = models / "clap"
    clap = None
    if clap_dir.is_dir():
        folders = [p for p in sorted(clap_dir.iterdir()) if (p / "config.json").is_file()]
        files = _files(clap_dir, (".pt", ".pth", ".ckpt", ".safetensors"))
        clap = folders[0] if folders else (files[0] if files else None)
    c2d = next(iter(_files(models / "clap2diffusion", (".safetensors",))
                    + _files(REPO_ROOT / "checkpoints", (".safetensors",))), None)
    return {
        "checkpoint": sd15.relative_to(models / "checkpoints").as_posix() if sd15 else None,
        "clap": clap.name if clap else None,
        "clap2diffusion": c2d.name if c2d else None,
    }


def choose_models(comfy: Path) -> ModelChoice:
    """Real models where present, random test models for the rest (built on demand)."""
    from tools import test_models as tm

    real = find_real_models(comfy)
    missing = [k for k, v in real.items() if v is None]
    if not missing:
        return ModelChoice(real["checkpoint"], real["clap"], real["clap2diffusion"])  # type: ignore[arg-type]
    built = tm.build_all()
    choice = ModelChoice(
        checkpoint=real["checkpoint"] or built.sd15_checkpoint.name,
        clap=real["clap"] or built.clap_folder.name,
        clap2diffusion=real["clap2diffusion"] or (built.clap2diffusion.name if built.clap2diffusion else None),
        clap2diffusion_adapter=None if real["clap2diffusion"] or built.clap2diffusion_adapter is None
        else built.clap2diffusion_adapter.name,
    )
    folders = built.folders()
    if real["checkpoint"] is None:
        choice.random.append("SD1.5 checkpoint")
        # The test ControlNet and LoRA fit only the tiny UNet.
        choice.extra_folders.update({k: folders[k] for k in ("checkpoints", "controlnet", "loras")})
    if real["clap"] is None:
        choice.random.append("CLAP")
        choice.extra_folders["clap"] = folders["clap"]
    if real["clap2diffusion"] is None and built.clap2diffusion is not None:
        choice.random.append("CLAP2Diffusion")
        choice.extra_folders["clap2diffusion"] = folders["clap2diffusion"]
    return choice


WHERE_REAL_WEIGHTS_GO = """\
For real images, put real weights in the ComfyUI models folders ({models}):
  checkpoints/<an SD1.5 checkpoint>.safetensors        e.g. v1-5-pruned-emaonly.safetensors
  clap/<laion/clap-htsat-unfused folder>/              (config.json, model.safetensors, tokenizer, ...)
      or clap/630k-audioset-best.pt                    (a laion-clap checkpoint)
  clap2diffusion/<trained file>.safetensors            (from the training scripts)"""


def write_extra_model_paths(folders: Mapping[str, Path], target: Path) -> Path:
    """An extra_model_paths.yaml that adds our test model folders beside the real ones."""
    lines = ["clap2diffusion_test_models:"] + [f"    {name}: {path}" for name, path in folders.items()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    return target


# --------------------------------------------------------------------------------------------
# main


def _stage(label: str, seconds: float) -> None:
    print(f"  {label:<44} {seconds:8.2f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", nargs="?", type=Path, default=DEFAULT_WORKFLOW)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out", help="output folder (default: %(default)s)")
    parser.add_argument("--sound", type=Path, help="a sound file to use instead of the test sounds")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the image")
    parser.add_argument("--setup-seconds", type=float, help=argparse.SUPPRESS)  # from `make demo`
    args = parser.parse_args(argv)
    total_start = time.monotonic()

    if str(REPO_ROOT) not in sys.path:  # run as a script: make the `tools` package importable
        sys.path.insert(0, str(REPO_ROOT))
    from tools import test_models as tm
    from tools.comfy_server import ComfyServer

    workflow_path: Path = args.workflow
    if not workflow_path.is_file():
        hint = " (the examples are written by tools/make_workflows.py)" if workflow_path == DEFAULT_WORKFLOW else ""
        parser.error(f"{workflow_path} does not exist{hint}")
    workflow = json.loads(workflow_path.read_text())

    comfy = tm.comfyui_path()
    timings: list[tuple[str, float]] = []
    if args.setup_seconds is not None:
        timings.append(("setup (venv, ComfyUI)", args.setup_seconds))

    start = time.monotonic()
    models = choose_models(comfy)
    timings.append(("models (find / build)", time.monotonic() - start))
    if models.random:
        print(f"\nNo real {', '.join(models.random)} found: using RANDOM-WEIGHT test models for "
              f"{'it' if len(models.random) == 1 else 'them'}. The image shows that the graph runs, "
              "not what the sound looks like.")
        print(WHERE_REAL_WEIGHTS_GO.format(models=comfy / "models"))
        print()

    out: Path = args.out.resolve()
    input_dir, output_dir = out / "input", out / "output"
    input_dir.mkdir(parents=True, exist_ok=True)
    sounds = [args.sound] if args.sound else list(tm.build_all().sounds.values())
    for sound in sounds:
        shutil.copyfile(sound, input_dir / sound.name)
    extra = ["--extra-model-paths-config", str(write_extra_model_paths(models.extra_folders,
                                                                       out / "extra_model_paths.yaml"))] \
        if models.extra_folders else []

    start = time.monotonic()
    server = ComfyServer(comfyui=comfy, input_dir=input_dir, output_dir=output_dir,
                         extra_args=extra, log_path=out / "server.log")
    print(f"starting ComfyUI ({comfy}), log: {server.log_path}", flush=True)
    with server:
        timings.append(("server start (to /object_info)", time.monotonic() - start))
        info = server.client.object_info()
        prompt = ui_to_api(workflow, info)
        changes = rewrite_files(prompt, info, models.preferred_names() + [sounds[0].name])
        if "SD1.5 checkpoint" in models.random:
            changes += shrink_for_random_models(prompt)
        for change in changes:
            print("  " + change)
        print(f"running {workflow_path.name} ({len(prompt)} nodes)...", flush=True)
        result = server.client.execute(prompt, timeout=args.timeout)

    if not result.images:
        print("the workflow produced no image", file=sys.stderr)
        return 1
    image_path = out / f"{workflow_path.name.split('.')[0]}.png"
    image_path.write_bytes(result.images[-1])

    print("\ntimes:")
    for label, seconds in timings:
        _stage(label, seconds)
    for node_id, seconds in result.node_times.items():  # in execution order
        node = prompt.get(node_id, {})
        _stage(f"node {node_id} {node.get('_meta', {}).get('title', node.get('class_type', '?'))}", seconds)
    _stage("workflow (queue to image)", result.seconds)
    _stage("total", time.monotonic() - total_start + (args.setup_seconds or 0.0))
    print(image_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
