"""The training parameters: one pydantic model, shared by the operator, the CLI and the trainer.

This module must stay torch-free: the operator image imports it to validate FineTuneJob specs and
to write the exact JSON the trainer reads back with the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune_trainer.config.detectron2_keys import check_overrides, check_variant

SAM2_VARIANTS: dict[str, str] = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
}
# transformers' SamVisionConfig for each SAM (v1) size: hidden size, layers, heads, global-attention blocks.
SAM_VISION: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit-base": (768, 12, 12, (2, 5, 8, 11)),
    "vit-large": (1024, 24, 16, (5, 11, 17, 23)),
    "vit-huge": (1280, 32, 16, (7, 15, 23, 31)),
}
SAM_VARIANTS = tuple(SAM_VISION)
URI_SCHEMES = ("s3://", "file://")
WEIGHTS_SCHEMES = (*URI_SCHEMES, "hf://", "https://", "http://", "detectron2://")
DETECTRON2_FORMATS = ("coco", "via", "voc", "voc-semantic", "datumaro")
DETECTRON2_METRICS = ("bbox_ap", "segm_ap")


@dataclass(frozen=True)
class FamilyDefaults:
    """What an unset (null) training field means for a model family."""

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    grad_clip: float
    metric: str
    loss: str
    trainable: tuple[str, ...]
    resize: str


# SAM2: the recipe of SAM2's own training configs, scaled down to fine-tuning.
SAM2_DEFAULTS = FamilyDefaults(
    "adamw", 1.0e-5, 4.0e-5, "cosine", 0, 1.0, "miou", "sam2", ("mask_decoder", "prompt_encoder"), "stretch"
)
# SAM (transformers): the transformers fine-tuning tutorial (Adam 1e-5, DiceCE, mask decoder
# only) with SamProcessor's longest-side resize.
SAM_DEFAULTS = FamilyDefaults(
    "adam", 1.0e-5, 0.0, "constant", 0, 0.0, "miou", "dicece", ("mask_decoder",), "longest-side"
)
# Detectron2 takes its defaults from the model-zoo config instead.
FAMILY_DEFAULTS = {"sam2": SAM2_DEFAULTS, "sam": SAM_DEFAULTS}
# The OTX visual-prompting recipe turns early stopping on unless the spec says otherwise.
OTX_EARLY_STOPPING = {"metric": "f1", "patience": 10}


class Section(BaseModel):
    """Base of every section: camelCase in YAML/JSON, snake_case in Python, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


def _check_uri(value: str | None, what: str) -> str | None:
    if value is not None and not value.startswith(URI_SCHEMES):
        raise ValueError(f"{what} must start with s3:// or file://, got {value!r}")
    return value


Trainable = Literal["mask_decoder", "prompt_encoder", "image_encoder"]


# model.overrides is free form: bounded in the CRD (keys) and here (nesting).
OVERRIDES_MAX_KEYS = 256
OVERRIDES_MAX_DEPTH = 3


