"""Training configuration: defaults < an optional YAML or JSON file < command-line flags."""

import collections.abc
import dataclasses
import json
import types
from pathlib import Path

from transfer.distribute import PRECISIONS, STRATEGIES

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical", "none")
CLASS_WEIGHT_MODES = ("auto", "balanced", "none")
HEAD_SOLVERS = ("lbfgs", "adam")
SCHEDULES = ("cosine", "constant")
WEIGHT_CHOICES = "imagenet | none | PATH to a weights file"
# the phases' names, in order: history.csv's, state.json's
PHASES = ("head", "fine_tune", "deeper", "refit")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One fit: `unfreeze_from` None trains the head only, else fine-tunes from that prefix.
    A solved phase of 0 epochs is solved where the features are cached, else skipped."""

    name: str
    epochs: int
    learning_rate: float
    unfreeze_from: str | None
    solver: str = "adam"  # "lbfgs": the head solved to convergence (transfer.head)
    schedule: str = "constant"  # or "cosine": warmed up for an epoch, then decayed to 0
    ema: float = 0.0  # the momentum of the weights' moving average validated and kept; 0: off
    # True: stops after `patience` epochs that do not beat the best validation loss of the
    # phases before it (EarlyStopping's baseline in Keras), not only its own best
    beat_best: bool = False


def setting(default, help, choices=None):
    """A TrainConfig field and everything about it: its default, its help text and, where it
    has them, its choices. The command line's options are built from these (cli.py)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting, declared once: the config file's key, the option's name
    (--fine-tune-epochs for fine_tune_epochs) and the saved config.json's key."""

    data: str = setting("cats_dogs", "data set name (under $TRANSFER_DATA_HOME or data/) or "
                                     "folder: <class>/* or train/<class>/* (with "
                                     "validation/ or val/, test/)")
    backbone: str = setting("mobilenetv2", "backbone name; see `transfer backbones`")
    labels: str | None = setting(None, "a .csv or .tsv label file (header path,label and "
                                       "optionally split), paths relative to its folder")
    multi_label: bool | None = setting(None, "each image may carry several labels (a label "
                                             "file's cells, separated by spaces or ';'): a "
                                             "sigmoid per label (default: on when any cell "
                                             "holds several)")
    label_pattern: str | None = setting(None, "a regular expression whose first group, "
                                              r"found in a file's name, is its class "
                                              r"(e.g. '^(.*)_\d+\.\w+$')")
    weights: str = setting("imagenet", WEIGHT_CHOICES)
    image_size: int | None = setting(None, "input size (default: the backbone's)")
    batch_size: int = setting(32, "images per training step (per replica)")
    head: str = setting("lbfgs", "how phase 1 fits the head: lbfgs solves the softmax "
                                 "regression on the cached features to convergence, its L2 "
                                 "strength chosen on the validation images; adam trains it "
                                 "for --epochs at --learning-rate", HEAD_SOLVERS)
    epochs: int = setting(10, "phase 1 (head) epochs, with --head adam")
    learning_rate: float = setting(1e-3, "phase 1 learning rate, with --head adam")
    fine_tune_epochs: int = setting(10, "phase 2 epochs; 0 skips phase 2")
    fine_tune_learning_rate: float | None = setting(None, "phase 2 learning rate (default: "
                                                          "the backbone's, 1e-5 or as "
                                                          "measured; see README)")
    schedule: str = setting("constant", "each Adam phase's learning rate: constant, or cosine "
                                        "(one epoch's linear warmup, then decayed to 0)",
                            SCHEDULES)
    ema: float = setting(0.0, "momentum of an exponential moving average of the weights in "
                              "each Adam phase, which is validated and kept (e.g. 0.99); 0: off")
    refit: bool = setting(True, "with --head lbfgs, after fine-tuning solve the head again on "
                                "the fine-tuned backbone's cached features, kept only if it "
                                "lowers the validation loss")
    fine_tune_from: str | None = setting(None, "layer-name prefix to fine-tune from "
                                               "(default: the backbone table's cut)")
    deeper_from: str | None = setting(None, "after phase 2, fine-tune again from this earlier "
                                            "layer-name prefix, from the best weights at phase "
                                            "2's rate, kept only if it lowers the validation "
                                            "loss below every earlier epoch's (default: off; "
                                            "see README)")
    dropout: float = setting(0.2, "dropout before the head's Dense layer")
    patience: int = setting(3, "early-stopping patience in epochs")
    validation_split: float = setting(0.2, "fraction of the images that validates when "
                                           "the data set gives no validation split")
    test_split: float = setting(0.0, "fraction of the images kept as a test set, never "
                                     "trained or chosen on, when the data set gives none")
    seed: int = setting(1337, "seed of the split, shuffling, augmentation and initial weights")
    class_weights: str = setting("auto", "auto: balance the loss over classes when they are "
                                         "imbalanced; balanced: always; none: never",
                                 CLASS_WEIGHT_MODES)
    augment: bool = setting(True, "augment training images")
    flip: str = setting("horizontal", "random flips of training images", FLIP_MODES)
    rotation: float = setting(0.1, "rotation augmentation factor")
    zoom: float = setting(0.1, "zoom augmentation factor")
    translation: float = setting(0.1, "translation augmentation factor")
    contrast: float = setting(0.1, "contrast augmentation factor")
    tta: bool = setting(False, "test-time augmentation: calibration, evaluation, predict and "
                               "export average each image's logits with its mirror images' "
                               "(the flips of --flip)")
    keep: float = setting(0.95, "share of the validation images the unknown-image threshold "
                                "keeps: images scoring below it are unknown (predict --reject)")
    runs_dir: str = setting("runs", "where run directories go")
    evaluate: bool = setting(True, "write the evaluation report (report.html, metrics.json) on "
                                   "the validation images at the end")
    mlflow: bool = setting(False, "log the finished run to MLflow (pip install '.[mlflow]'), "
                                  "as also whenever MLFLOW_TRACKING_URI is set")
    strategy: str = setting("auto", "tf.distribute strategy (auto: mirrored on more than one "
                                    "GPU; multiworker: the machines TF_CONFIG or Slurm "
                                    "describes)", STRATEGIES)
    precision: str = setting("float32", "mixed: float16 compute on GPUs", PRECISIONS)
    jit: bool = setting(False, "compile with XLA (GPUs)")
    cache: bool = setting(True, "train on cached outputs of the frozen layers; --no-cache runs "
                                "the frozen backbone in every step")
    cache_views: int = setting(2, "augmented views of each training image to cache")
    cache_memory_mb: int = setting(2048, "decoded images beyond this go to a file cache in "
                                         "the run directory")
    cache_disk_mb: int = setting(8192, "size limit of the feature caches in "
                                       "$TRANSFER_CACHE_HOME; the least recently used are "
                                       "removed first")

    def phases(self, spec):
        """Phase 1 on the frozen backbone, then phase 2 from the backbone's (a BackboneSpec)
        cut at its rate, or as set, unless it has 0 epochs, and again from `deeper_from` where
        one is set; then with a solved head and `refit`, the head solved again on the
        fine-tuned backbone."""
        phases = [Phase(PHASES[0], self.epochs, self.learning_rate, None, self.head,
                        self.schedule, self.ema)]
        if self.fine_tune_epochs > 0:
            rate = self.fine_tune_learning_rate or spec.fine_tune_learning_rate
            phases.append(Phase(PHASES[1], self.fine_tune_epochs, rate,
                                self.fine_tune_from or spec.cut,
                                schedule=self.schedule, ema=self.ema))
            if self.deeper_from:
                phases.append(Phase(PHASES[2], self.fine_tune_epochs, rate, self.deeper_from,
                                    schedule=self.schedule, ema=self.ema, beat_best=True))
            if self.refit and self.head == "lbfgs":
                phases.append(Phase(PHASES[3], 0, self.learning_rate, None, "lbfgs"))
        return phases

    def validate(self):
        """Raise ValueError for values no training run could use."""
        from transfer.backbones import get_spec

        spec = get_spec(self.backbone)  # an unknown name lists the valid ones
        if self.image_size is not None:
            spec.check_size(self.image_size)
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            if choices and getattr(self, field.name) not in choices:
                raise ValueError(f"{_option(field.name)} must be one of {', '.join(choices)}; "
                                 f"received {_shown(getattr(self, field.name))}.")
        for key in ("batch_size", "epochs", "patience", "cache_views"):
            if getattr(self, key) < 1:
                raise ValueError(f"{_option(key)} must be a positive integer; "
                                 f"received {getattr(self, key)}.")
        for key in ("seed", "cache_memory_mb", "cache_disk_mb"):
            if getattr(self, key) < 0:
                raise ValueError(f"{_option(key)} must be 0 or more; "
                                 f"received {getattr(self, key)}.")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"{_option('fine_tune_epochs')} must be 0 (skip phase 2) or more; "
                             f"received {self.fine_tune_epochs}.")
        for key in ("learning_rate", "fine_tune_learning_rate"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"{_option(key)} must be positive; "
                                 f"received {getattr(self, key)}.")
        if not 0 < self.keep <= 1:
            raise ValueError(f"{_option('keep')} must be in (0, 1]: the share of in-class "
                             f"images kept; received {self.keep}.")
        if not 0 <= self.ema < 1:
            raise ValueError(f"{_option('ema')} must be 0 (off) or in (0, 1); received {self.ema}.")
        if self.ema and self.strategy == "multiworker":
            raise ValueError(f"{_option('ema')} averages weights through model.fit, which "
                             "several machines train without; with --strategy multiworker "
                             f"leave it at 0; received {self.ema}.")
        if self.multi_label and self.strategy == "multiworker":
            raise ValueError(f"{_option('multi_label')} is not yet trained on several machines: "
                             "the multi-worker loop computes a softmax loss. Train it on one "
                             "machine (--strategy auto).")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{_option('dropout')} must be in [0, 1); received {self.dropout}.")
        if not 0 < self.validation_split < 1:
            raise ValueError(f"{_option('validation_split')} must be in (0, 1); "
                             f"received {self.validation_split}.")
        if not 0 <= self.test_split < 1 - self.validation_split:
            raise ValueError(f"{_option('test_split')} must be 0 (no test set) or more, and less "
                             f"than 1 - {_option('validation_split')} "
                             f"({1 - self.validation_split:g}); received {self.test_split}.")
        for key in ("rotation", "zoom", "translation", "contrast"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{_option(key)} must be in [0, 1); "
                                 f"received {getattr(self, key)}.")
        if self.weights_file() is not None and not self.weights_file().is_file():
            raise FileNotFoundError(f"{_option('weights')} must be {WEIGHT_CHOICES}; "
                                    f"{_shown(self.weights)} is not a file.")
        return self

    def weights_file(self):
        """The weights file's path, or None for "imagenet" and "none"."""
        return None if self.weights in ("imagenet", "none") else Path(self.weights)

    def to_dict(self):
        return dataclasses.asdict(self)


