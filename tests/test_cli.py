import subprocess
import sys

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
    assert "epochs must be a positive integer" in capsys.readouterr().err


def test_a_wrong_cut_fails_before_any_training(dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(dataset), "--backbone", "vgg16", "--weights", "none",
                 "--image-size", "32", "--fine-tune-from", "block9_", "--runs-dir", str(runs)]) == 2
    assert "No layer of backbone 'vgg16' starts with 'block9_'" in capsys.readouterr().err
    assert not runs.exists()


def test_backbones_lists_the_table(capsys):
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "input", "min"]
    vgg = next(line for line in lines if line.startswith("vgg16 "))
    assert vgg.split() == ["vgg16", "224", "32", "14.7M", "caffe", "block5_"]
    assert len(lines) == 1 + 25
