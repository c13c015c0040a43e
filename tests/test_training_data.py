"""Training data: the manifest, the generated smoke set and the resumable feature cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_support import SPEC, write_fake_cache

from clap2diffusion_core.training.features import (
    CacheSpec,
    FeatureCache,
    FeatureCacheError,
    FeatureDataset,
    prepare_features,
)
from clap2diffusion_core.training.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest
from clap2diffusion_core.training.synthetic import (
    SOUND_KINDS,
    clap_separability,
    make_synthetic_dataset,
    synth_clip,
)

# --------------------------------------------------------------------------------------------
# manifest


def test_manifest_round_trip_keeps_paths_relative_to_its_folder(tmp_path):
    entries = [ManifestEntry(str(tmp_path / "a.wav"), str(tmp_path / "a.png"), "a dog barks", "train"),
               ManifestEntry(str(tmp_path / "b.wav"), str(tmp_path / "b.png"), "rain", "val", id="clip-b")]
    path = write_manifest(entries, tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["audio"] == "a.wav" and rows[1]["id"] == "clip-b"
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "m.jsonl").write_text(path.read_text())
    again = read_manifest(moved / "m.jsonl")
    assert [e.id for e in again] == [e.id for e in entries]  # ids survive moving the folder
    assert again[0].audio == str(moved / "a.wav")
    assert [e.caption for e in read_manifest(moved / "m.jsonl", splits=["val"])] == ["rain"]


def test_manifest_reads_csv(tmp_path):
    (tmp_path / "m.csv").write_text("audio,image,caption,split\nx.wav,x.jpg,  wind   blows ,test\n")
    (entry,) = read_manifest(tmp_path / "m.csv")
    assert (entry.caption, entry.split, entry.audio) == ("wind blows", "test", str(tmp_path / "x.wav"))


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"audio": "a.wav", "image": "a.png"}', "missing caption"),
     ('{"audio": "a.wav", "image": "a.png", "caption": "c", "split": "dev"}', "split 'dev'"),
     ("not json", "not JSON")],
)
def test_manifest_errors_name_the_line(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text('{"audio": "ok.wav", "image": "ok.png", "caption": "ok"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=rf"m.jsonl:2: .*{message}"):
        read_manifest(tmp_path / "m.jsonl")


def test_manifest_refuses_duplicate_ids(tmp_path):
    row = '{"audio": "a.wav", "image": "a.png", "caption": "c"}\n'
    (tmp_path / "m.jsonl").write_text(row * 2)
    with pytest.raises(ManifestError, match="repeats line 1"):
        read_manifest(tmp_path / "m.jsonl")


# --------------------------------------------------------------------------------------------
# generated smoke set


def test_synthetic_set_has_every_kind_with_its_caption(tmp_path):
    manifest = make_synthetic_dataset(tmp_path, per_kind=2, image_size=32)
    entries = read_manifest(manifest)
    assert len(entries) == 2 * len(SOUND_KINDS)
    assert {e.caption for e in entries} == {k.caption for k in SOUND_KINDS}
    import soundfile
    from PIL import Image

    audio, rate = soundfile.read(entries[0].audio)
    assert rate == 48_000 and 0.4 < np.abs(audio).max() <= 0.9
    assert Image.open(entries[0].image).size == (32, 32)
    # Deterministic: the same seed writes the same sounds.
    again = make_synthetic_dataset(tmp_path / "again", per_kind=2, image_size=32)
    assert soundfile.read(read_manifest(again)[0].audio)[0].tolist() == audio.tolist()


def test_synthetic_kinds_differ_in_spectrum():
    """What a random CLAP can tell apart: where the energy sits (see synthetic.py)."""
    rng = np.random.default_rng(0)
    centroids = {}
    for kind in SOUND_KINDS:
        clip = synth_clip(kind, rng, seconds=1.0)
        spectrum = np.abs(np.fft.rfft(clip))
        centroids[kind.name] = float((spectrum * np.fft.rfftfreq(clip.size, 1 / 48_000)).sum() / spectrum.sum())
    assert centroids["rumble"] < centroids["hum"] < centroids["beep"] < centroids["hiss"]


def test_clap_separability_is_leave_one_out_nearest_neighbour():
    labels = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[1.0, 0.1], [1.0, 0.12], [0.1, 1.0], [0.12, 1.0]])
    assert clap_separability(apart, labels) == 1.0
    assert clap_separability(apart, torch.tensor([0, 1, 0, 1])) == 0.0


# --------------------------------------------------------------------------------------------
# feature cache


class _FakeAudio:
    """Stands in for AudioEmbedder: 'audio' files are text files holding a number."""

    mode = "first"

    def load(self, path):
        with open(path) as f:
            return torch.full((1, 4), float(f.read()))

    def embed_windows(self, windows):
        return torch.nn.functional.normalize(torch.cat([w[:, :1].expand(1, 512) for w in windows]) + 1, dim=-1)


def _fake_text(captions):
    hidden = torch.stack([torch.full((77, 768), float(len(c))) for c in captions])
    return hidden, hidden[:, 0]


def _fake_images(pixels):
    return pixels.mean(1, keepdim=True).repeat(1, 4, 1, 1)[:, :, ::8, ::8]


def _examples(tmp_path, n, broken=()):
    from PIL import Image

    entries = []
    for i in range(n):
        audio, image = tmp_path / f"{i}.txt", tmp_path / f"{i}.png"
        audio.write_text("oops" if i in broken else str(i))
        Image.fromarray(np.full((16, 16, 3), 10 * i, dtype=np.uint8)).save(image)
        entries.append(ManifestEntry(str(audio), str(image), f"caption {i % 3}", "train" if i % 4 else "val", f"id{i}"))
    return entries


def _prepare(entries, cache, **kwargs):
    return prepare_features(entries, cache, SPEC, _FakeAudio(), _fake_text, _fake_images,
                            batch_size=3, shard_size=4, progress=False, **kwargs)


def test_prepare_fills_shards_and_a_rerun_skips_what_is_done(tmp_path):
    entries = _examples(tmp_path, 10)
    first = _prepare(entries[:7], tmp_path / "cache")
    assert (first.added, first.already_cached, first.failures) == (7, 0, [])
    again = _prepare(entries, tmp_path / "cache")  # an interrupted run picks up the rest
    assert (again.added, again.already_cached) == (3, 7)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.ids() == {e.id for e in entries}
    shapes = {k: tuple(v.shape) for k, v in FeatureDataset(tmp_path / "cache", "train")[0].items()}
    assert shapes == {"clap": (512,), "text": (77, 768), "text_pooled": (768,), "latents": (4, 8, 8),
                      "caption_index": ()}
    assert cache.empty_caption().shape == (77, 768)


def test_unreadable_files_are_reported_and_skipped_not_fatal(tmp_path):
    entries = _examples(tmp_path, 6, broken={2})
    (tmp_path / "4.png").write_bytes(b"not an image")
    report = _prepare(entries, tmp_path / "cache")
    assert report.added == 4
    assert {(f["id"], f["file"].rsplit("/", 1)[-1]) for f in report.failures} == {("id2", "2.txt"), ("id4", "4.png")}
    assert "2 unreadable (skipped)" in report.summary()
    logged = [json.loads(line) for line in (tmp_path / "cache" / "failures-r00.jsonl").read_text().splitlines()]
    assert {f["id"] for f in logged} == {"id2", "id4"}
    (tmp_path / "2.txt").write_text("2")  # fixed files are picked up on the next run
    assert _prepare(entries, tmp_path / "cache").added == 1  # 4.png is still broken


def test_processes_split_the_work_and_write_their_own_shards(tmp_path):
    entries = _examples(tmp_path, 8)
    for rank in (0, 1):
        _prepare(entries, tmp_path / "cache", rank=rank, world_size=2)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.ids() == {e.id for e in entries}
    assert {p.name[:9] for p in cache.shards()} == {"shard-r00", "shard-r01"}


def test_a_cache_refuses_features_of_other_encoders(tmp_path):
    _prepare(_examples(tmp_path, 2), tmp_path / "cache")
    other = CacheSpec("another-clap", SPEC.sd15, SPEC.resolution, SPEC.clap_mode)
    with pytest.raises(FeatureCacheError, match="another-clap"):
        prepare_features([], tmp_path / "cache", other, _FakeAudio(), _fake_text, _fake_images, progress=False)


def test_dataset_numbers_distinct_captions_per_split(tmp_path):
    write_fake_cache(tmp_path, kinds=3, per_kind=2)
    dataset = FeatureDataset(tmp_path, "train", ("clap",))
    assert len(dataset) == 6 and len(dataset.captions) == 3
    assert dataset.caption_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(dataset[0]) == {"clap", "caption_index"}
    assert dataset.stacked("latents").shape == (6, 4, 8, 8)
    with pytest.raises(FeatureCacheError, match="no 'val' examples"):
        FeatureDataset(tmp_path, "val")
