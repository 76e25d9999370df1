"""An interrupted run loses at most the epoch it was in, and --resume finishes it."""

import csv
import logging
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_BACKBONE, TINY_CUT, TINY_SIZE, make_dataset
from transfer.cli import main
from transfer.pipeline import resume


def _history(run_dir):
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("interrupt, after_rows, options", [
    (signal.SIGINT, 2, []), (signal.SIGKILL, 6, []), (signal.SIGKILL, 6, ["--no-cache"])],
    ids=["ctrl-c-during-head", "kill-during-fine-tune", "kill-during-fine-tune-no-cache"])
def test_interrupted_training_resumes_from_the_last_completed_epoch(tmp_path, caplog,
                                                                     interrupt, after_rows,
                                                                     options):
    dataset = make_dataset(tmp_path / "stripes", per_class=16, validation=8)
    runs = tmp_path / "runs"
    # As `python -m transfer`, with Python's own Ctrl-C handler even when these tests run with
    # SIGINT ignored (a shell's background job without job control): the child inherits that.
    command = [sys.executable, "-c", "import signal, sys; from transfer.cli import main; "
               "signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(main())",
               "train", "--data", str(dataset),
               "--backbone", TINY_BACKBONE, "--weights", "none", "--image-size", str(TINY_SIZE),
               "--batch-size", "8", "--head", "adam", "--epochs", "4", "--fine-tune-epochs", "3",
               "--fine-tune-from", TINY_CUT, "--patience", "20", "--no-evaluate",
               "--runs-dir", str(runs), *options]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline and process.poll() is None:
        found = list((runs / "stripes").glob("*")) if (runs / "stripes").is_dir() else []
        run_dir = found[0] if found else None
        if run_dir and len(_history(run_dir)) >= after_rows:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(interrupt)
    _, err = process.communicate(timeout=120)
    rows_before = _history(run_dir)
    assert not (run_dir / "summary.json").exists()
    if interrupt == signal.SIGINT:
        assert process.returncode == 130
        assert f"Continue with: python -m transfer train --resume {run_dir}" in err

    with caplog.at_level(logging.INFO, logger="transfer"):
        if interrupt == signal.SIGINT:  # as `make train DATA=stripes RESUME=1` does
            assert main(["train", "--data", str(dataset), "--runs-dir", str(runs),
                         "--resume"]) == 0
        else:
            resume(run_dir, verbose=0)
    rows = _history(run_dir)
    assert [int(row["epoch"]) for row in rows] == list(range(1, 8))
    assert [row["phase"] for row in rows] == ["head"] * 4 + ["fine_tune"] * 3
    # What was done before the interruption is kept, not redone (at most one epoch repeats).
    kept = rows_before[:-1]
    assert rows[:len(kept)] == kept
    resumed_after = int(caplog.text.split("resuming after epoch ")[1].split()[0].rstrip(")"))
    assert len(rows_before) - 1 <= resumed_after <= len(rows_before)
    for name in ("model.keras", "summary.json", "learning_curves.png"):
        assert (run_dir / name).is_file()
    fed = "on images (--no-cache)" if options else "on cached"  # the resumed phase's feed
    assert fed in caplog.text.split("resuming after epoch")[0].splitlines()[-1]
    assert not (run_dir / "backup").exists()  # checkpoints go once the phases finish


def test_resume_refuses_finished_runs_and_other_options(tiny_config, capsys):
    from transfer.pipeline import train

    run_dir = train(tiny_config(epochs=1, fine_tune_epochs=0), verbose=0)
    with pytest.raises(ValueError, match="has finished"):
        resume(run_dir)
    assert main(["train", "--resume", str(run_dir), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    settings = run_dir.parent / "settings.yaml"  # `make train CONFIG=settings.yaml RESUME=1`
    settings.write_text(f"data: {run_dir.parent.name}\nruns_dir: {run_dir.parents[1]}\n"
                        "epochs: 9\n")
    # A run stopped before its split.csv was written.
    stopped_early = run_dir.parent / f"99991231-000000-{TINY_BACKBONE}"
    stopped_early.mkdir()
    (stopped_early / "config.json").write_text("{}")
    assert main(["train", "--config", str(settings), "--resume"]) == 2
    assert f"No unfinished run under {run_dir.parent}" in capsys.readouterr().err
    assert main(["train", "--config", str(settings), "--resume", str(run_dir)]) == 2
    assert "drop --config" in capsys.readouterr().err


def test_a_run_killed_after_its_last_phase_saves_the_trained_model_on_resume(tiny_config):
    import numpy as np

    from transfer.model import load_model
    from transfer.pipeline import train

    run_dir = train(tiny_config(epochs=2, fine_tune_epochs=1), verbose=0)
    images = np.random.default_rng(0).uniform(0, 255, (4, TINY_SIZE, TINY_SIZE, 3))
    trained = load_model(run_dir / "model.keras").predict(images, verbose=0)
    for name in ("summary.json", "model.keras"):  # killed while saving: every phase is done
        (run_dir / name).unlink()
    resume(run_dir, verbose=0)
    np.testing.assert_allclose(load_model(run_dir / "model.keras").predict(images, verbose=0),
                               trained, atol=1e-6)
