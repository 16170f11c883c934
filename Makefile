# The README's commands (make demo, make test). Each target does its own set-up; `make setup` is a no-op once complete.
PY      := .venv/bin/python
STAMP   := .venv/.setup-complete
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ACCEL   := .venv/bin/accelerate

.PHONY: setup data demo baselines baselines-encoder test test-fast clean

setup: $(STAMP) data

# FFCV (the fast loading path) builds against opencv and libturbojpeg: installed with apt as root;
# without them everything else is set up and data.format=ffcv says how to add it.
FFCV_APT := libopencv-dev libturbojpeg0-dev pkg-config

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FFCV_APT); \
	fi
	if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(PY) -m pip install -q -e '.[dev,ffcv]'; \
	else \
	  $(PY) -m pip install -q -e '.[dev]'; \
	  echo "note: FFCV skipped (needs: apt-get install $(FFCV_APT)); the torchvision loader works without it"; \
	fi
	touch $(STAMP)

# Fashion-MNIST is the real data for CPU runs (Debian package dataset-fashion-mnist).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or pass data.root=/dir/with/idx.gz/files"; \
	  fi; \
	fi

demo: setup
	$(ACCEL) launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process $$(nproc) \
	  pretrain/main.py --config configs/fmnist_cpu.yaml
	$(PY) eval/main.py --config configs/probe_fmnist.yaml weights=runs/fmnist_cpu/export

# The supervised references on Fashion-MNIST, stored in baselines/ (tracked): every later eval on the same
# data and protocol reports them instead of training. The AlexNet trained with early stopping (1 to 1.5 hours on
# 2 CPU cores, minutes on a GPU), then the demo's encoder trained with labels for the demo's epochs
# (baselines-encoder, a few minutes: it pretrains the demo first if needed, for its architecture and epochs).
baselines: setup
	$(PY) eval/main.py --config configs/baselines_fmnist.yaml
	$(MAKE) baselines-encoder

baselines-encoder: setup
	$(ACCEL) launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process $$(nproc) \
	  pretrain/main.py --config configs/fmnist_cpu.yaml
	$(PY) eval/main.py --config configs/probe_fmnist.yaml weights=runs/fmnist_cpu/export store_baselines=true \
	  baselines.alexnet_supervised=false random_init=false raw_pixels=false out=runs/fmnist_cpu/baselines

# Both lint first (ruff: pyflakes, isort, bugbear, line length; settings in pyproject.toml).
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not gpu" -n auto --dist loadgroup --durations=25

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow and not gpu" -n auto --dist loadgroup

clean:
	rm -rf runs .pytest_cache
