"""Frames per second of CLAP Encode Frames' encode (issue 19), on this machine.

The issue's test sound (20 s: rain-like noise, then thunder-like bursts, 16 kHz) at 8 fps, 10 s
windows, through ``timeline.encode_frames`` with the test CLAP (the laion/clap-htsat-unfused
architecture, random weights) and the node's batch of windows. Per hop: the frames, the distinct
windows encoded, seconds, frames/s and windows/s, and the load average (the machine is shared).

    .venv/bin/python bench/frames_bench.py [--hops 0 0.5] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hops", type=float, nargs="+", default=[0.0, 0.5], help="hop_seconds values (0: every frame)")
    parser.add_argument("--batch", type=int, default=2, help="windows per CLAP pass (CLAP Encode Frames uses 2)")
    parser.add_argument("--fps", type=float, default=8.0)
    args = parser.parse_args()

    import torch

    from clap2diffusion_core import timeline
    from clap2diffusion_core.clap import load_clap_tower
    from tools import test_models as tm
    from tools.test_sounds import rain_then_thunder

    tower = load_clap_tower(tm.build_all().clap_folder, "audio")  # cached after the first build
    sound = rain_then_thunder(16_000)
    with torch.inference_mode():
        for hop in args.hops:
            stride = max(1, round(hop * args.fps))
            encoded: list[int] = []

            def encode(windows: torch.Tensor, seen: list[int] = encoded) -> torch.Tensor:
                seen.append(windows.shape[0])
                return tower.encode_windows(windows, args.batch)

            start = time.monotonic()
            embeds = timeline.encode_frames(encode, sound, 16_000, args.fps, window_seconds=10.0, stride=stride,
                                            batch_size=args.batch)  # fmt: skip
            seconds = time.monotonic() - start
            frames, windows = embeds.shape[1], sum(encoded)
            print(json.dumps({
                "hop_seconds": hop, "frames": frames, "windows": windows, "seconds": round(seconds, 1),
                "frames_per_s": round(frames / seconds, 2), "windows_per_s": round(windows / seconds, 2),
                "load_average": [round(x, 1) for x in os.getloadavg()], "threads": torch.get_num_threads(),
            }))  # fmt: skip


if __name__ == "__main__":
    main()
