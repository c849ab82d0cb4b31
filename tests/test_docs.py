"""README.md held to the code: the options table against `ctm merge`'s options and the recipe's defaults, the
recipe example's keys against the schema, the methods and rules against the registries, the exit codes against
errors.py, the list of modules against ctm_cli/, and the test command against .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main
import yaml

from ctm_cli.cli import app
from ctm_cli.errors import EXIT_CODES
from ctm_cli.methods import METHODS
from ctm_cli.recipe import DEFAULTS, RECIPE_KEYS, SCHEMA
from ctm_cli.rules import RULES

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README's text from a heading line to the next heading of any level."""
    start = README.index(f"\n{title}\n") + len(title) + 2
    following = re.search(r"\n#+ ", README[start:])
    return README[start : start + following.start()] if following else README[start:]


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table under `header` in `text`."""
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_options_table_lists_every_option_of_ctm_merge_with_the_recipe_defaults():
    rows = table(section("### `ctm merge`"), "| option | default | meaning |")
    documented = {  # `-c, --config FILE`: the flags before the value's name
        flag: default for flags, default, _ in rows for flag in re.findall(r"(?<![\w-])--?[\w-]+", flags)
    }
    command = typer.main.get_command(app).commands["merge"]  # type: ignore[attr-defined]
    options = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}
    assert set(documented) == {flag for flag in options if flag.startswith("-")} - {"--help"}
    for name, (_, setting) in SCHEMA.items():
        default = getattr(DEFAULTS, name)
        if setting.flags and default is not None and not isinstance(default, bool):
            assert str(default) in documented[setting.flags[0]], (name, default)


def test_recipe_example_has_every_key_of_the_schema():
    example = re.search(r"```yaml\n(.*?)```", section("### Recipes"), re.DOTALL)
    assert example is not None
    assert tuple(yaml.safe_load(example[1])) == RECIPE_KEYS


def _defined(block: str) -> tuple[set[str], set[str]]:
    """Names in backticks in a block of the Methods section, and the names that open its sub-items."""
    mentioned = set(re.findall(r"`(\w+)`", block))
    opening = set(re.findall(r"^  - `(\w+)`", block, re.MULTILINE))
    return mentioned, opening


def test_methods_and_rules_lists_match_the_registries():
    text = section("## Methods")
    methods_block = text[text.index("- **Methods**") : text.index("- **Rules**")]
    rules_block = text[text.index("- **Rules**") :]
    for block, registry in ((methods_block, METHODS), (rules_block, RULES)):
        mentioned, opening = _defined(block)
        assert set(registry) <= mentioned  # every method (rule) is described
        assert opening <= set(registry)  # and no item describes one that is gone


def test_exit_codes_table_matches_errors_py():
    rows = table(section("### Exit codes"), "| code | meaning |")
    assert [int(code) for code, _ in rows] == list(EXIT_CODES)


def test_every_module_is_in_the_development_list():
    text = section("## Development")
    modules = sorted(path for path in (ROOT / "ctm_cli").glob("*.py") if not path.name.startswith("__"))
    missing = [path.name for path in modules if f"`ctm_cli/{path.name}`" not in text]
    assert not missing
    assert "`ctm_cli/methods/`" in text


def test_ci_runs_the_quick_start_test_command():
    quick_start = re.search(r"```bash\n(.*?)```", section("## Quick start"), re.DOTALL)
    assert quick_start is not None
    command = next(line for line in quick_start[1].splitlines() if "--dev" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.split("  #")[0].strip() in ci
