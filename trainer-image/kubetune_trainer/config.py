"""The training parameters: one pydantic model, shared by the operator, the CLI and the trainer.

This module must stay torch-free: the operator image imports it to validate FineTuneJob specs and
to write the exact JSON the trainer reads back with the same model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

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
SAM_VARIANTS = ("vit-base", "vit-large", "vit-huge")
URI_SCHEMES = ("s3://", "file://")


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


class ModelSpec(Section):
    family: Literal["sam2", "sam", "detectron2"]
    """Model family: sam2, sam (HF transformers) or detectron2."""
    variant: str
    """sam2.1_hiera_{tiny,small,base_plus,large} (or sam2_hiera_*); sam: vit-{base,large,huge};
    detectron2: a model-zoo config path."""
    checkpoint: str | None = None
    """Base weights (s3:// or file://) in the family's native format. Omitted: random init."""
    trainable: list[Trainable] = Field(default_factory=lambda: ["mask_decoder", "prompt_encoder"])
    """Parts of the model that receive gradients; the rest stay frozen."""
    image_size: int = Field(1024, ge=64, le=4096)
    """Side of the square model input in pixels (SAM2: a multiple of 32)."""
    multimask: bool = True
    """Predict three masks per prompt (training back-propagates the best, evaluation keeps the
    one with the highest predicted IoU)."""
    overrides: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Detectron2 config overrides (e.g. SOLVER.BASE_LR); only for family detectron2."""

    @model_validator(mode="after")
    def _check_family(self) -> ModelSpec:
        _check_uri(self.checkpoint, "model.checkpoint")
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
        if not self.trainable:
            raise ValueError("model.trainable must name at least one part")
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
    format: Literal["coco", "via", "mask-folder", "labpics", "voc"]
    """Annotation format."""
    train: str
    """Training split, relative to source: an annotation file (coco, via), a folder (mask-folder,
    labpics) or an image-set name (voc)."""
    validation: str | None = None
    """Validation split, same form as train. Without it, evaluation is skipped."""
    prompts: PromptSpec = PromptSpec()
    """How prompts are generated from masks."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""

    @model_validator(mode="after")
    def _check_source(self) -> DataSpec:
        _check_uri(self.source, "data.source")
        return self


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = Field(1.0e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(4.0e-5, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum."""


class ScheduleSpec(Section):
    type: Literal["cosine", "multistep", "constant"] = "cosine"
    """LR decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from warmupFactor·lr to lr over this many steps."""
    warmup_factor: float = Field(0.001, gt=0, le=1)
    """Starting fraction of lr for warmup."""
    milestones: list[int] = Field(default_factory=list)
    """Steps at which multistep multiplies the lr by gamma."""
    gamma: float = Field(0.1, gt=0)
    """Multistep decay factor."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine ends at this fraction of lr."""


class EarlyStoppingSpec(Section):
    metric: Literal["miou", "dice", "f1", "loss"] = "miou"
    """Validation metric watched (loss: lower is better; others: higher)."""
    patience: int = Field(5, ge=1)
    """Evaluations without improvement before training stops."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""


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
    loss: Literal["sam2", "simple"] = "sam2"
    """sam2: focal×20 + dice×1 + IoU-L1×1 + object-score BCE×1 (SAM2's recipe);
    simple: BCE + 0.05·|predicted IoU − IoU|."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the validation split every N steps (and at the start and the end)."""
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


class StorageSpec(Section):
    endpoint: str | None = None
    """S3 endpoint URL (MinIO, Ceph...). Omitted: boto3's usual configuration (AWS)."""
    region: str | None = None
    """S3 region."""
    credentials_secret: str | None = None
    """Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (operator side)."""


class OutputSpec(Section):
    uri: str
    """Where checkpoints, the final model and the report go: s3://bucket/prefix/ or file:///path/."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a checkpoint every N steps (always one at the end)."""
    keep_last: int = Field(3, ge=1)
    """Complete checkpoints kept; older ones are deleted."""

    @model_validator(mode="after")
    def _check_uri(self) -> OutputSpec:
        _check_uri(self.uri, "output.uri")
        return self


class JobIdentity(Section):
    name: str = "local"
    """FineTuneJob name (the `job` label of every metric)."""
    namespace: str = "default"
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


class TrainConfig(TrainParameters):
    """What the trainer reads from --config: the parameters plus the job's identity."""

    job: JobIdentity = JobIdentity()
    """Identity used in metric labels and logs."""
