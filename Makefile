# The two entry points of the README. Both set up ./.venv (or use the active
# virtualenv) on first use; neither replaces an installed torch.
.PHONY: bench test gpu-check

bench:
	bash scripts/bench.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

# On a CUDA machine: build for the present GPU, CUDA tests, compute-sanitizer,
# benchmark, ncu; logs in bench/out/gpu-check. Stages: make gpu-check ARGS="build tests".
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)
