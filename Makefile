# The two entry points of the README. Both set up ./.venv (or use the active
# virtualenv) on first use; neither replaces an installed torch.
.PHONY: bench test gpu-check gpu-tune fuzz mutants coverage

bench:
	bash scripts/bench.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

# On a CUDA machine: build for the present GPU, CUDA tests, compute-sanitizer,
# benchmark, ncu; logs in bench/out/gpu-check. Stages: make gpu-check ARGS="build tests".
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

# On a CUDA machine, one call of at most 6 minutes (build included): every provider side
# by side over the sweep and the decode shapes, results appended to
# bench/out/gpu-tune/results.csv as they come (bench/gpu_tune.py). Carry peers' wheels
# fetched by scripts/fetch_peers.sh in peers/. ARGS="--dry-run" prints the plan anywhere.
gpu-tune:
	bash scripts/gpu_tune.sh $(ARGS)

# Longer runs of the emulated checks CI samples; each sets up the test environment first.
# The fuzzer for ARGS (default: 30 minutes with a fresh seed), e.g. ARGS="--seconds 600 --seed 7".
fuzz:
	bash scripts/run_tests_tool.sh tests/fuzz_emulated.py $(or $(ARGS),--seconds 1800)

# Every generated mutant of csrc/kernels not yet in tests/mutants_record.txt through the
# mutant suite (hours on 2 cores; ARGS="--all --record --limit N" for a round of N), then
# the whole hand-written catalogue (CI runs a random share of each).
mutants:
	bash scripts/run_tests_tool.sh tests/mutants.py $(or $(ARGS),--all --record --jobs $$(nproc))
	RESIDUAL_FUSED_HAND_MUTANTS=all bash scripts/run_tests_tool.sh -m pytest -q tests/test_emulator_mutations.py

# Line and branch coverage of csrc/kernels under the whole emulated suite.
coverage:
	bash scripts/run_tests_tool.sh tests/kernel_coverage.py $(ARGS)
