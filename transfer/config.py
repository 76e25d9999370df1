"""Training configuration: defaults < an optional YAML or JSON file < command-line flags."""

import dataclasses
import json
from pathlib import Path

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical", "none")
CLASS_WEIGHT_MODES = ("auto", "balanced", "none")
WEIGHT_CHOICES = "imagenet | none | PATH to a weights file"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One fit: `unfreeze_from` None trains the head only, else fine-tunes from that prefix."""

    name: str
    epochs: int
    learning_rate: float
    unfreeze_from: str | None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = "cats_dogs"
    backbone: str = "mobilenetv2"
    weights: str = "imagenet"
    image_size: int | None = None  # None: the backbone's default size
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 1e-5
    fine_tune_from: str | None = None  # None: the backbone table's cut
    dropout: float = 0.2
    patience: int = 3
    validation_split: float = 0.2  # used only when the data set has no validation/ folder
    seed: int = 1337
    class_weights: str = "auto"  # auto: balance the classes only when they are imbalanced
    augment: bool = True
    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.1
    translation: float = 0.1
    contrast: float = 0.1
    runs_dir: str = "runs"
    evaluate: bool = True  # write the evaluation report on the validation images at the end
    strategy: str = "auto"  # see transfer.distribute.STRATEGIES
    precision: str = "float32"  # or "mixed" (GPUs)
    jit: bool = False  # XLA (GPUs)
    cache: bool = True  # False: the frozen backbone runs in every training step
    cache_views: int = 2  # augmented views of each training image in the feature caches
    cache_memory_mb: int = 2048  # decoded images beyond this go to a file cache in the run
    cache_disk_mb: int = 8192  # feature caches in $TRANSFER_CACHE_HOME, oldest evicted

    def phases(self, cut):
        """Phase 1 on the frozen backbone, then phase 2 from `cut` unless it has 0 epochs."""
        phases = [Phase("head", self.epochs, self.learning_rate, None)]
        if self.fine_tune_epochs > 0:
            phases.append(Phase("fine_tune", self.fine_tune_epochs,
                                self.fine_tune_learning_rate, self.fine_tune_from or cut))
        return phases

    def validate(self):
        """Raise ValueError for values no training run could use."""
        from transfer.backbones import get_spec

        spec = get_spec(self.backbone)  # an unknown name lists the valid ones
        if self.image_size is not None:
            spec.check_size(self.image_size)
        if self.class_weights not in CLASS_WEIGHT_MODES:
            raise ValueError(f"class_weights must be one of {', '.join(CLASS_WEIGHT_MODES)}; "
                             f"received {self.class_weights!r}.")
        for key in ("batch_size", "epochs", "patience", "cache_views"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer; received {getattr(self, key)}.")
        for key in ("seed", "cache_memory_mb", "cache_disk_mb"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 or more; received {getattr(self, key)}.")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be 0 (skip phase 2) or more; "
                             f"received {self.fine_tune_epochs}.")
        for key in ("learning_rate", "fine_tune_learning_rate"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive; received {getattr(self, key)}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); received {self.dropout}.")
        if not 0 < self.validation_split < 1:
            raise ValueError(f"validation_split must be in (0, 1); received {self.validation_split}.")
        from transfer.distribute import PRECISIONS, STRATEGIES

        for key, choices in (("strategy", STRATEGIES), ("precision", PRECISIONS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}; "
                                 f"received {getattr(self, key)!r}.")
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {', '.join(FLIP_MODES)}; received {self.flip!r}.")
        for key in ("rotation", "zoom", "translation", "contrast"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1); received {getattr(self, key)}.")
        if self.weights_file() is not None and not self.weights_file().is_file():
            raise FileNotFoundError(
                f"weights must be {WEIGHT_CHOICES}; {self.weights!r} is not a file.")
        return self

    def weights_file(self):
        """The weights file's path, or None for "imagenet" and "none"."""
        return None if self.weights in ("imagenet", "none") else Path(self.weights)

    def to_dict(self):
        return dataclasses.asdict(self)


def field_names():
    return [field.name for field in dataclasses.fields(TrainConfig)]


def load_file(path):
    """The settings in a YAML (.yaml/.yml) or JSON (.json) file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist; expected a .yaml or .json file.")
    text, suffix = path.read_text(encoding="utf-8"), path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            settings = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"Config file {path} is not valid YAML: {error}") from None
    elif suffix == ".json":
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Config file {path} is not valid JSON: {error}") from None
    else:
        raise ValueError(f"Config file {path} must end in .yaml, .yml or .json; "
                         f"received {path.suffix or 'no suffix'}.")
    if not isinstance(settings, dict):
        raise ValueError(f"Config file {path} must hold a mapping of settings; "
                         f"received {type(settings).__name__}.")
    return settings


def resolve(file_settings=None, overrides=None):
    """Defaults, updated by a config file's settings, updated by command-line overrides.

    Keys in either mapping must be TrainConfig fields; None values in `overrides` mean "not
    given" and are ignored.
    """
    settings = {}
    for source, mapping in (("config file", file_settings or {}), ("options", overrides or {})):
        unknown = sorted(set(mapping) - set(field_names()))
        if unknown:
            raise ValueError(f"Unknown {source} key(s) {', '.join(unknown)}. "
                             f"Valid keys: {', '.join(field_names())}.")
        settings.update({key: value for key, value in mapping.items() if value is not None})
    _check_types(settings)
    return TrainConfig(**settings).validate()


def _check_types(settings):
    defaults = TrainConfig()
    for key, value in settings.items():
        default = getattr(defaults, key)
        expected = type(default) if default is not None else (int if key == "image_size" else str)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            settings[key] = float(value)
        elif expected is float and isinstance(value, str) and _is_number(value):
            settings[key] = float(value)  # YAML reads 1e-4 (no dot) as a string
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{key} must be {expected.__name__}; received {value!r} "
                             f"({type(value).__name__}).")


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True
