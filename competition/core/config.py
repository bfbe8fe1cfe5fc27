"""One typed run configuration: YAML file + dotted command-line overrides, validated on load.

Every section rejects unknown keys and bad values, and the error names the key (``train.epocs: unknown key.
Did you mean 'epochs'?``). Relative paths are resolved against the current directory when loaded, so the
``config.yaml`` written into a run directory is self-contained: it alone rebuilds the model for inference.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

from smp_unet3p._names import did_you_mean


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Probability = Field(default=0.0, ge=0.0, le=1.0)


class DataConfig(_Section):
    """Where the training images, masks and folds are.

    ``format: coco``: ``root`` holds the images, ``annotations`` the COCO json (masks are built into the mask
    cache as ``competition prepare`` does). ``format: folder``: ``image_dir`` + ``mask_dir`` matched by stem
    (``value_map: binary`` maps mask > 127 to class 1). ``folds``: CSV with ``image_id`` and ``fold``.
    ``exclude``: file names left out of training and validation (``competition audit`` helps to find them).
    ``extra``: pseudo-labelled sets (folders written by ``competition pseudo``) added to the training split of
    every fold, never to validation; fold-matched sets give fold k the labels of the teachers' fold-k models.
    ``extra_pooled``: accept sets labelled by every fold model (``pseudo --pooled``), whose labels carry
    what the teachers learned from each fold's validation images (OOF scores are then optimistic).
    ``background``: ``auto`` (the first class is background), its name (which must be the first class), or
    ``none``: every class is a real one (CamVid without void) and unannotated pixels are ignored in training
    and scoring; panels then colour class 0, CGM gates it, submissions list it, post-processing is refused.
    """

    format: Literal["coco", "folder"] = "coco"
    root: Path | None = None
    annotations: Path | None = None
    classes: list[str] | None = None
    merge_map: Path | None = None
    cache_dir: Path | None = None
    crowd: Literal["class", "ignore"] = "class"
    image_dir: Path | None = None
    mask_dir: Path | None = None
    value_map: Literal["auto", "binary"] | dict[int, int] | None = "auto"
    folds: Path
    exclude: Path | None = None
    extra: list[Path] = Field(default_factory=list)
    extra_pooled: bool = False
    background: str | None = "auto"

    @field_validator("background")
    @classmethod
    def _background_word(cls, value: str | None) -> str:
        return "none" if value is None or value.strip().lower() == "none" else value

    @model_validator(mode="after")
    def _background_first(self) -> DataConfig:
        if self.background == "none" and self.classes is None:
            raise ValueError("background: none needs data.classes (the class names, none of them background)")
        named = self.background not in ("auto", "none") and self.classes is not None
        if named and self.background.strip().lower() != self.classes[0].strip().lower():
            raise ValueError(
                f"background {self.background!r} must be the first of data.classes (class 0), which is "
                f"{self.classes[0]!r}: put it first, or use 'none' for data without a background class"
            )
        return self

    def background_index(self) -> int | None:
        """The background's class id (0), or ``None`` without a background class."""
        return None if self.background == "none" else 0

    @model_validator(mode="after")
    def _paths_for_format(self) -> DataConfig:
        need = ("root", "annotations") if self.format == "coco" else ("image_dir", "mask_dir")
        missing = [f"data.{k}" for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"format {self.format!r} needs {', '.join(missing)}")
        if self.format != "folder":
            return self
        if self.classes is None and self.value_map not in ("auto", "binary"):
            raise ValueError("format 'folder' with a value_map needs data.classes (names, background first)")
        count = len(self.classes) if self.classes is not None else 2
        if self.value_map == "binary" and count != 2:
            raise ValueError(
                f"value_map 'binary' makes 2 classes (mask > 127 -> 1), but data.classes lists {count}; "
                "use value_map: null (mask values are class ids) or a mapping {value: class}"
            )
        if isinstance(self.value_map, dict):
            ok = lambda v, c: (0 <= c < count or c == 255) and 0 <= v < 256  # noqa: E731
            bad = {v: c for v, c in self.value_map.items() if not ok(v, c)}
            if bad:
                raise ValueError(
                    f"value_map {bad} maps outside the {count} classes of data.classes (ids 0..{count - 1}, "
                    "or 255 for ignored pixels) or from values outside 0..255"
                )
        return self

    def mask_values(self) -> Literal["binary"] | dict[int, int] | None:
        """How mask values of folder data become class ids: ``"auto"`` is ``binary`` (mask > 127 -> 1) for
        two classes and the values themselves (``None``) for more."""
        if self.value_map != "auto":
            return self.value_map
        return "binary" if self.classes is None or len(self.classes) == 2 else None


# constructor params that change what a model returns in eval mode (the pipeline's contract: logits)
OUTPUT_CHANGING_PARAMS = ("activation",)
# Unet3Plus params whose default may change with evidence: written into every run's config.yaml, so a later
# default never silently changes how an old checkpoint is rebuilt
PINNED_UNET3PLUS_PARAMS = ("decoder_upsample_after_conv", "cgm_gate")
# the defaults run configs were written with before pinning (cgm_gate became "soft" after the UNet 3+ study)
UNET3PLUS_DEFAULTS_BEFORE_PINNING = {"decoder_upsample_after_conv": True, "cgm_gate": "hard"}


