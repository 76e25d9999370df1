import subprocess
import sys

import pytest

from transfer.cli import main


def test_help_is_instant_because_tensorflow_is_imported_lazily():
    code = ("import sys, contextlib, io\nfrom transfer.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['train', '--help'])\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_user_mistakes_are_one_line_errors_not_tracebacks(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--backbone", "vgg17"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown backbone 'vgg17'. Valid backbones: vgg16")
    assert "Traceback" not in err
    assert main(["train", "--data", str(tmp_path / "nope"), "--epochs", "0"]) == 2
    assert "--epochs (epochs) must be a positive integer" in capsys.readouterr().err


def test_a_wrong_cut_fails_before_any_training(dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--weights", "none",
                 "--image-size", "32", "--fine-tune-from", "block9_", "--runs-dir", str(runs)]) == 2
    assert "No layer of backbone 'vgg16' starts with 'block9_'. Give --fine-tune-from" in \
        capsys.readouterr().err
    # the deeper phase's cut is named as its own option
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--weights", "none",
                 "--image-size", "32", "--deeper-from", "none", "--runs-dir", str(runs)]) == 2
    assert "No layer of backbone 'vgg16' starts with 'none'. Give --deeper-from" in \
        capsys.readouterr().err
    assert not runs.exists()


def test_a_deeper_cut_that_is_not_below_the_cut_fails_before_any_training(dataset, tmp_path,
                                                                          capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--weights", "none",
                 "--image-size", "32", "--deeper-from", "block5_conv3", "--runs-dir",
                 str(runs)]) == 2
    err = capsys.readouterr().err
    assert "--deeper-from block5_conv3 starts at layer 17 of backbone 'vgg16', not below " \
           "phase 2's cut block5_ (layer 15)" in err
    assert not runs.exists()


def test_a_wrong_cut_names_the_backbone_as_the_user_named_it(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--backbone", "mobilenet_025", "--weights",
                 "none", "--image-size", "32", "--fine-tune-from", "block9_", "--runs-dir",
                 str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "No layer of backbone 'mobilenet_025' starts with 'block9_'" in err
    assert "`transfer backbones --layers mobilenet_025`" in err and "mobilenet_0.25" not in err


@pytest.mark.parametrize("content", [b"not weights\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 64])
def test_weights_that_are_not_a_weights_file_are_a_one_line_error(dataset, tmp_path, capsys,
                                                                   content):
    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(content)
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--image-size", "32",
                 "--weights", str(weights), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --weights {weights} could not be loaded into backbone "
                          "'vgg16': ") and err.count("\n") == 1
    assert "Expected a weights file of this backbone" in err and not runs.exists()


def test_weights_of_another_backbone_are_a_one_line_error(dataset, tmp_path, capsys):
    from transfer.backbones import get_spec

    weights = tmp_path / "mobilenet.weights.h5"
    get_spec("mobilenet_025").build(32, weights=None).save_weights(weights)
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--image-size", "32",
                 "--weights", str(weights), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded into backbone 'vgg16': A total of 13 objects" in err
    assert err.count("\n") == 1 and len(err) < 600


def test_a_config_that_is_a_folder_is_named_as_one(tmp_path, capsys):
    (tmp_path / "pets.yaml").mkdir()
    assert main(["train", "--config", str(tmp_path / "pets.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: Config file {tmp_path / 'pets.yaml'} is a folder; "
                                       "expected a .yaml or .json file.\n")


def test_backbones_lists_the_table(capsys):
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "input", "min"]
    vgg = next(line for line in lines if line.startswith("vgg16 "))
    assert vgg.split() == ["vgg16", "224", "32", "caffe", "block5_"]
    assert len(lines) == 1 + 25
