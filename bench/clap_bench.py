"""CLAP figures of ``make bench`` (issue 16): speed against transformers, the audio path's memory,
and resident memory while streaming a 1-hour file.

- ``clap_speedup_vs_transformers``: our clips/s divided by transformers' clips/s, batch 8, the
  same 10 s clips in the same run, interleaved, medians; ``clap_speed`` has the clips/s at batch 1
  and 8 of both, and of ours with transformers' HTS-AT forward (the encode before ``htsat``).
  Ours: ``ClapAudioTower.encode_windows`` (torch log-mel, then HTS-AT through
  ``clap2diffusion_core.htsat``). Theirs: ``ClapFeatureExtractor`` then
  ``ClapModel.get_audio_features`` (the pipeline transformers documents), on the same weights.
- ``clap_audio_only_mem_mb``: bytes of what the audio path keeps resident (the audio tower's
  parameters and buffers), as section d counts ``clap_audio_tower_mb``. The measured RSS growth of a
  fresh process that loads the audio tower and encodes 8 clips is recorded beside it.
- ``long_file_rss_growth_mb``: per window mode, the peak RSS growth of a fresh process while
  ``CLAP Encode File``'s path (decode, resample, window, encode, in pieces) runs over a generated
  1-hour 16 kHz file, after the tower is loaded and 100 s in the same mode have warmed it up.

Uses the test CLAP folder (the laion/clap-htsat-unfused architecture, random weights).

    .venv/bin/python bench/clap_bench.py [--reps 3] [--long-seconds 3600]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MB = 1024 * 1024
MODES = ("first", "mean", "per_window")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """Peak RSS of this process over a block, sampled every 10 ms in a thread."""

    def __enter__(self) -> _Peak:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MB


def speed(clap_folder: Path, reps: int, batches: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    """Clips/s of each pipeline at each batch size, on the same clips and weights, interleaved:
    ours, transformers', and ours with transformers' HTS-AT forward (what htsat.py gains)."""
    import torch
    from transformers import ClapFeatureExtractor

    from clap2diffusion_core.clap import load_clap, load_clap_tower

    tower = load_clap_tower(clap_folder, "audio")
    model = load_clap(clap_folder).model  # transformers' ClapModel, the same weights
    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=tower.mel.f_min,
                                     frequency_max=tower.mel.f_max)  # fmt: skip
    all_clips = 0.1 * torch.randn(max(batches), 480_000, generator=torch.Generator().manual_seed(3))

    def ours(clips: torch.Tensor) -> torch.Tensor:
        return tower.encode_windows(clips, batch_size=len(clips))

    @torch.inference_mode()
    def ours_before(clips: torch.Tensor) -> torch.Tensor:
        """Our mel, then transformers' own HTS-AT forward: the encode before htsat.py."""
        mel = torch.cat([tower.log_mel(w[None]) for w in clips]).unsqueeze(1)
        out = model.get_audio_features(input_features=mel, is_longer=torch.zeros(len(clips), 1, dtype=torch.bool))
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    @torch.inference_mode()
    def theirs(clips: torch.Tensor) -> torch.Tensor:
        features = extractor(list(clips.numpy()), sampling_rate=48_000, return_tensors="pt")
        out = model.get_audio_features(**features)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    pipelines = {"ours": ours, "transformers": theirs, "ours_mel_transformers_htsat": ours_before}
    reference = theirs(all_clips)  # also the warm-ups
    diffs = {name: float((fn(all_clips) - reference).abs().max()) for name, fn in pipelines.items()}
    times: dict[str, dict[str, list[float]]] = {str(b): {name: [] for name in pipelines} for b in batches}
    for rep in range(reps):
        for b in batches:
            order = list(pipelines.items())
            for name, fn in order[rep % 3:] + order[: rep % 3]:  # each goes first in turn
                t0 = time.perf_counter()
                fn(all_clips[:b])
                times[str(b)][name].append(time.perf_counter() - t0)
    clips_per_s = {b: {name: int(b) / statistics.median(t) for name, t in per.items()} for b, per in times.items()}
    at_8 = clips_per_s.get("8")
    return {
        "clap_speedup_vs_transformers": at_8["ours"] / at_8["transformers"] if at_8 else None,
        "clips_per_s": clips_per_s,
        "raw_seconds": times,
        "max_abs_embedding_difference": diffs["ours"],
        "max_abs_embedding_difference_each": diffs,
        "torch_threads": torch.get_num_threads(),
    }