def is_unet3plus(arch: Any) -> bool:
    """Whether an architecture name resolves to ``Unet3Plus`` (False for an unknown name)."""
    from smp_unet3p import Unet3Plus
    from smp_unet3p.registry import resolve_architecture

    try:
        return resolve_architecture(str(arch)) is Unet3Plus
    except ValueError:
        return False


# model arguments the pipeline sets from ModelConfig's own fields, never through params
SET_BY_PIPELINE = ("encoder_name", "encoder_weights", "in_channels", "classes")


class ModelConfig(_Section):
    """Any smp architecture or ``unet3plus`` by name; ``params`` go to its constructor."""

    arch: str = "unet3plus"
    encoder_name: str = "resnet34"
    encoder_weights: str | None = None
    classes: int | None = Field(default=None, ge=1)
    in_channels: int = Field(default=3, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from smp_unet3p.registry import resolve_architecture

        resolve_architecture(value)  # raises with close names
        return value

    @field_validator("params")
    @classmethod
    def _logits_out(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in OUTPUT_CHANGING_PARAMS:
            if value.get(key) is not None:
                raise ValueError(
                    f"params.{key}={value[key]!r} makes the model return probabilities, but the pipeline "
                    "needs logits: losses take logits, and validation, OOF files and prediction turn them "
                    "into probabilities in one place (softmax, or sigmoid for one channel). Remove the key."
                )
        return value

    @model_validator(mode="after")
    def _params_of_the_arch(self) -> ModelConfig:
        from smp_unet3p.registry import check_model_kwargs

        fixed = [k for k in self.params if k in SET_BY_PIPELINE]
        if fixed:
            raise ValueError(f"params.{fixed[0]}: set model.{fixed[0]} instead")
        try:
            check_model_kwargs(self.arch, self.encoder_name, self.params)
        except TypeError as exc:
            raise ValueError(f"params: {exc}") from None
        return self

    @model_validator(mode="after")
    def _pin_defaults(self) -> ModelConfig:
        import inspect

        from smp_unet3p import Unet3Plus

        if is_unet3plus(self.arch):
            signature = inspect.signature(Unet3Plus.__init__).parameters
            pinned = {k: signature[k].default for k in PINNED_UNET3PLUS_PARAMS if k not in self.params}
            if pinned:
                self.params = {**self.params, **pinned}
        return self

    @field_validator("encoder_name")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value.startswith("tu-"):
            import timm

            if not timm.is_model(value[3:]):
                hint = did_you_mean(value[3:], timm.list_models())
                raise ValueError(f"unknown timm encoder {value!r}.{hint}")
            return value
        from segmentation_models_pytorch.encoders import get_encoder_names

        names = get_encoder_names()
        if value not in names:
            raise ValueError(
                f"unknown encoder {value!r}.{did_you_mean(value, names)} timm models work as 'tu-<name>'."
            )
        return value


class LossConfig(_Section):
    """Loss by name (``smp_unet3p.losses.get_loss``); side-output and CGM terms are added when present.
    ``class_weights``: one per class (``data.classes`` order) on the per-pixel cross-entropy / focal term
    (checked at preflight); ``prepare``'s class_stats.csv lists median-frequency weights."""

    name: str = "dice_ce"
    side_weight: float = Field(default=1.0, ge=0.0)
    cgm_weight: float = Field(default=0.4, ge=0.0)
    ignore_index: int = 255
    class_weights: list[PositiveFloat] | None = None

    @field_validator("name")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from smp_unet3p.losses import available_losses

        if value.lower() not in available_losses():
            raise ValueError(f"unknown loss {value!r}.{did_you_mean(value, available_losses())}")
        return value


class OptimizerConfig(_Section):
    """``decoder_lr_scale``: learning-rate multiplier of everything outside the encoder (a randomly
    initialised decoder next to a pretrained encoder)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    decoder_lr_scale: float = Field(default=1.0, gt=0.0)


class SchedulerConfig(_Section):
    """Linear warm-up (``warmup_epochs``, may be fractional) then cosine / poly decay to ``min_lr_ratio``."""

    name: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    min_lr_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    power: float = Field(default=0.9, gt=0.0)


class AugmentConfig(_Section):
    """Albumentations pipeline; probabilities in [0, 1]. ``size``: random training crop (padded if small);
    ``eval_size``: validation / prediction resize. Each is a side (square) or ``[height, width]``.
    ``scale``: ``[low, high]``: each training image is first resized to ``eval_size`` (the scale the model is
    validated and predicts at; the image's own size without one) times a random factor in the range, then
    cropped to ``size`` (the top teams' 0.5-2x; ``[1, 1]`` only matches the training scale to ``eval_size``).
    ``null`` (default): no resize, training crops come from the images at their own size.

    ``copy_paste``: probability of pasting 1..``copy_paste_objects`` object instances (COCO annotations of the
    fold's training split) into a training image, resized by a factor in ``copy_paste_scale``, the class drawn
    uniformly first when ``copy_paste_balanced`` (see ``competition.data.copy_paste``).
    ``copy_paste_classes``: the names of the classes to paste (e.g. the thing classes); ``null``: every class.
    """

    size: int | tuple[int, int] | None = None
    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    vflip: float = Probability
    rotate90: float = Probability
    shift_scale_rotate: float = Probability
    elastic: float = Probability
    color: float = Probability
    normalize: Literal["imagenet", "none"] = "imagenet"
    eval_size: int | tuple[int, int] | None = None
    scale: tuple[float, float] | None = None
    copy_paste: float = Probability
    copy_paste_objects: int = Field(default=3, ge=1)
    copy_paste_scale: tuple[float, float] = (0.5, 1.5)
    copy_paste_balanced: bool = True
    copy_paste_classes: list[str] | None = Field(default=None, min_length=1)

    @field_validator("size", "eval_size")
    @classmethod
    def _sides(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sides = (value,) if isinstance(value, int) else value or ()
        if any(side < 32 for side in sides):
            raise ValueError(f"sides of at least 32 pixels, got {value}")
        return value

    @staticmethod
    def hw(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
        """``(height, width)`` of ``size`` / ``eval_size``."""
        return None if value is None else (value, value) if isinstance(value, int) else tuple(value)

    @field_validator("copy_paste_scale", "scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value


# packages each experiment tracker needs (competition.train.tracking); the "track" extra installs them
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
}


class TrainConfig(_Section):
    """The training loop. ``loggers``: experiment trackers besides ``metrics.csv`` (see
    ``competition.train.tracking``)."""

    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1)
    val_batch_size: int | None = Field(default=None, ge=1)
    accum_steps: int = Field(default=1, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    swa_epochs: int | None = Field(default=None, ge=1)  # average the last N epochs' weights (averaging)
    grad_clip: float | None = Field(default=None, gt=0.0)
    seed: int = 42
    workers: int = Field(default=2, ge=0)
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; null: runtime.cpu_threads decides
    patience: int | None = Field(default=None, ge=1)  # epochs without a better mIoU that end a fold
    time_limit: float | None = Field(default=None, gt=0)  # seconds for the whole `train` command, or "8h30m"
    init_from: str | None = None  # another run's folder (fold k from its fold k) or a .safetensors file
    init_any_folds: bool = False  # accept a teacher run trained on another folds file (leaks validation)
    # best.safetensors (OOF, predict) holds the best-mIoU epoch or the last ("last": nothing chosen on val)
    keep: Literal["best", "last"] = "best"
    device: str = "auto"
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(default=10, ge=0)
    deterministic: bool = False
    checkpoint_every: int = Field(default=1, ge=1)
    oof: Literal["probs", "argmax", "none"] = "probs"
    oof_size: int | None = Field(default=256, ge=8)  # OOF maps larger than this are resized; null: native
    progress: bool = True
    loggers: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["csv"])

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("loggers")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        for name in value:
            missing = [p for p in TRACKER_PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
            if missing:
                raise ValueError(f'logger {name!r} needs {", ".join(missing)}: pip install -e ".[track]"')
        return list(dict.fromkeys(value))


class Config(_Section):
    """A whole run: ``runs/<name>/fold<k>/`` is written under ``output_dir``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: Path = Path("runs")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _cgm_gates_every_class_without_background(self) -> Config:
        params = self.model.params
        if self.data.background_index() is None and params.get("cgm") and is_unet3plus(self.model.arch):
            if params.setdefault("cgm_background", None) is not None:
                raise ValueError(
                    f"model.params.cgm_background={params['cgm_background']} with data.background: none; "
                    "leave it out (CGM then gates every class)"
                )
        return self

    @model_validator(mode="after")
    def _copy_paste_needs_instances(self) -> Config:
        if self.augment.copy_paste and self.data.format != "coco":
            raise ValueError(
                "augment.copy_paste pastes object instances from COCO annotations; data.format "
                f"{self.data.format!r} has none (set augment.copy_paste=0)"
            )
        return self

    def run_dir(self, fold: int) -> Path:
        return self.output_dir / self.name / f"fold{fold}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_duration(text: str) -> float:
    """Seconds of ``"8h30m"``, ``"8h30"`` (8 h 30 min: a bare number after hours is minutes), ``"90m"``,
    ``"1.5h"``, ``"45s"`` or ``"3600"``."""
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    parts = re.fullmatch(rf"(?:{number}h)?(?:{number}m)?(?:{number}(s?))?", re.sub(r"\s+", "", text))
    if not parts or not any(parts.groups()):
        raise ValueError(f"not a duration: {text!r} (e.g. 8h30m, 90m, 3600)")
    hours, minutes, seconds, unit = parts.groups()
    if hours and not minutes and seconds and not unit:  # "8h30"
        minutes, seconds = seconds, None
    return sum(float(v or 0) * k for v, k in ((hours, 3600), (minutes, 60), (seconds, 1)))
