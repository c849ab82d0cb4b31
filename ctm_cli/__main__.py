"""Allow `python -m ctm_cli` as an alias of the `ctm` console script."""

from ctm_cli.cli import run

run()
