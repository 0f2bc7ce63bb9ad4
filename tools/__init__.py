"""Tooling for developing the kernels of csrc/kernels; not part of the installed product.

The wheel holds the ``residual_fused`` package only (pyproject.toml); this package is
used from a checkout, by tests/ and bench/:

- ``cubin``: compiles the kernel sources with nvcc and reads what the compiled code
  says about itself (registers, shared memory, spills, launch bounds, SASS), cached
  under build/kernel-audit/;
- ``sass``: reads that SASS (global access widths, local memory, dependent global
  round trips per row iteration) for the static audit (bench/sass_audit.py) and the
  performance model's kernel facts (bench/model_facts.py);
- ``cuda_emulator`` with ``emulator/`` (its C++ sources): runs the CUDA kernels on the
  CPU with checked memory, barriers and launch rules, for the emulated tests, the
  fuzzer, the mutants and the coverage run, and for the launch plans of the audit.

Import it from the repository root (``from tools import cubin``): pytest puts the root
on the path (``pythonpath`` in pyproject.toml), scripts/run_tests_tool.sh and the GPU
scripts put it on PYTHONPATH, and the bench scripts add it when run as scripts.
"""
