"""Single-file LoRAs: kohya-ss / LyCORIS and diffusers `.safetensors` files read as adapters, merged, and written
back in their own style (`--format`). One module per key style (kohya.py, diffusers.py, registered in styles.py),
the LyCORIS module kinds and their exact lifts to LoRA factors (kinds.py), reading a file (single_file.py), and
the output's style and files (output.py), and what `ctm inspect` says of a style (blocks.py)."""

from ctm_cli.formats.blocks import describe_style
from ctm_cli.formats.output import FORMATS, PEFT, adapter_files, align_names, output_style, style_of
from ctm_cli.formats.single_file import SingleFile, open_single_file

__all__ = [
    "FORMATS", "PEFT", "SingleFile", "adapter_files", "align_names", "describe_style", "open_single_file",
    "output_style", "style_of",
]  # fmt: skip
