"""example_workflows/*.json are what tools/make_workflows.py writes for this server's nodes.

A node that gains, loses or reorders an input changes its ``widgets_values`` layout: the shipped
workflows must then be generated again (``.venv/bin/python tools/make_workflows.py``), or the
frontend would put saved values into the wrong widgets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.comfy_server import ComfyClient
from tools.make_workflows import OUT_DIR, WORKFLOWS, build, dumps


def test_every_generated_workflow_is_shipped_and_every_shipped_one_generated() -> None:
    assert sorted(p.stem for p in OUT_DIR.glob("*.json")) == sorted(WORKFLOWS)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_shipped_workflow_is_up_to_date_with_the_nodes(comfy: ComfyClient, name: str) -> None:
    shipped = (OUT_DIR / f"{name}.json").read_text()
    assert dumps(build(name, comfy.object_info())) == shipped, (
        f"{Path(OUT_DIR.name) / name}.json is stale: run .venv/bin/python tools/make_workflows.py")
