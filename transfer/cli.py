"""Command line: python -m transfer {train,check,backbones,inspect,evaluate,export,serve,predict}.

The only module that prints.
"""

import argparse
import io
import logging
import sys
from pathlib import Path

log = logging.getLogger("transfer")


def run():
    """The `transfer` console script (also `python -m transfer`)."""
    sys.exit(main())


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if isinstance(sys.stdout, io.TextIOWrapper):  # print file names as they are, even non-UTF-8
        sys.stdout.reconfigure(errors="surrogateescape")
    if args.command is cmd_serve:  # before TensorFlow starts its threads
        from transfer.serve import returnable_memory

        returnable_memory()
    if args.command not in (cmd_check, cmd_backbones):  # the commands that need no TensorFlow
        from transfer.quiet import import_tensorflow

        import_tensorflow()
    from transfer.distribute import RESTART_STATUS, RestartNeeded

    try:
        return args.command(args) or 0
    except RestartNeeded as error:
        print(f"stopped: {error} (exit status {RESTART_STATUS})", file=sys.stderr)
        return RESTART_STATUS
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder of the user's that cannot be read or written
        if error.filename is None:
            raise
        print(f"error: {error.filename}: {error.strerror or error}; check that it exists and "
              "that you may read (or write) it.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser():
    parser = argparse.ArgumentParser(
        prog="transfer", description="Train, export and use transfer-learned image classifiers.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a classifier on a folder of images",
                                description="Settings: defaults < --config file < options.")
    train.set_defaults(command=cmd_train)
    train.add_argument("--config", help="YAML or JSON file of settings (keys as the options)")
    add_settings(train)
    train.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                       help="continue an interrupted run with its own config and split "
                            "(default: the newest unfinished run of --data, or of the --config "
                            "file's data)")

    check = commands.add_parser("check", help="check every image of a data set, without training")
    check.set_defaults(command=cmd_check)
    check.add_argument("data", nargs="?", help="data set name or folder (with --labels: "
                                               "where a relative label file is looked for)")
    add_settings(check, ("labels", "label_pattern", "multi_label"))
    check.add_argument("--quarantine", metavar="DIR",
                       help="move the files that fail into DIR (kept, never deleted)")

    backbones = commands.add_parser("backbones", help="list the backbone table")
    backbones.set_defaults(command=cmd_backbones)
    backbones.add_argument("--layers", metavar="BACKBONE",
                           help="list this backbone's layer names instead (cut candidates)")

    evaluate = commands.add_parser(
        "evaluate", help="write the evaluation report of a trained model on a folder of images")
    evaluate.set_defaults(command=cmd_evaluate)
    evaluate.add_argument("--model", required=True,
                          help="a run directory or its model.keras")
    evaluate.add_argument("data_folder", nargs="?", help="folder of <class>/ folders of "
                                                         "images, or of the --label-pattern "
                                                         "files")
    add_settings(evaluate, ("labels", "label_pattern"))
    add_settings(evaluate, ("tta",), default="as the run was trained")
    evaluate.add_argument("--output", help="where report.html, metrics.json and the PNGs go "
                                           "(default: the run directory)")
    evaluate.add_argument("--unknown", metavar="OTHER_FOLDER",
                          help="also measure how well the in-class score tells the images "
                               "from this folder's (none of the classes; searched "
                               "recursively)")

    inspect = commands.add_parser(
        "inspect", help="a backbone's convolution, pooling and per-pixel Dense layers: output "
                        "size, parameters, receptive field, stride and FLOPs")
    inspect.set_defaults(command=cmd_inspect)
    inspect.add_argument("backbone", help="backbone name; see `python -m transfer backbones`")
    inspect.add_argument("--image-size", type=int, help="input size (default: the backbone's)")

    export = commands.add_parser("export", help="export a trained run as a SavedModel")
    export.set_defaults(command=cmd_export)
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory holding model.keras")
    source.add_argument("--data", help="export the newest run of this data set")
    export.add_argument("--name", help="model name under --output (default: the data set name)")
    export.add_argument("--output", default="saved_models", help="default: saved_models")
    export.add_argument("--runs-dir", default="runs", help="default: runs")
    export.add_argument("--format", nargs="+", default=["savedmodel"],
                        choices=("savedmodel", "tflite", "onnx"),
                        help="also write TFLite (float32, float16, int8) and/or ONNX beside the "
                             "SavedModel, each checked against it (default: savedmodel only)")
    export.add_argument("--eval-images", type=int, default=1000,
                        help="validation images the export is checked and measured on")
    export.add_argument("--calibration-images", type=int, default=200,
                        help="training images that calibrate int8 quantization")
    add_settings(export, ("tta",), default="as the run was trained")

    serve = commands.add_parser("serve", help="serve an export over TensorFlow Serving's REST API")
    serve.set_defaults(command=cmd_serve)
    serve.add_argument("model_dir", help="saved_models/<name>: the folder of integer versions")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8501, help="default: 8501, as TensorFlow Serving")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="most instances run together (default: 32)")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="how long a batch waits for more requests (default: 2)")
    serve.add_argument("--max-image-mb", type=float, default=4.0,
                       help="largest encoded image accepted (default: 4)")
    serve.add_argument("--max-body-mb", type=float, default=32.0,
                       help="largest request body accepted (default: 32)")
    serve.add_argument("--max-instances", type=int, default=256,
                       help="most instances (images) in one request; more get a 413 (default: 256)")
    serve.add_argument("--max-request-mpx", type=float, default=64.0,
                       help="most pixels one request's images may declare in all, in millions; "
                            "more get a 413 (default: 64)")
    serve.add_argument("--read-timeout-s", type=float, default=30.0,
                       help="seconds a request body may take to arrive; slower gets a 408 "
                            "(default: 30)")

    predict = commands.add_parser("predict", help="classify image files and folders")
    predict.set_defaults(command=cmd_predict)
    predict.add_argument("--model", required=True,
                         help="a .keras file, a run directory or a SavedModel folder")
    predict.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    predict.add_argument("--output", help="write CSV or JSON (by suffix) here instead of stdout")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--classes", help="the class names you expect the model to have "
                                           "(comma-separated, or a file of names); a model "
                                           "with other classes is an error")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--explain", metavar="DIR",
                         help="also write a Grad-CAM overlay of each image into DIR (needs a "
                              "run directory or .keras model)")
    add_settings(predict, ("tta",), default="as the run was trained")
    predict.add_argument("--reject", action="store_true",
                         help="label images whose in-class score is below the model's "
                              "threshold 'unknown' (the columns score and unknown are "
                              "always written)")
    return parser


