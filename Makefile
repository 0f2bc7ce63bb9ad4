# The two entry points of the README. Both set up ./.venv (or use the active
# virtualenv) on first use; neither replaces an installed torch.
.PHONY: bench test

bench:
	bash scripts/bench.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)
