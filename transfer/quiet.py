"""TensorFlow's C++ start-up lines, kept off the terminal; its real warnings and errors are not.

As its libraries load and it first looks for devices, TensorFlow's C++ code writes straight to
file descriptor 2, partly before any of its own settings are read (TF_CPP_MIN_LOG_LEVEL does not
silence the absl and cudart lines): every command would start with the same lines about CUDA
drivers and CPU instructions. import_tensorflow() does that loading with descriptor 2 pointed
at a temporary file, then writes back every line that is not one of those.
"""

import logging
import os
import re
import sys
import tempfile

STARTUP_LINES = re.compile("|".join((
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
    r"cuda_platform\.cc:\d+\] failed call to cuInit: .*\(303\)",  # 303: no CUDA driver
    r"cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu\w+ factory",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*rebuild TensorFlow",
    r"oneDNN custom operations are on",
    r"TF-TRT Warning: Could not find TensorRT",
    r"mlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is not enabled",
)))

_loaded = False


def import_tensorflow():
    """Import TensorFlow and find its devices, passing on only the lines worth reading."""
    global _loaded
    if _loaded:
        return
    # C++ INFO lines from then on are noise too; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
            # Its Python INFO lines (one per collective, one per checkpoint saved, some through
            # absl) are noise beside this tool's own; its warnings still show.
            for name in ("tensorflow", "absl"):
                logging.getLogger(name).setLevel(logging.WARNING)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not STARTUP_LINES.search(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
    _loaded = True
