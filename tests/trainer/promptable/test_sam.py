"""SAM (v1) through transformers: preprocessing, prompts, losses, freezing, weights in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune.synthetic import write_coco_dataset
from kubetune_trainer.config import ModelSpec, PromptSpec, TrainConfig
from kubetune_trainer.datasets.masks import PolygonMasks
from kubetune_trainer.datasets.readers import Sample
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promptable.data import Batch, Preprocess, PromptedMasks, collate, resize_targets
from kubetune_trainer.promptable.losses import LOSS_HEADS, compute_loss, dice_loss, kept_logits, mask_iou
from kubetune_trainer.promptable.models.base import Predictions
from kubetune_trainer.promptable.models.sam import SamSegmenter, split_prompts
from kubetune_trainer.promptable.recipe import freeze_unused
from PIL import Image, ImageFilter
from torchvision.ops import sigmoid_focal_loss

from tests.factories import train_config, usable
from tests.helpers import ROOT, write_tiny_sam

SPEC = ModelSpec(family="sam", variant="vit-base", imageSize=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sam") / "base"
    write_tiny_sam(folder)
    return folder


def sam_config(**training) -> TrainConfig:
    """The spec's own training defaults (no lr, bf16, batch 4), so the family's defaults show."""
    spec_defaults = {"maxSteps": 1, "batchSize": 4, "precision": "bf16", "optimizer": None}
    return train_config(family="sam", defaults=False, **{**spec_defaults, **training})


def test_sam_defaults_follow_the_transformers_tutorial() -> None:
    config = sam_config().with_defaults()
    t = config.training
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.weight_decay) == ("adam", 1e-5, 0.0)
    assert (t.loss, t.schedule.type, t.grad_clip, t.early_stopping) == ("dicece", "constant", None, None)
    assert config.model.trainable == ["mask_decoder"] and config.model.resize == "longest-side"


def test_otx_preset_turns_early_stopping_on_unless_disabled() -> None:
    on = sam_config(loss="otx").with_defaults().training.early_stopping
    assert (on.metric, on.patience) == ("f1", 10)
    mine = sam_config(loss="otx", evalEvery=5, earlyStopping={"patience": 3}).with_defaults().training
    assert (mine.early_stopping.metric, mine.early_stopping.patience) == ("f1", 3)
    off = sam_config(loss="otx", evalEvery=5, earlyStopping={"enabled": False}).with_defaults()
    assert off.training.early_stopping is None


def test_preprocessing_matches_sam_image_processor(tmp_path: Path) -> None:
    """Longest side to 64, normalise, zero-pad bottom/right: the same tensor SamProcessor makes."""
    from transformers import SamImageProcessor

    rng = np.random.default_rng(0)
    pixels = (rng.random((90, 150, 3)) * 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.BLUR))  # smooth, so resizers agree
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    sample = Sample(path, PolygonMasks(([[30, 20, 120, 20, 120, 70, 30, 70]],)))
    pre = Preprocess(64, "longest-side")
    item = PromptedMasks([sample], pre, PromptSpec(perturbation=0), seed=0, train=False)[(-1, 0)]
    batch = collate([item])
    assert batch.images.dtype == torch.uint8  # the loader moves bytes; the model normalises
    ours = pre.model_input(batch.images, batch.extents)[0]
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    theirs = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    assert pre.shape(90, 150) == (38, 64) == tuple(processor(images=Image.fromarray(pixels))["reshaped_input_sizes"][0])
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert torch.equal(ours[:, 38:], torch.zeros(3, 26, 64)) and torch.equal(theirs[:, 38:], ours[:, 38:])
    assert (ours - theirs).abs().mean() < 0.02  # the same resize up to rounding
    assert not item["masks"][:, 38:].any() and item["masks"].shape == (1, 64, 64)
    # The box prompt lies inside the resized image (coordinates of the model input, as SamProcessor scales them).
    box = item["coords"].view(-1)
    assert torch.allclose(box, torch.tensor([30, 20, 120, 70]) * 64 / 150, atol=1)


def test_prompts_reach_samodel_as_its_own_processor_lays_them_out(base: Path) -> None:
    """One batched forward over objects equals SamModel called per image the documented way."""
    from transformers import SamModel

    module = SamSegmenter().build(SPEC.model_copy(update={"checkpoint": f"file://{base}"}), base).eval()
    reference = SamModel.from_pretrained(base).eval()
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    images = module.pre.model_input(raw, None)  # what SamProcessor would hand SamModel
    coords = torch.tensor([[[4.0, 6.0], [30.0, 40.0], [10.0, 20.0]], [[20.0, 8.0], [60.0, 50.0], [40.0, 30.0]]])
    labels = torch.tensor([[2, 3, 1], [2, 3, 1]])
    batch = Batch(raw, torch.zeros(2, 64, 64, dtype=torch.bool), coords, labels, torch.tensor([1, 0]))
    with torch.no_grad():
        ours = module(batch, multimask=True)
        for row, image in enumerate((1, 0)):
            out = reference(
                pixel_values=images[image : image + 1],
                input_boxes=coords[row, :2].reshape(1, 1, 4),
                input_points=coords[row, 2:].reshape(1, 1, 1, 2),
                input_labels=labels[row, 2:].reshape(1, 1, 1),
            )
            assert torch.allclose(ours.mask_logits[row], out.pred_masks[0, 0], atol=1e-5)
            assert torch.allclose(ours.iou_pred[row], out.iou_scores[0, 0], atol=1e-6)
    points, point_labels, boxes = split_prompts(coords[:, :2], labels[:, :2])
    assert points is None and point_labels is None and boxes.shape == (2, 1, 4)


def test_weights_checks_name_the_problem(base: Path, tmp_path: Path) -> None:
    seg = SamSegmenter()
    with pytest.raises(ConfigError, match="has no config.json"):
        seg.build(SPEC, tmp_path)
    config = json.loads((base / "config.json").read_text())
    for change, message in (
        ({"model_type": "sam_hq"}, "holds a 'sam_hq' model"),
        ({"vision_config": {**config["vision_config"], "hidden_size": 1024}}, "is a SAM vit-large"),
        ({"vision_config": {**config["vision_config"], "image_size": 128}}, "vision_config.image_size is 128"),
    ):
        folder = tmp_path / message.split()[-1].strip("'")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=message):
            seg.build(SPEC, folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((base / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="could not be loaded as a SamModel"):
        seg.build(SPEC, broken)


def test_default_trainable_part_is_the_mask_decoder(base: Path) -> None:
    module = SamSegmenter().build(SPEC, base)
    trainable = {n.split(".")[1] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    both = SamSegmenter().build(SPEC.model_copy(update={"trainable": ["mask_decoder", "prompt_encoder"]}), base)
    assert not any(p.requires_grad for p in both.sam.prompt_encoder.mask_embed.parameters())
    assert all(p.requires_grad for p in both.sam.prompt_encoder.point_embed.parameters())


def test_unused_heads_and_prompt_embeddings_are_frozen(base: Path, tmp_path: Path) -> None:
    seg = SamSegmenter()
    config = sam_config(loss="dicece").with_defaults()
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"trainable": ["mask_decoder", "prompt_encoder"]})}
    )
    module = seg.build(config.model, base)
    assert sorted(freeze_unused(seg, module, config)) == ["iou", "points"]  # dicece; box prompts
    assert not any(p.requires_grad for p in module.sam.mask_decoder.iou_prediction_head.parameters())
    assert module.sam.prompt_encoder.point_embed[2].weight.requires_grad
    # Every parameter left trainable gets a gradient, which DDP needs.
    root = write_coco_dataset(tmp_path, train=2, val=1, size=80, seed=1)
    samples = usable("coco", root, "train/annotations.json")
    ds = PromptedMasks(samples, Preprocess(64, "longest-side"), PromptSpec(), seed=0, train=True)
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    compute_loss(module(batch), batch.masks, "dicece").total.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_save_native_loads_in_transformers(base: Path, tmp_path: Path) -> None:
    from transformers import SamModel, SamProcessor

    module = SamSegmenter().build(SPEC, base)
    with torch.no_grad():
        module.sam.mask_decoder.iou_token.weight.add_(1.0)
    module.pre = Preprocess(64, "longest-side", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # written with the weights
    SamSegmenter().save_native(module, tmp_path)
    name = SamSegmenter.native_name
    loaded = SamModel.from_pretrained(tmp_path / name)
    assert torch.equal(loaded.mask_decoder.iou_token.weight, module.sam.mask_decoder.iou_token.weight)
    processor = SamProcessor.from_pretrained(tmp_path / name).image_processor
    assert list(processor.image_mean) == [0.5] * 3 and processor.pad_size["height"] == 64
    # ... and a folder written that way is base weights again, with its own mean and std.
    assert SamSegmenter().preprocess(SPEC, tmp_path / name).mean == (0.5, 0.5, 0.5)


def _preds(logits: torch.Tensor, iou: torch.Tensor) -> Predictions:
    return Predictions(logits, iou, None)


def test_multimask_reduction() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6] = True
    good = torch.where(target[0], 5.0, -5.0)
    logits = torch.stack([-good, good, torch.zeros(8, 8)])[None]  # candidate 1 fits
    iou = torch.tensor([[0.9, 0.1, 0.5]])  # but the model believes in candidate 0
    preds = _preds(logits, iou)
    assert torch.equal(kept_logits(preds, "best"), logits[:, 0]) and torch.equal(
        kept_logits(preds, "min-loss"), logits[:, 0]
    )
    assert torch.allclose(kept_logits(preds, "mean"), logits.mean(1))
    trained = {r: compute_loss(preds, target, "otx", r).parts["loss_dice"].item() for r in ("min-loss", "best")}
    assert trained["min-loss"] < 0.05 < 0.9 < trained["best"]  # min-loss trains candidate 1, best candidate 0


def test_otx_and_dicece_presets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16)
    iou = torch.rand(3, 1)
    masks = torch.rand(3, 16, 16) > 0.6
    otx = compute_loss(_preds(logits, iou), masks, "otx")
    t = resize_targets(masks, (16, 16)).float()
    focal = sigmoid_focal_loss(logits[:, 0], t, alpha=0.25, gamma=2.0, reduction="none").mean((1, 2)).mean()
    expected = 20 * focal + dice_loss(logits[:, 0], t).mean() + ((iou[:, 0] - mask_iou(logits[:, 0], t)) ** 2).mean()
    assert torch.allclose(otx.total, expected) and set(otx.parts) == {"loss_focal", "loss_dice", "loss_iou"}
    dicece = compute_loss(_preds(logits, iou), masks, "dicece").total
    p = logits[:, 0].sigmoid()
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1e-5) / ((p * p).sum((1, 2)) + (t * t).sum((1, 2)) + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], t)
    assert torch.allclose(dicece, dice.mean() + bce, atol=1e-6)  # squared prediction in the denominator
    assert LOSS_HEADS["dicece"] == frozenset() and "iou" in LOSS_HEADS["otx"]


def test_sam_example_is_a_valid_finetunejob() -> None:
    import yaml
    from kubetune_operator.specs import FineTuneJob

    example = ROOT / "examples" / "finetunejob-sam.yaml"
    job = FineTuneJob.model_validate(yaml.safe_load(example.read_text()))
    config = job.train_config(default_namespace="default").with_defaults()
    assert config.model.family == "sam" and config.data.format == "datumaro"
    assert (config.training.early_stopping.metric, config.training.early_stopping.patience) == ("f1", 10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"family": "sam", "variant": "vit-b"}}, "is not a SAM variant"),
        ({"model": {"family": "sam", "variant": "vit-base", "trainable": []}}, "must name at least one part"),
        ({"training": {"maxSteps": 1, "loss": "focal"}}, "training.loss"),
        ({"data": {"source": "file:///d/", "format": "datumaro-json", "train": "t"}}, "data.format"),
    ],
)
def test_bad_sam_specs_name_the_field(change: dict, message: str) -> None:
    from pydantic import ValidationError

    spec = {
        "model": {"family": "sam", "variant": "vit-base"},
        "data": {"source": "file:///d/", "format": "coco", "train": "t.json"},
        "training": {"maxSteps": 1},
        "output": {"uri": "file:///o/"},
        **change,
    }
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(spec)
