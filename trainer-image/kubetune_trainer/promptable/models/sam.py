"""SAM (v1) through Hugging Face transformers' `SamModel`, as a trainable promptable segmenter.

Base weights are a transformers model folder (config.json + model.safetensors, as
`save_pretrained` writes and the hub serves for facebook/sam-vit-*, MedSAM and the like). The
image encoder runs once per image; its embedding is indexed per prompted object and handed to
`SamModel.forward(image_embeddings=...)`, so every object of a batch is decoded in one call. The
result is saved with `save_pretrained`, so `SamModel.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError
from torch import nn

from kubetune_trainer.config import SAM_VISION, ModelSpec
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promptable.data import IMAGENET_MEAN, IMAGENET_STD, Batch, Preprocess
from kubetune_trainer.promptable.models.base import Predictions, PromptableModule, set_trainable

log = structlog.get_logger(__name__)
FINAL_FOLDER = "model"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub folders; save_pretrained


class SamModule(PromptableModule):
    """Wraps transformers' SamModel."""

    encoder_name = "vision_encoder"

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[the image embedding [B,256,S/16,S/16]]."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            return [self.sam.vision_encoder(images).last_hidden_state]

    def mask_side(self, image_size: int) -> int:
        """Four times the embedding's side, which the checkpoint's patch size sets."""
        return image_size // self.sam.config.vision_config.patch_size * 4

    def forward(self, batch: Batch, multimask: bool = True) -> Predictions:
        embeddings = self.encode(batch)[0]
        points, labels, boxes = split_prompts(batch.coords, batch.labels)
        out = self.sam(
            image_embeddings=embeddings[batch.image_index],  # one "image" per prompted object
            input_points=points,
            input_labels=labels,
            input_boxes=boxes,
            multimask_output=multimask,
        )
        return Predictions(out.pred_masks[:, 0], out.iou_scores[:, 0], None)


def split_prompts(
    coords: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """kubetune's [N,P,2] prompts (labels 2/3 = box corners) in SamModel's layout: points
    [N,1,p,2] with labels [N,1,p], boxes [N,1,4]. Every row has the same layout (see prompts)."""
    corner = labels[0] >= 2
    boxes = coords[:, corner].reshape(len(coords), 1, 4) if corner.any() else None
    if corner.all():
        return None, None, boxes
    return coords[:, ~corner][:, None], labels[:, ~corner][:, None].int(), boxes


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model.checkpoint for family sam must be a transformers model folder with config.json and "
            f"model.safetensors; {folder} has no config.json"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.checkpoint {path} is not valid JSON: {exc}") from exc


def check_config(config: dict, spec: ModelSpec) -> None:
    """The folder must hold a SamModel of the variant and input size the spec names."""
    model_type = config.get("model_type")
    if model_type != "sam":
        raise ConfigError(
            f"model.checkpoint holds a {model_type!r} model; family sam reads transformers SamModel "
            "folders (model_type 'sam', e.g. facebook/sam-vit-base or MedSAM)"
        )
    vision = config.get("vision_config", {})
    hidden = vision.get("hidden_size", 768)
    named = next((v for v, dims in SAM_VISION.items() if dims[0] == hidden), None)
    if named is not None and named != spec.variant:
        raise ConfigError(f"model.checkpoint is a SAM {named} (vision hidden_size {hidden}), not {spec.variant}")
    if named is None:
        log.info("custom SAM architecture", vision_hidden_size=hidden, variant=spec.variant)
    size = vision.get("image_size", 1024)
    if size != spec.image_size:
        raise ConfigError(
            f"model.imageSize is {spec.image_size} but the checkpoint's vision_config.image_size is {size}; "
            "SAM's position embeddings are fixed to it, so set model.imageSize to match"
        )


def config_for(spec: ModelSpec):
    """A SamConfig of the named size at the spec's input size (random init, no checkpoint)."""
    from transformers import SamConfig, SamPromptEncoderConfig, SamVisionConfig

    hidden, layers, heads, global_attn = SAM_VISION[spec.variant]
    vision = SamVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        global_attn_indexes=list(global_attn),
        image_size=spec.image_size,
    )
    prompt = SamPromptEncoderConfig(image_size=spec.image_size)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict())


