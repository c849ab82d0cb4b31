"""ctm: merge several LoRA adapters into one low-rank adapter with Compress-then-Merge."""

__version__ = "0.1.0"
