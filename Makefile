# The two commands of the README:
#   make demo   set up .venv, generate data/, train on the demo set, predict a volume, say where outputs are
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_RUN := runs/demo

.PHONY: demo test install data bench clean

# torch is pinned to the CPU wheel (constraints.txt) in the same command as the project, so pip never resolves
# pyproject.toml's torch range to a multi-GB CUDA build.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps pytorch3dunet
	touch $@

install: $(INSTALLED)

data: $(INSTALLED)
	$(BIN)/python -m unet3d_lightning.demo spheres data

demo: data
	rm -rf $(DEMO_RUN)
	$(BIN)/unet3d fit --config configs/demo.yaml
	$(BIN)/unet3d predict --config configs/demo_predict.yaml \
		--ckpt_path $(DEMO_RUN)/lightning_logs/version_0/checkpoints/best.ckpt
	@echo
	@echo "demo done:"
	@echo "  checkpoints: $(DEMO_RUN)/lightning_logs/version_0/checkpoints/"
	@echo "  logs:        tensorboard --logdir $(DEMO_RUN)/lightning_logs"
	@echo "  prediction:  $(DEMO_RUN)/predictions/val_0_predictions.h5"

test: $(INSTALLED)
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_predict.py

clean:
	rm -rf $(VENV) runs data/*.h5 data/demo