def field_names():
    return [field.name for field in dataclasses.fields(TrainConfig)]


def value_type(field):
    """The type a field's values have: int for `int | None`."""
    if isinstance(field.type, types.UnionType):
        return next(t for t in field.type.__args__ if t is not type(None))
    return field.type


MAX_CONFIG_BYTES = 1 << 20  # a config file holds a few dozen settings


def load_file(path):
    """The settings in a YAML (.yaml/.yml) or JSON (.json) file, as a dict.

    A key given twice and YAML aliases (*name) are errors: one would silently win, and
    nested aliases expand a small file into an enormous value (the "billion laughs").
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Config file {path} is a folder; expected a .yaml or .json file.")
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist"
                                f"{' as a regular file' if path.exists() else ''}; expected a "
                                ".yaml or .json file.")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"Config file {path} must end in .yaml, .yml or .json; "
                         f"received {path.suffix or 'no suffix'}.")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ValueError(f"Config file {path} cannot be read ({error.strerror or error}); "
                         "check its permissions.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"Config file {path} is over {MAX_CONFIG_BYTES // 2**20} MB; expected "
                         "a few settings, one per line.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"Config file {path} is not UTF-8 text (byte {error.start}); save it "
                         "as UTF-8.") from None
    try:
        settings = _yaml(text, path) if suffix != ".json" else _json(text, path)
    except RecursionError:
        raise ValueError(f"Config file {path} nests too deeply; expected a flat mapping of "
                         "settings.") from None
    if not isinstance(settings, dict):
        raise ValueError(f"Config file {path} must hold a mapping of settings; "
                         f"received {type(settings).__name__}.")
    keys = [key for key in settings if not isinstance(key, str)]
    if keys:
        raise ValueError(f"Config file {path} has key {_shown(keys[0])}, which is not a "
                         "setting name; keys are names such as batch_size.")
    return settings


def _yaml(text, path):
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"Config file {path} uses the YAML alias *{event.anchor[:40]} "
                                 f"(line {event.start_mark.line + 1}); write its value out "
                                 "instead: aliases are refused, as nested ones expand a small "
                                 "file into an enormous value.")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, collections.abc.Hashable) and key in lines:
                    raise ValueError(f"Config file {path} sets {_shown(key)} twice (lines "
                                     f"{lines[key]} and {line}); keep one.")
                if isinstance(key, collections.abc.Hashable):
                    lines[key] = line
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=Loader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        what = ", ".join(part for part in (getattr(error, "context", None),
                                           getattr(error, "problem", None)) if part)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        summary = what or str(error).splitlines()[0]
        raise ValueError(f"Config file {path} is not valid YAML: {summary[:200]}"
                         f"{where}.") from None


def _json(text, path):
    def mapping(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"Config file {path} sets {_shown(key)} twice; keep one.")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=mapping)
    except json.JSONDecodeError as error:
        raise ValueError(f"Config file {path} is not valid JSON: {error}") from None


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
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for key, value in settings.items():
        expected = value_type(fields[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            settings[key] = float(value)
        elif expected is float and isinstance(value, str) and _is_number(value):
            settings[key] = float(value)  # YAML reads 1e-4 (no dot) as a string
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{_option(key)} must be {expected.__name__}; received "
                             f"{_shown(value)} ({type(value).__name__}).")


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _option(key):
    """A setting as messages name it: the option typed and the config file's key."""
    return f"--{key.replace('_', '-')} ({key})"


def _shown(value, limit=60):
    """repr(value), cut short: a message stays one readable line whatever a file held."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
