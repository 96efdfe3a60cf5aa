# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo

.PHONY: demo test install install-dev fashion-mnist clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The package and its dependencies (torch from the package registry, as a user installs it).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Offline, Fashion-MNIST comes from Debian's package; with internet, torchvision downloads it when
# this step cannot install it (not root, no apt), so a failure here is not fatal.
fashion-mnist:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "could not install dataset-fashion-mnist; torchvision will try to download Fashion-MNIST"; \
	fi

demo: install fashion-mnist
	$(BIN)/python -m decorr.demo --out $(DEMO_DIR)

# The tests read Fashion-MNIST from Debian's package, like the demo: the same data step first.
test: install-dev fashion-mnist
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_DIR)