def nesting(value: Any) -> int:
    """How deep lists and mappings nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class ModelSpec(Section):
    family: Literal["sam2", "sam", "detectron2"]
    """Model family: sam2, sam (HF transformers) or detectron2."""
    variant: str
    """sam2.1_hiera_{tiny,small,base_plus,large} (or sam2_hiera_*); sam: vit-{base,large,huge};
    detectron2: a model-zoo config path."""
    checkpoint: str | None = None
    """Base weights in the family's native format (SAM2 and Detectron2 a checkpoint file; sam a
    transformers model folder: config.json + model.safetensors), from s3://, file://,
    hf://<org>/<repo>[@<revision>][/<file>] (the Hugging Face Hub), https:// or http://, or
    detectron2://<model-zoo path>. Omitted: Detectron2 starts from the model zoo's trained weights
    for the variant; SAM and SAM2 from random weights. none: random weights for every family."""
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """The checkpoint file's SHA-256 (hex): checked after download; a mismatch is fatal."""
    hf_token_secret: str | None = None
    """Secret (key HF_TOKEN) holding a Hugging Face token for gated or private repos; the operator
    mounts it as HF_TOKEN, never into the ConfigMap, the status or the logs."""
    trainable: list[Trainable] | None = None
    """Parts of the model that receive gradients; the rest stay frozen (null: mask_decoder and
    prompt_encoder for SAM2, mask_decoder for SAM)."""
    image_size: int = Field(1024, ge=64, le=4096)
    """Side of the square model input in pixels (SAM2: a multiple of 32; SAM: the checkpoint's
    vision_config.image_size)."""
    resize: Literal["stretch", "longest-side"] | None = None
    """stretch: resize to imageSize × imageSize; longest-side: scale the longest side to imageSize
    and pad the rest with zeros (SamProcessor, OTX). Null: stretch for SAM2, longest-side for SAM."""
    multimask: bool = True
    """Predict three masks per prompt instead of one."""
    gradient_checkpointing: bool = False
    """Recompute the image encoder's activations in the backward pass instead of keeping them:
    much less memory when the encoder trains (large variants), about a third more compute."""
    feature_cache: Literal["off", "memory", "disk"] = "off"
    """Compute a frozen image encoder's features once per image (and flip) and reuse them every
    epoch: memory keeps them on the device, disk in the node-local cache folder (kept across
    restarts, shared by the node's ranks). Each rank then keeps the same images every epoch, and
    cached images are not decoded again. An entry is large: 42 MiB for SAM2 at 1024 px in bf16."""
    multimask_reduction: Literal["min-loss", "best", "mean"] = "min-loss"
    """Which of the three masks is trained and evaluated: min-loss trains the one closest to the
    target (SAM's own rule) and evaluates the one with the highest predicted IoU; best uses the
    highest predicted IoU for both; mean averages the three masks' logits."""
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        max_length=OVERRIDES_MAX_KEYS,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    """Detectron2 config keys as in its docs (e.g. SOLVER.BASE_LR, MODEL.ROI_HEADS.NUM_CLASSES),
    applied last; only for family detectron2."""

    def trainable_parts(self) -> tuple[str, ...]:
        """`trainable`, or this family's default parts when it is null."""
        return tuple(self.trainable) if self.trainable is not None else FAMILY_DEFAULTS[self.family].trainable

    @field_validator("overrides")
    @classmethod
    def _bounded_nesting(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Detectron2 values nest at most as lists of lists (ANCHOR_GENERATOR.SIZES); a deeper
        value is refused before anything walks it recursively."""
        for key, value in overrides.items():
            if (depth := nesting(value)) > OVERRIDES_MAX_DEPTH:
                raise ValueError(
                    f"model.overrides[{key!r}] nests {depth} levels deep; Detectron2 values nest at most "
                    f"{OVERRIDES_MAX_DEPTH} (a list of lists)"
                )
        return overrides

    @model_validator(mode="after")
    def _check_family(self) -> ModelSpec:
        named = self.checkpoint not in (None, "none")
        if named and not str(self.checkpoint).startswith(WEIGHTS_SCHEMES):
            raise ValueError(
                f"model.checkpoint must start with {', '.join(WEIGHTS_SCHEMES)} (or be none), got {self.checkpoint!r}"
            )
        if self.family == "detectron2":
            check_variant(self.variant)
            check_overrides(self.overrides)
        if self.family == "sam2":
            if self.variant not in SAM2_VARIANTS:
                raise ValueError(
                    f"model.variant {self.variant!r} is not a SAM2 variant; choose one of {', '.join(SAM2_VARIANTS)}"
                )
            if self.image_size % 32:
                raise ValueError(f"model.imageSize must be a multiple of 32 for SAM2, got {self.image_size}")
        if self.family == "sam" and self.variant not in SAM_VARIANTS:
            raise ValueError(f"model.variant {self.variant!r} is not a SAM variant; choose one of {SAM_VARIANTS}")
        if self.overrides and self.family != "detectron2":
            raise ValueError("model.overrides applies to family detectron2 only")
        if self.trainable is not None and not self.trainable:
            raise ValueError("model.trainable must name at least one part")
        if self.gradient_checkpointing and (
            self.family == "detectron2" or "image_encoder" not in self.trainable_parts()
        ):
            raise ValueError("model.gradientCheckpointing needs image_encoder in model.trainable (sam and sam2)")
        if self.feature_cache != "off":
            if self.family == "detectron2":
                raise ValueError("model.featureCache applies to sam and sam2, not detectron2")
            if "image_encoder" in self.trainable_parts():
                raise ValueError(
                    "model.featureCache needs a frozen image encoder (image_encoder is in model.trainable)"
                )
        return self


class PromptSpec(Section):
    type: Literal["box", "points", "box+points"] = "box"
    """Prompt kind generated from each ground-truth mask."""
    perturbation: int = Field(10, ge=0)
    """Each box corner moves by up to this many pixels (of the model input) during training."""
    positive_points: int = Field(3, ge=0)
    """Points sampled inside the (eroded) mask, for point prompts."""
    negative_points: int = Field(0, ge=0)
    """Points sampled outside the (dilated) mask, for point prompts."""
    erosion: int = Field(5, ge=0)
    """Erosion radius in pixels, so points do not sit on the object's boundary."""
    max_objects: int = Field(8, ge=1)
    """At most this many objects of one image are prompted per step (chosen at random)."""

    @model_validator(mode="after")
    def _check_points(self) -> PromptSpec:
        if self.type != "box" and self.positive_points + self.negative_points == 0:
            raise ValueError(f"data.prompts.type {self.type!r} needs positivePoints or negativePoints > 0")
        return self


class DataSpec(Section):
    source: str
    """Dataset root: s3://bucket/prefix/ or file:///path/. Staged into a node-local cache."""
    format: Literal["coco", "via", "mask-folder", "labpics", "voc", "voc-semantic", "datumaro", "parquet"]
    """Annotation format. voc reads SegmentationObject (one mask per instance), voc-semantic
    SegmentationClass (one mask per class in each image); parquet: a Hugging Face dataset."""
    train: str
    """Training split, relative to source: an annotation file (coco, via), a folder (mask-folder,
    labpics), an image-set name (voc, voc-semantic), a subset name or annotation file (datumaro:
    annotations/<train>.json) or a Parquet file, folder or glob (parquet: data/train-*.parquet)."""
    validation: str | None = None
    """Validation split, same form as train. Without it, evaluation is skipped."""
    train_images: str | None = None
    """Folder (relative to source) holding the training split's images, for a layout the usual
    places do not cover (next to the annotation file, its images/ and images/<subset>/ folders,
    and the same beside an annotations/ folder: see docs/datasets.md)."""
    validation_images: str | None = None
    """The same for the validation split."""
    crowd: Literal["instances", "skip"] = "instances"
    """COCO/Datumaro crowd annotations (CVAT and Datumaro export every brush mask as one):
    instances trains on them as objects; skip leaves them out, as COCO training often does."""
    exif_orientation: Literal["apply", "ignore"] = "apply"
    """apply: annotations are on the image as its EXIF orientation shows it (what CVAT, Label
    Studio and browsers display); ignore: on the pixels as stored. The same for every family."""
    class_attribute: str | None = None
    """VIA: the region attribute that holds the class (null: one named class, label, category,
    name or type, or the only attribute)."""
    image_column: str = "image"
    """parquet: the column of images (a datasets Image feature, bytes, or a path)."""
    mask_column: str = "label"
    """parquet: the column of mask images (each non-zero value one object)."""
    prompts: PromptSpec = PromptSpec()
    """How prompts are generated from masks."""
    horizontal_flip: bool = True
    """Flip half the training images left-right. With model.featureCache each image is encoded
    once per orientation, so turning this off halves the cache and its first-epoch cost."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""

    @model_validator(mode="after")
    def _check_source(self) -> DataSpec:
        _check_uri(self.source, "data.source")
        for name in ("train", "validation", "train_images", "validation_images"):
            value = getattr(self, name)
            if value is not None and (value.startswith("/") or ".." in value.split("/") or "\x00" in value):
                raise ValueError(f"data.{to_camel(name)} must be a path inside data.source, got {value!r}")
        return self


class OptimizerSpec(Section):
    name: Literal["adamw", "adam", "sgd"] | None = None
    """Optimizer (null: adamw for SAM2, adam for SAM, SGD as in the model-zoo config for Detectron2)."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate (null: 1e-5 for SAM/SAM2, the zoo config's SOLVER.BASE_LR for Detectron2)."""
    weight_decay: float | None = Field(None, ge=0)
    """Decoupled weight decay (AdamW) or L2 (Adam, SGD) (null: 4e-5 for SAM2, 0 for SAM, or the
    zoo's SOLVER.WEIGHT_DECAY)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum."""
    lr_scaling: Literal["none", "linear"] | None = None
    """linear: multiply lr by (batchSize × gradAccumulation × processes) / referenceBatch (null:
    for Detectron2 without lr, linear against the zoo config's SOLVER.IMS_PER_BATCH, since its
    SOLVER.BASE_LR was set for 16 images; otherwise none)."""
    reference_batch: int | None = Field(None, ge=1)
    """Total batch the lr was chosen for (null with Detectron2: the zoo's SOLVER.IMS_PER_BATCH)."""

    def scaled_lr(
        self, lr: float, total_batch: int, reference_batch: int | None = None, default: str = "none"
    ) -> float:
        """The linear-scaling rule (Goyal et al.): lr grows with the total batch. `default` is the
        family's rule when lrScaling is null."""
        if (self.lr_scaling or default) == "none":
            return lr
        return lr * total_batch / (self.reference_batch or reference_batch or total_batch)


class ScheduleSpec(Section):
    type: Literal["cosine", "multistep", "constant"] | None = None
    """LR decay after warmup (null: cosine for SAM/SAM2, the zoo config's scheduler for Detectron2)."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup from warmupFactor·lr to lr over this many steps (null: 0, or the zoo's
    SOLVER.WARMUP_ITERS capped at a tenth of the run)."""
    warmup_factor: float = Field(0.001, gt=0, le=1)
    """Starting fraction of lr for warmup."""
    milestones: list[int] = Field(default_factory=list)
    """Steps at which multistep multiplies the lr by gamma."""
    gamma: float = Field(0.1, gt=0)
    """Multistep decay factor."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine ends at this fraction of lr."""


class EarlyStoppingSpec(Section):
    metric: Literal["miou", "dice", "f1", "loss", "bbox_ap", "segm_ap"] | None = None
    """Validation metric watched (loss: lower is better; others: higher). Null: miou for
    SAM/SAM2 (f1 with the otx loss); segm_ap (masks) or bbox_ap (boxes only) for Detectron2."""
    patience: int = Field(5, ge=1)
    """Evaluations without improvement before training stops."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""
    enabled: bool = True
    """false turns off the early stopping the otx loss preset switches on by default."""


class TrainingSpec(Section):
    epochs: int | None = Field(None, ge=1)
    """Passes over the training split (give this or maxSteps)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run (give this or epochs)."""
    batch_size: int = Field(4, ge=1)
    """Images per GPU (per process) per micro-batch."""
    grad_accumulation: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """bf16 autocast, fp16 autocast with a GradScaler, or full fp32."""
    optimizer: OptimizerSpec = OptimizerSpec()
    """Optimizer settings."""
    schedule: ScheduleSpec = ScheduleSpec()
    """Learning-rate schedule."""
    loss: Literal["sam2", "simple", "dicece", "otx"] | None = None
    """sam2: focal×20 + dice×1 + IoU-L1×1 + object-score BCE×1 (SAM2's recipe);
    simple: BCE + 0.05·|predicted IoU − IoU|; dicece: Dice (squared prediction) + BCE, as MONAI's
    DiceCELoss in the transformers SAM tutorial; otx: focal×20 + dice + IoU-MSE (OpenVINO Training
    Extensions' SAM recipe; turns early stopping on). Null: sam2 for SAM2, dicece for SAM."""
    grad_clip: float | None = Field(None, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off (null: 1.0 for
    SAM/SAM2, the zoo config's SOLVER.CLIP_GRADIENTS for Detectron2)."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the validation split every N steps (and at the start and the end). Null:
    start and end only, or every epoch when early stopping is on by default (otx)."""
    early_stopping: EarlyStoppingSpec | None = None
    """Stop when the validation metric stops improving."""
    seed: int = 0
    """Seed for weights, data order and prompts; a resumed run continues the same sequence."""

    @model_validator(mode="after")
    def _check_length(self) -> TrainingSpec:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("training needs exactly one of epochs or maxSteps")
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("training.earlyStopping needs training.evalEvery")
        return self

    def resolved(self, d: FamilyDefaults) -> TrainingSpec:
        """This spec with every null that means "the family's default" filled in."""
        opt, sched, early = self.optimizer, self.schedule, self.early_stopping

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        update: dict[str, Any] = {
            "optimizer": opt.model_copy(
                update={
                    "name": pick(opt.name, d.optimizer),
                    "lr": pick(opt.lr, d.lr),
                    "weight_decay": pick(opt.weight_decay, d.weight_decay),
                }
            ),
            "schedule": sched.model_copy(
                update={"type": pick(sched.type, d.schedule), "warmup_steps": pick(sched.warmup_steps, d.warmup_steps)}
            ),
            "grad_clip": pick(self.grad_clip, d.grad_clip) or None,
            "loss": pick(self.loss, d.loss),
        }
        if early is None and update["loss"] == "otx":
            early = EarlyStoppingSpec.model_validate(OTX_EARLY_STOPPING)
        if early is not None:
            metric = pick(early.metric, "f1" if update["loss"] == "otx" else d.metric)
            update["early_stopping"] = early.model_copy(update={"metric": metric}) if early.enabled else None
        return self.model_copy(update=update)


class StorageSpec(Section):
    endpoint: str | None = None
    """S3 endpoint URL (MinIO, Ceph...). Omitted: boto3's usual configuration (AWS)."""
    region: str | None = None
    """S3 region."""
    credentials_secret: str | None = None
    """Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (operator side)."""
    mirror: str | None = None
    """s3:// or file:// prefix that stands in for hf://, https:// and detectron2:// weights on a
    cluster without internet access (`kubetune weights mirror` fills it): hf://org/repo@rev/f is
    read from <mirror>hf/org/repo/rev/f, https://host/p from <mirror>https/host/p, detectron2://p
    from <mirror>detectron2/p."""

    @model_validator(mode="after")
    def _check_mirror(self) -> StorageSpec:
        _check_uri(self.mirror, "storage.mirror")
        return self


class OutputSpec(Section):
    uri: str
    """Where checkpoints, the final model and the report go: s3://bucket/prefix/ or file:///path/."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a checkpoint every N steps (always one at the end)."""
    keep_last: int = Field(3, ge=1)
    """Complete checkpoints kept; older ones are deleted."""
    gallery_images: int = Field(8, ge=0, le=64)
    """Validation images drawn before and after fine-tuning into report/ (0: none)."""

    @model_validator(mode="after")
    def _check_uri(self) -> OutputSpec:
        _check_uri(self.uri, "output.uri")
        return self


# Kubernetes object names: they also name the job's folder in the node cache.
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class JobIdentity(Section):
    name: str = Field("local", max_length=253, pattern=K8S_NAME)
    """FineTuneJob name (the `job` label of every metric)."""
    namespace: str = Field("default", max_length=63, pattern=K8S_NAME)
    """FineTuneJob namespace (the `namespace` label of every metric)."""


class TrainParameters(Section):
    """The sections of a FineTuneJob spec that the trainer consumes."""

    model: ModelSpec
    """What to fine-tune."""
    data: DataSpec
    """Where the data is and how to read it."""
    training: TrainingSpec
    """How to train."""
    storage: StorageSpec = StorageSpec()
    """S3 connection."""
    output: OutputSpec
    """Where results go."""

    @model_validator(mode="after")
    def _check_combination(self) -> TrainParameters:
        """Rules that span sections, so one message names every field involved."""
        source, out = (u.rstrip("/") + "/" for u in (self.data.source, self.output.uri))
        if source.startswith(out) or out.startswith(source):  # outputs would become data, or data be pruned
            raise ValueError(
                f"output.uri {self.output.uri!r} and data.source {self.data.source!r} overlap: "
                "write outputs where the dataset is not"
            )
        training, family = self.training, self.model.family
        opt = training.optimizer
        if opt.lr_scaling == "linear" and opt.reference_batch is None and family != "detectron2":
            raise ValueError("training.optimizer.lrScaling linear needs training.optimizer.referenceBatch")
        metric = training.early_stopping.metric if training.early_stopping else None
        if family == "detectron2":
            if self.data.format not in DETECTRON2_FORMATS:
                raise ValueError(
                    f"data.format {self.data.format!r} has no class labels for detectron2; "
                    f"use one of {', '.join(DETECTRON2_FORMATS)}"
                )
            if training.grad_accumulation != 1:
                raise ValueError(
                    "training.gradAccumulation is not supported for detectron2 (its trainers step every "
                    "batch); raise training.batchSize or the number of GPUs instead"
                )
            if training.loss is not None:
                raise ValueError("training.loss applies to sam and sam2; Detectron2 models use their own losses")
            if self.model.resize is not None or self.model.multimask_reduction != "min-loss":
                raise ValueError("model.resize and model.multimaskReduction apply to sam and sam2, not detectron2")
            if metric is not None and metric not in DETECTRON2_METRICS:
                raise ValueError(
                    f"training.earlyStopping.metric for detectron2 must be bbox_ap or segm_ap, got {metric!r}"
                )
        elif metric in DETECTRON2_METRICS:
            raise ValueError(f"training.earlyStopping.metric {metric!r} is for detectron2; use miou, dice, f1 or loss")
        return self


class TrainConfig(TrainParameters):
    """What the trainer reads from --config: the parameters plus the job's identity."""

    job: JobIdentity = JobIdentity()
    """Identity used in metric labels and logs."""

    def with_defaults(self) -> TrainConfig:
        """Every null that means "this family's default" filled in (SAM and SAM2 only)."""
        d = FAMILY_DEFAULTS[self.model.family]
        model = self.model.model_copy(
            update={
                "trainable": self.model.trainable if self.model.trainable is not None else list(d.trainable),
                "resize": self.model.resize or d.resize,
            }
        )
        return self.model_copy(update={"model": model, "training": self.training.resolved(d)})
