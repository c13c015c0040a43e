"""example_workflows/*.json are what tools/make_workflows.py writes for this server's nodes.

A node that gains, loses or reorders an input changes its ``widgets_values`` layout: the shipped
workflows must then be generated again (``.venv/bin/python tools/make_workflows.py``), or the
frontend would put saved values into the wrong widgets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_versions import WORKFLOWS_MADE_ON

from tools.comfy_server import ComfyClient
from tools.make_workflows import OUT_DIR, WORKFLOWS, build, dumps
from tools.run_workflow import ui_to_api


def test_every_generated_workflow_is_shipped_and_every_shipped_one_generated() -> None:
    assert sorted(p.stem for p in OUT_DIR.glob("*.json")) == sorted(WORKFLOWS)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_shipped_workflow_is_up_to_date_with_the_nodes(comfy: ComfyClient, name: str) -> None:
    shipped = (OUT_DIR / f"{name}.json").read_text()
    info = comfy.object_info()
    made = dumps(build(name, info))
    stale = f"{Path(OUT_DIR.name) / name}.json is stale: run .venv/bin/python tools/make_workflows.py"
    version = comfy.system_stats()["system"]["comfyui_version"]
    if version == WORKFLOWS_MADE_ON:
        assert made == shipped, stale
    else:  # another ComfyUI: every saved value must still land on the same input of the same node
        assert ui_to_api(json.loads(shipped), info) == ui_to_api(json.loads(made), info), \
            f"{stale} (on ComfyUI {version}; the files are made on {WORKFLOWS_MADE_ON})"
