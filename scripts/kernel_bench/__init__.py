"""The pieces of scripts/bench_kernels.py: jobs (what is run), reference (RWKV-LM's kernels), plan,
variants (inputs and calls), runner (builds, timing, worker processes) and report (the table and files)."""
