"""The benchmark, its performance model and the GPU tuning run; not part of the installed product.

Its scripts run as ``python bench/<script>.py`` (see bench/NOTES.md and the Makefile);
its modules import each other and tools/ as packages of the repository root
(``from bench import report``). A script run that way adds the root to the end of its
path (an installed residual_fused still comes first); the tests import the modules the
same way (pytest puts the root on the path).
"""