def add_settings(parser, names=None, default=None):
    """An option per TrainConfig field (or those of `names`), as the field declares it:
    --fine-tune-epochs for fine_tune_epochs, --augment/--no-augment for a bool. Defaults stay
    None ("not given"), so a config file's value is only overridden by an option typed;
    `default` says in the help what that means where it is not TrainConfig's default."""
    import dataclasses

    from transfer.config import TrainConfig, value_type

    for field in dataclasses.fields(TrainConfig):
        if names is not None and field.name not in names:
            continue
        kind = value_type(field)
        shown = ("on" if field.default else "off") if kind is bool else field.default
        help_text = field.metadata["help"] + (f" (default: {default})" if default else
                                              "" if field.default is None else
                                              f" (default: {shown})")
        option = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(option, type=kind, choices=field.metadata["choices"],
                                help=help_text)


def cmd_train(args):
    from transfer import config

    overrides = {key: value for key, value in vars(args).items()
                 if key in config.field_names() and value is not None}
    verbose = 1 if sys.stdout.isatty() else 2
    if args.resume:
        # The run keeps its own settings; --data, --labels, --runs-dir and a config file's
        # data, labels and runs_dir only say where to look for the newest unfinished run.
        given = (sorted(set(overrides) - {"data", "labels", "runs_dir"})
                 + (["config"] if args.config and args.resume != "latest" else []))
        if given:
            raise ValueError(f"--resume continues a run with its own settings; drop "
                             f"{', '.join('--' + key.replace('_', '-') for key in given)}.")
        from transfer.data import dataset_name
        from transfer.layouts import resolve
        from transfer.pipeline import resume
        from transfer.runs import latest_run

        run_dir = args.resume
        if run_dir == "latest":
            settings = config.load_file(args.config) if args.config else None
            cfg = config.resolve(settings, overrides)  # a mistake in the file is still named
            name = resolve(cfg.data, cfg.labels)[0] if cfg.labels else dataset_name(cfg.data)
            run_dir = latest_run(Path(cfg.runs_dir) / name, finished=False)
        resume(run_dir, verbose)
        return
    settings = config.load_file(args.config) if args.config else None
    cfg = config.resolve(settings, overrides)

    from transfer.pipeline import train

    train(cfg, verbose)


def cmd_check(args):
    from transfer import check, layouts

    if args.data is None and args.labels is None:
        raise ValueError("Give a data set name or folder, or --labels FILE.")
    if args.quarantine and Path(args.quarantine).exists() and not Path(args.quarantine).is_dir():
        raise ValueError(f"--quarantine {args.quarantine} is a file; expected a folder to move "
                         "the files that fail into.")
    data_name, data_dir, labels = layouts.resolve(args.data, args.labels)
    layout, reports = layouts.check_dataset(data_dir, labels, args.label_pattern,
                                            args.multi_label)
    bad = [item for report in reports for item in report.bad]
    for path, reason in bad:  # one line each, whatever the file's name holds
        print(f"{check.printable(path)}\t{check.printable(reason)}")
    for message in check.warnings_for(reports):
        print(f"warning: {check.printable(message)}", file=sys.stderr)
    print(check.printable(check.summary_line(data_name, layout.classes, reports,
                                             layout.describe())))
    if args.quarantine:
        moved = check.quarantine(bad, layout.root, Path(args.quarantine))
        print(f"moved {len(moved)} file(s) to {args.quarantine}")
    return 1 if bad else 0