def _child(kind: str, clap_folder: str, arg: str) -> dict[str, Any]:
    """Runs in a fresh process, so one measurement's allocations do not hide another's."""
    import torch

    from clap2diffusion_core import audio
    from clap2diffusion_core.clap import load_clap_tower

    base = _rss()
    with _Peak() as peak:
        tower = load_clap_tower(clap_folder, "audio")
        if kind == "audio_only":
            tower.encode_windows(0.1 * torch.randn(8, 480_000))
    if kind == "audio_only":
        return {"rss_growth_mb": (peak.peak - base) / MB}
    # Warm: 10 windows (a full batch of 8 and a partial one) through everything, in this mode.
    tower.embed(torch.randn(1, 1, 1_600_000) * 0.1, 16_000, arg.split(":", 1)[0])
    sample_rate, samples, pieces = audio.stream_audio_file(arg.split(":", 1)[1])
    mode = arg.split(":", 1)[0]
    total = audio.count_windows(samples, sample_rate) if samples else None
    with _Peak() as peak:
        t0 = time.perf_counter()
        out = tower.embed_stream(pieces, sample_rate, mode, total)
        seconds = time.perf_counter() - t0
    return {"rss_growth_mb": peak.growth_mb, "seconds": seconds, "rows": int(out.shape[0]), "windows": total}


def _run_child(kind: str, clap_folder: Path, arg: str = "") -> dict[str, Any]:
    import torch

    threads = str(torch.get_num_threads())  # the child encodes on as many threads as this process
    out = subprocess.run(
        [sys.executable, __file__, "--threads", threads, "--child", kind, str(clap_folder), arg],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_noise(path: Path, seconds: float, rate: int = 16_000) -> None:
    """16-bit mono noise, one 60 s block written again and again (an hour in about a second)."""
    import numpy as np
    import soundfile as sf

    block = (np.random.default_rng(7).standard_normal(rate * 60) * 300).astype(np.int16)
    left = int(rate * seconds)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as f:
        while left > 0:
            f.write(block[: min(len(block), left)])
            left -= min(len(block), left)


def run(clap_folder: Path, reps: int = 3, long_seconds: float = 3600.0) -> dict[str, Any]:
    """All three keys and their details."""
    from clap2diffusion_core.clap import load_clap_tower

    load = os.getloadavg()
    results: dict[str, Any] = {"clap_speed": speed(clap_folder, reps)}
    results["clap_speed"]["load_average_start_end"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]
    results["clap_speedup_vs_transformers"] = results["clap_speed"]["clap_speedup_vs_transformers"]
    tower = load_clap_tower(clap_folder, "audio")
    resident = sum(t.numel() * t.element_size() for t in [*tower.parameters(), *tower.buffers()]) / MB
    del tower
    results["clap_audio_only_mem_mb"] = resident
    results["clap_audio_only"] = {"resident_bytes_mb": resident, **_run_child("audio_only", clap_folder)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one_hour.wav"
        write_noise(path, long_seconds)
        runs = {mode: _run_child("stream", clap_folder, f"{mode}:{path}") for mode in MODES}
    results["long_file_rss_growth_mb"] = {mode: r["rss_growth_mb"] for mode, r in runs.items()}
    results["long_file"] = {"seconds_of_audio": long_seconds, "runs": runs}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--long-seconds", type=float, default=3600.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's own, but 1 when the load average is at least the "
                        "core count, as make bench does: oversubscribed OpenMP threads wait on each other at every op)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if not args.threads and os.getloadavg()[0] >= (os.cpu_count() or 1):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    from tools import test_models as tm

    print(json.dumps(run(tm.build_all().clap_folder, args.reps, args.long_seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
