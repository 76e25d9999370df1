import json

import pytest

from transfer.backbones import FINE_TUNE_LEARNING_RATE, get_spec
from transfer.config import TrainConfig, load_file, resolve


def test_defaults_then_file_then_options(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("backbone: resnet50\nepochs: 4\nlearning_rate: 0.01\n")
    cfg = resolve(load_file(path), {"epochs": 7, "backbone": None})
    assert cfg.backbone == "resnet50"  # file beats default; None option means "not given"
    assert cfg.epochs == 7  # option beats file
    assert cfg.learning_rate == 0.01
    assert cfg.fine_tune_learning_rate == TrainConfig().fine_tune_learning_rate


def test_json_config_files_work_too(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"fine_tune_epochs": 0, "augment": False}))
    cfg = resolve(load_file(path))
    assert cfg.fine_tune_epochs == 0 and cfg.augment is False
    assert [phase.name for phase in cfg.phases(get_spec("vgg16"))] == ["head"]


def test_unknown_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown config file key.*epoch.*Valid keys: data, backbone"):
        resolve({"epoch": 3})
    with pytest.raises(ValueError, match="Unknown options key"):
        resolve(None, {"learningrate": 1.0})


@pytest.mark.parametrize("settings, message", [  # the option typed, and the file's key
    ({"batch_size": 0}, r"^--batch-size \(batch_size\) must be a positive integer"),
    ({"epochs": "ten"}, r"^--epochs \(epochs\) must be int"),
    ({"fine_tune_epochs": -1}, r"^--fine-tune-epochs \(fine_tune_epochs\) must be 0"),
    ({"flip": "diagonal"}, r"^--flip \(flip\) must be one of horizontal"),
    ({"learning_rate": 0}, r"^--learning-rate \(learning_rate\) must be positive"),
    ({"validation_split": 1.5}, r"^--validation-split \(validation_split\) must be in \(0, 1\)"),
    ({"test_split": 0.9}, r"less than 1 - --validation-split \(validation_split\) \(0.8\)"),
    ({"cache_disk_mb": -1}, r"^--cache-disk-mb \(cache_disk_mb\) must be 0 or more"),
])
def test_bad_values_say_what_was_expected(settings, message):
    with pytest.raises(ValueError, match=message):
        resolve(settings)


def test_missing_weights_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        resolve({"weights": str(tmp_path / "nope.h5")})


def test_phases_use_the_table_cut_and_rate_unless_overridden():
    resnet = get_spec("resnet50")
    phases = resolve().phases(resnet)
    assert [(p.name, p.unfreeze_from) for p in phases] == [("head", None), ("fine_tune", "conv5_"),
                                                           ("refit", None)]
    # the refit: the head solved again after fine-tuning, with a solved head only
    assert (phases[2].epochs, phases[2].solver) == (0, "lbfgs")
    assert [p.name for p in resolve({"refit": False}).phases(resnet)] == ["head", "fine_tune"]
    assert [p.name for p in resolve({"head": "adam"}).phases(resnet)] == ["head", "fine_tune"]
    assert [p.name for p in resolve({"fine_tune_epochs": 0}).phases(resnet)] == ["head"]
    assert resolve({"fine_tune_from": "conv4_"}).phases(resnet)[1].unfreeze_from == "conv4_"
    # the deeper phase: off unless asked for; then after phase 2,
    # at its rate and epochs, stopping after `patience` epochs that beat no earlier phase
    deeper = resolve({"deeper_from": "conv4_"}).phases(resnet)
    assert [(p.name, p.unfreeze_from) for p in deeper] == [
        ("head", None), ("fine_tune", "conv5_"), ("deeper", "conv4_"), ("refit", None)]
    assert (deeper[2].learning_rate, deeper[2].epochs) == (deeper[1].learning_rate,
                                                           deeper[1].epochs)
    assert [p.beat_best for p in deeper] == [False, False, True, False]
    # by default, with mobilenetv2 too: the head, phase 2 and the refit
    mobilenetv2 = get_spec("mobilenetv2")
    assert [(p.name, p.unfreeze_from) for p in resolve().phases(mobilenetv2)] == [
        ("head", None), ("fine_tune", "block_15_"), ("refit", None)]
    assert [p.name for p in resolve({"deeper_from": "conv4_", "fine_tune_epochs": 0}).phases(
        resnet)] == ["head"]
    # Phase 2's rate: the backbone's row (the measured 1e-4 of the two mobilenets the bench
    # runs), unless one is given.
    assert phases[1].learning_rate == FINE_TUNE_LEARNING_RATE == 1e-5
    assert resolve().phases(get_spec("mobilenetv2"))[1].learning_rate == 1e-4
    assert resolve().phases(get_spec("mobilenet_025"))[1].learning_rate == 1e-4
    assert resolve({"fine_tune_learning_rate": 3e-6}).phases(
        get_spec("mobilenetv2"))[1].learning_rate == 3e-6


