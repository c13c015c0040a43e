"""Regenerate the README's pictures in docs/images/ (``make pictures``), each from what makes it:

- ``workflow.png``: the example workflow ``audio_text_to_image`` in the real ComfyUI frontend, the
  screenshot tests/test_browser_workflows.py takes (chromium; the test's own server and models);
- ``timeline.png``: the timeline picture of the 20 s rain-then-thunder sound that
  tests/test_schedule_core.py saves (Audio to Prompt Schedule draws it the same way);
- ``decomposition.png``: Hierarchical Decompose's preview of ``thunder.wav`` (which audio token
  went to which level, and each level's weight), from the node itself on a real ComfyUI server.

The test models are random, so the pictures show what the nodes draw, not what a trained model
hears. Each is shrunk to a small palette PNG (README assets are committed).

    .venv/bin/python tools/pictures.py                      # all three
    .venv/bin/python tools/pictures.py timeline decomposition
    .venv/bin/python tools/pictures.py --no-run workflow     # copy the last screenshot, run nothing
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the `tools` package importable
    sys.path.append(str(REPO_ROOT))  # appended: must not shadow ComfyUI's `nodes`

IMAGES = REPO_ROOT / "docs" / "images"
ARTIFACTS = REPO_ROOT / "test-artifacts"
WORKFLOW = "audio_text_to_image"
MAX_WIDTH = 1600  # the screenshot is 2400 px wide (device scale 2): 1600 keeps node text legible


def shrink(source: Path, target: Path, max_width: int = MAX_WIDTH, colors: int = 256) -> Path:
    """``source`` scaled to at most ``max_width`` px wide, as an optimised palette PNG at ``target``."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=colors, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
    return target


def pick_screenshot(folder: Path, workflow: str = WORKFLOW) -> Path:
    """The browser test's screenshot of ``workflow``, whatever the test names it: under ``folder``
    (subfolders too, e.g. one per frontend), a PNG whose name holds the workflow's name and no
    "error"; a "loaded"/"clean" one (the graph as opened, before a run) first, then the plain
    ``<workflow>.png``, then the newest."""
    found = [p for p in folder.rglob(f"*{workflow}*.png") if "error" not in p.name]
    if not found:
        raise FileNotFoundError(f"no screenshot of {workflow} under {folder}: run the browser test "
                                f"(tests/test_browser_workflows.py -k {workflow}) first")

    def rank(path: Path) -> tuple[int, int, float]:
        clean = any(word in path.stem for word in ("loaded", "clean"))
        return (clean, path.stem == workflow, path.stat().st_mtime)

    return max(found, key=rank)


def run_pytest(*args: str) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    print("+", " ".join(command), flush=True)
    # A missing chromium fails the browser test instead of skipping it: an old screenshot is no picture.
    env = {**os.environ, "C2D_REQUIRE_BROWSER": "1"}
    if subprocess.run(command, cwd=REPO_ROOT, env=env).returncode != 0:
        raise SystemExit(f"the test that draws this picture failed: {' '.join(args)}")


def workflow_picture(run: bool) -> Path:
    if run:
        run_pytest("tests/test_browser_workflows.py", "-k", WORKFLOW)
    return shrink(pick_screenshot(ARTIFACTS / "browser"), IMAGES / "workflow.png")


def timeline_picture(run: bool) -> Path:
    if run:
        run_pytest("tests/test_schedule_core.py", "-k", "timeline_picture")
    return shrink(ARTIFACTS / "schedule" / "timeline_rain_then_thunder.png", IMAGES / "timeline.png")


def decomposition_picture(run: bool) -> Path:
    """Hierarchical Decompose's preview image, as the node returns it to the frontend."""
    if not run:
        raise SystemExit("decomposition: nothing to copy, it is drawn by a server run (drop --no-run)")
    from tools import test_models as tm
    from tools.comfy_server import ComfyServer, Graph, make_base_dir

    models = tm.build_all()
    with tempfile.TemporaryDirectory(prefix="c2d-pictures-") as tmp:
        base = make_base_dir(Path(tmp), {"clap": [models.clap_folder], "clap2diffusion": [models.clap2diffusion]},
                             inputs=list(models.sounds.values()))
        with ComfyServer(base) as server:
            g = Graph()
            clap = g.node("C2D_ClapLoader", clap_name=models.clap_folder.name)
            audio = g.node("C2D_LoadAudio", audio="thunder.wav")
            embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
            c2d = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=models.clap2diffusion.name)
            levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=c2d.out, clap_embeds=embeds.out,
                            foreground=1.0, background=1.0, ambience=1.0)
            tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=c2d.out)
            g.node("C2D_SaveAudioTokens", audio_tokens=tokens.out, filename_prefix="pictures/thunder")
            entry = server.client.wait(server.client.queue(g.prompt()), timeout=600)
            (png,) = server.client.images(entry, node_id=levels.id)
        raw = Path(tmp) / "decomposition.png"
        raw.write_bytes(png)
        return shrink(raw, IMAGES / "decomposition.png")


PICTURES: dict[str, Callable[[bool], Path]] = {
    "workflow": workflow_picture,
    "timeline": timeline_picture,
    "decomposition": decomposition_picture,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *PICTURES], help="pictures to make (default: all)")
    parser.add_argument("--no-run", action="store_true", help="copy what the tests last saved; run nothing")
    args = parser.parse_args(argv)
    for name in args.names or list(PICTURES):
        path = PICTURES[name](not args.no_run)
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size // 1024} KB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
