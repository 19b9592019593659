"""Base weights in Meta's format: loaded with weights_only, mismatches refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kubetune_trainer.config import ModelSpec
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter

SPEC = ModelSpec(family="sam2", variant="sam2.1_hiera_tiny", imageSize=64)


def test_meta_checkpoint_loads_and_trainable_parts_follow_the_spec(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = Sam2Segmenter().build(SPEC, None)
    Sam2Segmenter().save_native(source, tmp_path)
    path = tmp_path / Sam2Segmenter.native_name
    torch.manual_seed(0)
    loaded = Sam2Segmenter().build(SPEC, path)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    trainable = {n.split(".")[1] for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"sam_mask_decoder", "sam_prompt_encoder"}
    assert not any(p.requires_grad for p in loaded.sam.sam_prompt_encoder.mask_downscaling.parameters())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"definitely not a checkpoint", "not a readable torch checkpoint"),
        ({"state_dict": {}}, "not in SAM2's format"),
        ({"model": {"image_encoder.extra.weight": torch.zeros(1)}}, "does not fit variant sam2.1_hiera_tiny"),
    ],
)
def test_bad_checkpoints_are_config_errors(tmp_path: Path, payload, message: str) -> None:
    path = tmp_path / "bad.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(ConfigError, match=message):
        Sam2Segmenter().build(SPEC, path)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"w": Payload()}}, path)
    with pytest.raises(ConfigError, match="sam2.1_hiera_tiny.pt"):
        Sam2Segmenter().build(SPEC, path)
    assert not marker.exists()
