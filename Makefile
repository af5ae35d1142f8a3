# sessiongate: every target sets itself up (virtualenv, dependencies, generated code).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_DIR := protos
PROTO_SRC := $(PROTO_DIR)/sessiongate/v1/session_service.proto
PROTO_GEN := $(PROTO_DIR)/sessiongate/v1/session_service_pb2.py
ARGS ?=

.PHONY: setup proto proto-check run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Generated code is committed; regenerate after editing the proto.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py $(PROTO_DIR)

# Fails when the committed generated code is not what the proto produces.
proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check $(PROTO_DIR)

run: $(STAMP)
	$(PY) -m server $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