@torch.no_grad()
def reset_positional_encoding(sam: nn.Module) -> None:
    """Random Fourier features with unit scale, as SAM's own PositionEmbeddingRandom draws them.

    transformers draws them with scale hidden_size / 2, so far too high frequencies for a model
    that starts from random weights: a box corner's encoding then says nothing about the image
    positions near it. Checkpoints carry their own (shared by image and prompt encoders).
    """
    table = sam.shared_image_embedding.positional_embedding
    table.copy_(torch.randn_like(table))


class SamSegmenter:
    family = "sam"
    weights_are_folder = True
    native_name = FINAL_FOLDER + "/"  # what save_native writes into final/

    def build(self, spec: ModelSpec, weights: Path | None) -> nn.Module:
        from transformers import SamModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # structured logs only, no tqdm bars in pod logs

        if weights is None:
            log.warning(
                "NO BASE WEIGHTS: model.checkpoint is not set, so SAM starts from RANDOM weights. "
                "This is not fine-tuning; set model.checkpoint to a transformers SAM folder.",
                variant=spec.variant,
            )
            sam = SamModel(config_for(spec))
            reset_positional_encoding(sam)
        else:
            check_config(read_config(weights), spec)
            if not any(weights.glob("*.safetensors")):
                raise ConfigError(f"model.checkpoint folder {weights} has no .safetensors weights")
            try:
                sam, info = SamModel.from_pretrained(
                    weights, local_files_only=True, use_safetensors=True, output_loading_info=True
                )
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                raise ConfigError(f"model.checkpoint {weights} could not be loaded as a SamModel: {exc}") from exc
            wrong = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
            if wrong:
                raise ConfigError(f"model.checkpoint {weights} does not fit its config.json: {wrong}")
            log.info("loaded base weights", checkpoint=str(weights), variant=spec.variant)
        sam.float()
        parts = {
            "mask_decoder": [sam.mask_decoder],
            # Mask prompts are not used in training, so mask_embed would get no gradient.
            "prompt_encoder": [m for n, m in sam.prompt_encoder.named_children() if n != "mask_embed"],
            "image_encoder": [sam.vision_encoder],
        }
        return SamModule(sam, set_trainable(sam, parts, spec), self.preprocess(spec, weights))

    def preprocess(self, spec: ModelSpec, weights: Path | None) -> Preprocess:
        """SamProcessor's steps; mean and std from the folder's preprocessor_config.json if any."""
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if weights is not None and any((weights / f).is_file() for f in PROCESSOR_FILES):
            from transformers import SamImageProcessor

            processor = SamImageProcessor.from_pretrained(weights, local_files_only=True)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        return Preprocess(spec.image_size, spec.resize or "longest-side", mean, std)

    def optional_parts(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters only some losses (iou) or prompt kinds (points, box) reach."""
        sam = model.sam
        embed = sam.prompt_encoder.point_embed
        return {
            "iou": list(sam.mask_decoder.iou_prediction_head.parameters()),
            "points": [
                *embed[0].parameters(),
                *embed[1].parameters(),
                *sam.prompt_encoder.not_a_point_embed.parameters(),
            ],
            "box": [*embed[2].parameters(), *embed[3].parameters()],
        }

    def checkpoint_encoder(self, model: nn.Module) -> None:
        """transformers' own gradient checkpointing of the vision layers."""
        model.sam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def save_native(self, model: nn.Module, folder: Path) -> None:
        """`SamModel.from_pretrained(folder/model)` and `SamProcessor.from_pretrained` both work."""
        from transformers import SamImageProcessor, SamProcessor

        target = folder / FINAL_FOLDER
        model.sam.save_pretrained(target)
        pre = model.pre
        size = pre.size
        image_processor = SamImageProcessor(
            size={"longest_edge": size},
            pad_size={"height": size, "width": size},
            mask_size={"longest_edge": size // 4},
            mask_pad_size={"height": size // 4, "width": size // 4},
            image_mean=list(pre.mean),
            image_std=list(pre.std),
        )
        SamProcessor(image_processor=image_processor).save_pretrained(target)
