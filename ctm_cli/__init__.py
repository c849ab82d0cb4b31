"""ctm: merge several LoRA adapters into one low-rank adapter with Compress-then-Merge."""

import os

__version__ = "0.1.0"

# MKL, torch's BLAS on x86 CPUs, may round a product differently by where its output lies in memory (a matrix alone,
# or further into a batch) unless its strict reproducibility mode is on; a CPU merge repeats bit for bit whatever the
# grouping (fixed_order.py) only with it. MKL reads this at its first call, hence here; a value already set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