def test_config_file_must_exist_and_be_yaml_or_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "settings.toml").write_text("x = 1")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        load_file(tmp_path / "settings.toml")


def test_malformed_config_files_are_named_with_what_is_wrong(tmp_path):
    (tmp_path / "broken.yaml").write_text("epochs: [1, 2\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        load_file(tmp_path / "broken.yaml")
    (tmp_path / "broken.json").write_text("{epochs: 1}")
    with pytest.raises(ValueError, match="broken.json is not valid JSON: Expecting"):
        load_file(tmp_path / "broken.json")
    (tmp_path / "SETTINGS.YAML").write_text("epochs: 3\n")
    assert load_file(tmp_path / "SETTINGS.YAML") == {"epochs": 3}


def test_yaml_exponents_without_a_dot_are_numbers_for_float_settings(tmp_path):
    (tmp_path / "settings.yaml").write_text("learning_rate: 1e-4\nfine_tune_learning_rate: 2e-6\n")
    cfg = resolve(load_file(tmp_path / "settings.yaml"))  # YAML 1.1 reads these as strings
    assert (cfg.learning_rate, cfg.fine_tune_learning_rate) == (1e-4, 2e-6)
    with pytest.raises(ValueError, match=r"\(learning_rate\) must be float; received 'fast'"):
        resolve({"learning_rate": "fast"})


def test_a_config_path_that_is_a_folder_or_unreadable_is_a_one_line_error(tmp_path):
    (tmp_path / "settings.yaml").mkdir()
    with pytest.raises(ValueError, match=r"settings.yaml is a folder; expected a .yaml or .json"):
        load_file(tmp_path / "settings.yaml")
    (tmp_path / "latin1.yaml").write_bytes("data: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.yaml is not UTF-8 text"):
        load_file(tmp_path / "latin1.yaml")


def test_nested_yaml_aliases_are_refused_with_a_short_message(tmp_path):
    # The "billion laughs": 9 levels of 10 aliases each, 1e9 strings from about 400 bytes.
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 10) + "]")
    lines.append("epochs: *a8")
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as raised:
        load_file(tmp_path / "laughs.yaml")
    message = str(raised.value)
    assert "uses the YAML alias *a0 (line 2)" in message
    assert len(message) < 300 and "\n" not in message
    # A huge value is shown cut short, whatever the file held.
    with pytest.raises(ValueError, match=r"\(epochs\) must be int; received \['lol', .*\.\.\. "
                                         r"\(70,000 characters\) \(list\)") as raised:
        resolve({"epochs": ["lol"] * 10_000})
    assert len(str(raised.value)) < 200


@pytest.mark.parametrize("name, text, message", [
    ("twice.yaml", "epochs: 3\nbatch_size: 8\nepochs: 30\n",
     r"twice.yaml sets 'epochs' twice \(lines 1 and 3\); keep one"),
    ("twice.json", '{"epochs": 3, "epochs": 30}', r"twice.json sets 'epochs' twice; keep one"),
    ("nested.yaml", "augmentation:\n  zoom: 0.1\n  zoom: 0.2\n", r"sets 'zoom' twice"),
])
def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_file(tmp_path / name)


def test_yaml_errors_and_odd_keys_are_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("epochs: [1, 2\n")
    with pytest.raises(ValueError) as raised:
        load_file(tmp_path / "broken.yaml")
    assert "\n" not in str(raised.value) and "(line 2, column 1)" in str(raised.value)
    (tmp_path / "numbers.yaml").write_text("1: 2\n")
    with pytest.raises(ValueError, match="has key 1, which is not a setting name"):
        load_file(tmp_path / "numbers.yaml")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.json nests too deeply"):
        load_file(tmp_path / "deep.json")
