# make install; make train DATA=cats_dogs [BACKBONE=...] [CONFIG=file.yaml] [ARGS="--epochs 5"]
# make train DATA=cats_dogs RESUME=1 continues the newest interrupted run; make check DATA=...
# DATA's layout is found from its folder (README "Data"); ARGS="--labels FILE" for a label file
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRANSFER := $(VENV)/bin/transfer
DATA ?= cats_dogs
RUN ?=
# DATA is a data set's name (under $TRANSFER_DATA_HOME or data/) or a folder; runs and exports
# are filed under the name, or the folder's own name (links resolved). make cannot take folder
# paths with spaces here: use .venv/bin/transfer for those.
IS_FOLDER := $(wildcard $(DATA)/.)
NAME := $(if $(IS_FOLDER),$(notdir $(realpath $(DATA))),$(DATA))
DATA_DIR := $(if $(IS_FOLDER),$(DATA),$(or $(TRANSFER_DATA_HOME),data)/$(DATA))
# make predict's images: the data set's validation/ (or val/, valid/), else test/, else all of it
IMAGES ?= $(firstword $(wildcard $(addprefix $(DATA_DIR)/,validation val valid test)) $(DATA_DIR))

# With CONFIG and no DATA given, the config file's data: setting is used.
TRAIN_FLAGS := $(if $(and $(CONFIG),$(filter file,$(origin DATA))),,--data "$(DATA)") \
	$(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(CONFIG),--config "$(CONFIG)") \
	$(if $(RESUME),--resume) $(ARGS)

.PHONY: install install-mlflow train check export serve predict backbones test clean-venv

install: $(VENV)/.installed

# The project itself, editable, with the pinned dependencies of requirements.txt and pytest.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e '.[test]'
	touch $@

# MLflow, an optional extra (transfer train --mlflow); CI installs it for its tests.
install-mlflow: install
	$(PY) -m pip install --quiet -e '.[test,mlflow]'

train: install
	$(TRANSFER) train $(TRAIN_FLAGS)

check: install
	$(TRANSFER) check "$(DATA)" $(ARGS)

export: install
	$(TRANSFER) export $(if $(RUN),--run "$(RUN)",--data "$(DATA)")

serve: install
	$(TRANSFER) serve "saved_models/$(NAME)" $(ARGS)

predict: install
	@$(PY) predict.py --model "$(or $(MODEL),saved_models/$(NAME))" "$(IMAGES)"

backbones: install
	$(TRANSFER) backbones

# One pytest worker per core, at most 4, each test file on one worker (its fixtures made once);
# PYTEST_ARGS="-n 0" runs the suite in one process.
test: install
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
