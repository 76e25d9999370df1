"""python predict.py --model PATH IMAGES... (the same as `python -m transfer predict`)."""

import sys

from transfer.cli import main

sys.exit(main(["predict", *sys.argv[1:]]))
