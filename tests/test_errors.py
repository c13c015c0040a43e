"""Every error the pack raises on purpose shares one base class, and each names a fitting cause."""

import comfy_pack
import pytest
import torch

from clap2diffusion_core import audio, checkpoint, clap, errors, laion_convert, vocabulary
from clap2diffusion_core.training import features, manifest

#: Where each error was defined before errors.py: importing it from there must still work.
HISTORICAL_HOMES = [
    (audio, "AudioError"), (clap, "ClapError"), (checkpoint, "CheckpointError"),
    (laion_convert, "LaionConversionError"), (vocabulary, "VocabularyError"),
    (features, "FeatureCacheError"), (manifest, "ManifestError"),
]  # fmt: skip


@pytest.mark.parametrize(("module", "name"), HISTORICAL_HOMES, ids=[n for _, n in HISTORICAL_HOMES])
def test_each_error_is_the_one_class_of_errors_py_under_the_common_base(module, name):
    assert getattr(module, name) is getattr(errors, name)
    assert issubclass(getattr(errors, name), errors.Clap2DiffusionError)


def test_a_model_that_is_not_a_unet_is_a_model_mismatch_not_a_bad_checkpoint():
    patch = comfy_pack.load("nodes.model_patch")
    pack_errors = comfy_pack.load("clap2diffusion_core.errors")
    with pytest.raises(pack_errors.ModelMismatchError, match="needs an SD1.5- or SDXL-family UNet; this MODEL is Identity") as err:
        patch.unet_layout(torch.nn.Identity(), {})
    assert not isinstance(err.value, pack_errors.CheckpointError)
