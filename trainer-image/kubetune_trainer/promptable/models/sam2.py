"""SAM2 (Meta's `sam2` package) as a trainable promptable segmenter.

The forward pass is SAM2ImagePredictor's, batched over images and objects and without the
inference-only post-processing: image encoder -> high-res feature convs -> prompt encoder ->
mask decoder. Weights are read and written in Meta's checkpoint format ({"model": state_dict}),
so `sam2.build_sam.build_sam2(config, ckpt_path=...)` loads what kubetune saves.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kubetune_trainer.config import SAM2_VARIANTS, ModelSpec
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promptable.data import Batch, Preprocess
from kubetune_trainer.promptable.models.base import Predictions, PromptableModule, set_trainable

log = structlog.get_logger(__name__)


class Sam2Module(PromptableModule):
    """Wraps SAM2Base."""

    encoder_name = "image_encoder"

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone FPN levels [S/4, S/8, S/16] before SAM2's own high-res convs."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            return list(self.sam.image_encoder(images)["backbone_fpn"])

    def forward(self, batch: Batch, multimask: bool = True) -> Predictions:
        sam = self.sam
        fpn = self.encode(batch)
        if sam.use_high_res_features_in_sam:
            fpn[0] = sam.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = sam.sam_mask_decoder.conv_s1(fpn[1])
        image_embed = fpn[-1]
        if sam.directly_add_no_mem_embed:
            image_embed = image_embed + sam.no_mem_embed.view(1, -1, 1, 1)
        idx = batch.image_index
        sparse, dense = sam.sam_prompt_encoder(points=(batch.coords, batch.labels), boxes=None, masks=None)
        masks, iou, _, object_logits = sam.sam_mask_decoder(
            image_embeddings=image_embed[idx],
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[f[idx] for f in fpn[:-1]],
        )
        return Predictions(masks, iou, object_logits if sam.pred_obj_scores else None)


class Sam2Segmenter:
    family = "sam2"
    weights_are_folder = False
    native_name = "model.pt"  # what save_native writes into final/

    def build(self, spec: ModelSpec, weights: Path | None) -> nn.Module:
        from sam2.build_sam import build_sam2

        config = SAM2_VARIANTS[spec.variant]
        sam = build_sam2(
            config,
            ckpt_path=None,
            device="cpu",
            mode="train",
            apply_postprocessing=False,
            hydra_overrides_extra=[f"++model.image_size={spec.image_size}"],
        )
        if weights is None:
            log.warning(
                "NO BASE WEIGHTS: model.checkpoint is not set, so SAM2 starts from RANDOM weights. "
                "This is not fine-tuning; set model.checkpoint to Meta's checkpoint for this variant.",
                variant=spec.variant,
            )
        else:
            load_weights(sam, weights, spec.variant)
        parts = {
            "mask_decoder": [sam.sam_mask_decoder],
            # Mask prompts are not used in training, so mask_downscaling would get no gradient
            # (and DDP would wait for it forever).
            "prompt_encoder": [m for n, m in sam.sam_prompt_encoder.named_children() if n != "mask_downscaling"],
            "image_encoder": [sam.image_encoder],
        }
        return Sam2Module(sam, set_trainable(sam, parts, spec), self.preprocess(spec, weights))

    def preprocess(self, spec: ModelSpec, weights: Path | None) -> Preprocess:
        """SAM2ImagePredictor's steps: a square resize, ImageNet mean and std."""
        return Preprocess(spec.image_size, spec.resize or "stretch")

    def optional_parts(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        decoder = model.sam.sam_mask_decoder
        parts = {"iou": list(decoder.iou_prediction_head.parameters())}
        if model.sam.pred_obj_scores:
            parts["object"] = list(decoder.pred_obj_score_head.parameters())
        return parts

    def checkpoint_encoder(self, model: nn.Module) -> None:
        """Each Hiera block recomputed in backward; its forward is wrapped in place, so the
        state dict keeps Meta's key names."""
        for block in model.sam.image_encoder.trunk.blocks:
            block.forward = _recomputed(block.forward)

    def save_native(self, model: nn.Module, folder: Path) -> None:
        """Meta's {"model": state_dict}, which `build_sam2(config, ckpt_path=...)` loads."""
        torch.save({"model": model.sam.state_dict()}, folder / self.native_name)


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def load_weights(sam: nn.Module, path: Path, variant: str) -> None:
    """Load Meta's {"model": state_dict} with weights_only=True; mismatches name the keys."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: the file is not a torch checkpoint
        raise ConfigError(f"model.checkpoint {path.name} is not a readable torch checkpoint: {exc}") from exc
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint {path.name} is not in SAM2's format (a dict with a 'model' state_dict)")
    result = sam.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"model.checkpoint {path.name} does not fit variant {variant}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded base weights", checkpoint=path.name, variant=variant)