def cmd_backbones(args):
    from transfer.backbones import BACKBONES, get_spec

    if args.layers:
        from transfer.quiet import import_tensorflow

        import_tensorflow()
        spec = get_spec(args.layers)
        backbone = spec.build(spec.default_size, weights=None)
        for index, layer in enumerate(backbone.layers):
            print(f"{index:4d}  {layer.name}")
        return
    # Read from the table alone, so it is instant: `transfer inspect NAME` builds one backbone
    # and gives its parameters and FLOPs.
    print(f"{'name':<18} {'input':>5} {'min':>4} {'preprocess':<10} cut")
    for spec in BACKBONES.values():
        print(f"{spec.name:<18} {spec.default_size:>5} {spec.min_size:>4} "
              f"{spec.preprocessing:<10} {spec.cut}")


def cmd_evaluate(args):
    from transfer.evaluate import evaluate_folder

    print(evaluate_folder(args.model, args.data_folder, args.output, args.labels,
                          args.label_pattern, args.tta, args.unknown) / "report.html")


def cmd_inspect(args):
    from transfer.inspect import format_table, inspect_backbone

    rows, backbone = inspect_backbone(args.backbone, args.image_size)
    print(format_table(rows, backbone))


def _require_positive(args, *keys):
    for key in keys:
        if not getattr(args, key) > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive; "
                             f"received {getattr(args, key)}.")


def cmd_export(args):
    _require_positive(args, "eval_images", "calibration_images")
    from transfer.data import dataset_name
    from transfer.pipeline import export_run
    from transfer.runs import latest_run

    run_dir = (Path(args.run) if args.run
               else latest_run(Path(args.runs_dir) / dataset_name(args.data)))
    target, reports = export_run(run_dir, args.name, args.output,
                                 [f for f in args.format if f != "savedmodel"],
                                 args.eval_images, args.calibration_images, args.tta)
    if reports is not None:
        from transfer.formats import table

        print(table(reports))
        failed = [r.describe_failure() for r in reports if not r.ok()]
        if failed:
            raise ValueError(f"{'; '.join(failed)}. The files are kept; the numbers are in "
                             f"{target / 'assets.extra' / 'formats.json'}.")
    print(target)


def cmd_serve(args):
    from transfer.serve import serve

    _require_positive(args, "max_batch", "max_image_mb", "max_body_mb", "max_instances",
                      "max_request_mpx", "read_timeout_s")
    if args.batch_wait_ms < 0:
        raise ValueError(f"--batch-wait-ms must be 0 or more; received {args.batch_wait_ms}.")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535; received {args.port}.")
    serve(args.model_dir, args.host, args.port, args.max_batch, args.batch_wait_ms,
          args.max_image_mb, args.max_body_mb, args.max_instances, args.max_request_mpx,
          args.read_timeout_s)


def cmd_predict(args):
    from transfer.files import atomic_path, require_writable
    from transfer.images import IMAGE_EXTENSIONS
    from transfer.predict import (Predictor, check_classes, error_row, expand_paths, explain,
                                  predict_paths, write_rows)

    _require_positive(args, "top_k", "batch_size")
    if args.output and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; expected a file name ending in "
                         ".csv or .json.")
    if args.explain and Path(args.explain).exists() and not Path(args.explain).is_dir():
        raise ValueError(f"--explain {args.explain} is a file; expected a folder to write the "
                         "Grad-CAM overlays into.")
    # Before anything is predicted: no work is lost to a folder that cannot be written.
    if args.output:
        require_writable(Path(args.output).parent, f"--output {args.output}")
    if args.explain:
        require_writable(args.explain, f"--explain {args.explain}")
    paths, problems, skipped = expand_paths(args.images)
    if not paths and not problems:
        raise FileNotFoundError(f"No images found in {', '.join(args.images)} ({len(skipped)} "
                                "non-image or hidden file(s) skipped); expected files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)}.")
    predictor = Predictor(args.model, args.tta)
    if args.explain:
        predictor.require_keras("--explain")
    if args.classes:
        check_classes(predictor, args.classes)
    rows = [error_row(path, reason) for path, reason in problems]
    rows += predict_paths(predictor, paths, args.batch_size, args.top_k, reject=args.reject)
    if args.explain:
        explain(predictor, rows, args.explain)
    fmt = "json" if args.output and Path(args.output).suffix.lower() == ".json" else "csv"
    if args.output:
        with atomic_path(args.output) as temporary, open(
                temporary, "w", newline="", encoding="utf-8",
                errors="surrogateescape") as handle:  # file names as printed to stdout
            write_rows(rows, handle, fmt)
    else:
        write_rows(rows, sys.stdout, fmt)
    failed = [row for row in rows if row["error"]]
    log.info("%d images: %d predicted, %d failed%s%s", len(rows), len(rows) - len(failed),
             len(failed), f"; {len(skipped)} non-image or hidden file(s) skipped in the folders"
             if skipped else "", f"; wrote {args.output}" if args.output else "")
    return 1 if failed else 0
