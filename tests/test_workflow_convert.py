"""tools/run_workflow.py: frontend (UI) workflow JSON -> API prompt, and running it for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.comfy_server import ComfyClient
from tools.run_workflow import (
    QUICK_FRAMES,
    WorkflowError,
    adapter_loaders,
    has_control_widget,
    map_widget_values,
    rewrite_files,
    shrink_for_random_models,
    ui_to_api,
)

DATA = Path(__file__).parent / "data"
WORKFLOW = DATA / "core_text_to_image.ui.json"
EXAMPLES = sorted((Path(__file__).parents[1] / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def object_info() -> dict:
    # A snapshot of ComfyUI 0.3.75's /object_info for the core nodes used here.
    return json.loads((DATA / "object_info_core.json").read_text())


def test_core_workflow_converts_to_the_prompt_the_frontend_queues(object_info: dict) -> None:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    assert set(prompt) == {"3", "4", "5", "6", "7", "8", "9"}  # no Note, Reroute, Primitive, muted node
    assert prompt["3"]["inputs"] == {
        "seed": 1234, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
    }
    assert prompt["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}  # through the Reroute
    assert prompt["6"]["inputs"]["text"] == "a beach at dusk, storm clouds"
    assert prompt["6"]["_meta"]["title"] == "Positive"
    assert prompt["5"]["inputs"] == {"width": 256, "height": 256, "batch_size": 1}


def test_primitive_node_value_wins_over_the_stale_widget_value(object_info: dict) -> None:
    workflow = json.loads(WORKFLOW.read_text())
    primitive = next(n for n in workflow["nodes"] if n["type"] == "PrimitiveNode")
    primitive["widgets_values"] = [99, "fixed"]
    assert ui_to_api(workflow, object_info)["3"]["inputs"]["seed"] == 99


def test_bypassed_node_passes_its_input_through(object_info: dict) -> None:
    workflow = json.loads(WORKFLOW.read_text())
    # Bypass VAEDecode's source (KSampler): VAEDecode then decodes the empty latent directly.
    next(n for n in workflow["nodes"] if n["id"] == 3)["mode"] = 4
    prompt = ui_to_api(workflow, object_info)
    assert "3" not in prompt
    assert prompt["8"]["inputs"]["samples"] == ["5", 0]


def test_widget_values_skip_control_and_upload_values(object_info: dict) -> None:
    assert map_widget_values(object_info["LoadAudio"], ["rain.wav", None, None]) == {"audio": "rain.wav"}
    assert map_widget_values(object_info["LoadImage"], ["cat.png", "image"]) == {"image": "cat.png"}
    assert map_widget_values(object_info["KSampler"], [5, "randomize", 20, 8, "euler", "normal", 1])["steps"] == 20
    # Older workflows saved no control value after the seed.
    assert map_widget_values(object_info["KSampler"], [5, 20, 8, "euler", "normal", 1])["steps"] == 20


def test_missing_files_are_pointed_at_what_exists(object_info: dict) -> None:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    changes = rewrite_files(prompt, object_info, ["tiny-sd15.safetensors"])
    assert prompt["4"]["inputs"]["ckpt_name"] == "tiny-sd15.safetensors"
    assert changes == ["node 4 (CheckpointLoaderSimple) ckpt_name: 'v1-5-pruned-emaonly.safetensors' "
                       "-> 'tiny-sd15.safetensors'"]


def test_random_models_get_small_latents_and_few_steps(object_info: dict) -> None:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    prompt["5"]["inputs"].update(width=512, height=768)
    prompt["3"]["inputs"]["steps"] = 20
    changes = shrink_for_random_models(prompt)
    assert prompt["5"]["inputs"] == {"width": 256, "height": 256, "batch_size": 1}
    assert prompt["3"]["inputs"]["steps"] == 4 and len(changes) == 3
    assert shrink_for_random_models(prompt) == []  # already small: unchanged


def test_random_models_get_a_few_frames_not_the_whole_sound() -> None:
    """A per-frame graph makes one latent per frame (and CLAP windows for them): 0 (the whole sound)
    or many frames become QUICK_FRAMES on every frame node, so they still agree; fewer stay."""
    prompt = {
        "7": {"class_type": "C2D_ClapEncodeFrames", "inputs": {"fps": 8.0, "frames": 0}},
        "10": {"class_type": "C2D_AudioEnergyCurves", "inputs": {"fps": 8.0, "frames": 64}},
        "11": {"class_type": "C2D_ClapEncodeFrames", "inputs": {"fps": 8.0, "frames": 2}},
    }
    changes = shrink_for_random_models(prompt)
    assert [prompt[n]["inputs"]["frames"] for n in ("7", "10", "11")] == [QUICK_FRAMES, QUICK_FRAMES, 2]
    assert changes[0] == f"node 7 (C2D_ClapEncodeFrames) frames: 0 -> {QUICK_FRAMES} (random-weight models on CPU)"
    assert len(changes) == 2


def test_a_loader_feeding_apply_audio_to_model_gets_a_stage_2_or_3_file() -> None:
    info = {"C2D_Clap2DiffusionLoader": {"input": {"required": {"clap2diffusion_name": [
        "COMBO", {"options": ["a-stage1.safetensors", "b-stage3.safetensors"]}]}}}}
    prompt = {
        "1": {"class_type": "C2D_Clap2DiffusionLoader", "inputs": {"clap2diffusion_name": "mine.safetensors"}},
        "2": {"class_type": "C2D_HierarchicalDecompose", "inputs": {"clap2diffusion": ["1", 0]}},
        "3": {"class_type": "C2D_AudioProject", "inputs": {"audio_levels": ["2", 0]}},
        "4": {"class_type": "C2D_ApplyAudioToModel", "inputs": {"audio_tokens": ["3", 0]}},
        "5": {"class_type": "C2D_Clap2DiffusionLoader", "inputs": {"clap2diffusion_name": "mine.safetensors"}},
        "6": {"class_type": "C2D_ApplyAudioToConditioning", "inputs": {"audio_tokens": ["5", 0]}},
    }
    assert adapter_loaders(prompt) == {"1"}
    info.update({k: {"input": {}} for k in ("C2D_HierarchicalDecompose", "C2D_AudioProject",
                                            "C2D_ApplyAudioToModel", "C2D_ApplyAudioToConditioning")})
    rewrite_files(prompt, info, ["a-stage1.safetensors"])
    assert prompt["1"]["inputs"]["clap2diffusion_name"] == "b-stage3.safetensors"
    assert prompt["5"]["inputs"]["clap2diffusion_name"] == "a-stage1.safetensors"


def test_unknown_node_type_is_named(object_info: dict) -> None:
    workflow = json.loads(WORKFLOW.read_text())
    workflow["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(workflow, object_info)


def test_converted_workflow_runs_on_the_real_server(comfy: ComfyClient) -> None:
    info = comfy.object_info()
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), info)
    rewrite_files(prompt, info, ["tiny-sd15.safetensors"])
    images = comfy.run(prompt, timeout=300)
    assert len(images) == 1 and images[0][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path", EXAMPLES or [pytest.param(None, marks=pytest.mark.skip("no example workflows yet"))],
                         ids=[p.name for p in EXAMPLES] or ["none"])
def test_example_workflows_run_on_the_real_server(comfy: ComfyClient, test_models, path: Path) -> None:
    # What `make demo` does, on the session server: every shipped template converts with this
    # server's nodes, and runs once its files are pointed at the test models.
    info = comfy.object_info()
    prompt = ui_to_api(json.loads(path.read_text()), info)
    names = [p.name for p in (test_models.sd15_checkpoint, test_models.clap_folder,
                              test_models.clap2diffusion, test_models.sounds["thunder.wav"]) if p]
    rewrite_files(prompt, info, names)  # a loader feeding Apply Audio to Model takes the stage 3 file
    shrink_for_random_models(prompt)  # 256 px, 4 steps, 4 frames: as make demo runs the random models
    assert comfy.run(prompt, timeout=600), f"{path.name} produced no image"


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("seed", {}, True),  # the frontend's fallback: INT seeds by name
    ("noise_seed", {"control_after_generate": None}, True),
    ("seed", {"control_after_generate": False}, False),  # a node that turns it off (the text fit's seed)
    ("frame", {"control_after_generate": True}, True),
    ("steps", {}, False),
])
def test_a_control_widget_follows_the_frontends_flag_or_else_the_seed_name(name, options, expected) -> None:  # noqa: ANN001
    # frontend 1.32: `spec.control_after_generate ?? ["seed", "noise_seed"].includes(name)`
    assert has_control_widget(name, "INT", options) is expected
    assert has_control_widget(name, "FLOAT", options) is False
