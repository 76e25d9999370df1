import json

import pytest

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
    assert [phase.name for phase in cfg.phases("block5_")] == ["head"]


def test_unknown_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown config file key.*epoch.*Valid keys: data, backbone"):
        resolve({"epoch": 3})
    with pytest.raises(ValueError, match="Unknown options key"):
        resolve(None, {"learningrate": 1.0})


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"epochs": "ten"}, "epochs must be int"),
    ({"fine_tune_epochs": -1}, "fine_tune_epochs must be 0"),
    ({"flip": "diagonal"}, "flip must be one of horizontal"),
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"validation_split": 1.5}, r"validation_split must be in \(0, 1\)"),
])
def test_bad_values_say_what_was_expected(settings, message):
    with pytest.raises(ValueError, match=message):
        resolve(settings)


def test_missing_weights_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        resolve({"weights": str(tmp_path / "nope.h5")})


def test_phases_use_the_table_cut_unless_overridden():
    phases = resolve().phases("conv5_")
    assert [(p.name, p.unfreeze_from) for p in phases] == [("head", None), ("fine_tune", "conv5_")]
    assert resolve({"fine_tune_from": "conv4_"}).phases("conv5_")[1].unfreeze_from == "conv4_"


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
    with pytest.raises(ValueError, match="learning_rate must be float; received 'fast'"):
        resolve({"learning_rate": "fast"})
