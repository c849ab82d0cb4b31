"""How `ctm inspect a/ b/ …` shows its figures (multi_inspect.py): tables on a terminal, and with --plot a PNG of
the energy-kept curves and the overlap matrices (matplotlib, an optional extra)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ctm_cli.errors import OutputError, UsageError
from ctm_cli.untrusted import printable

# Ranks at which the terminal view reads the energy-kept curves (those up to the curves' length).
SHOWN_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def _cell(value: Any) -> Text:
    """Plain text (never rich markup), control characters escaped."""
    return Text(printable(str(value)))


def _short_names(names: list[str]) -> list[str]:
    """Module names without the dotted prefix they all share but its last part (`base_model.model.model.layers.0.…`
    and `….layers.1.…` → `layers.0.…`, `layers.1.…`)."""
    parts = [name.split(".") for name in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[max(common - 1, 0) :]) for p in parts]


def print_diagnosis(data: dict[str, Any], console: Console | None = None) -> None:
    """The diagnosis as tables: per adapter (dominance, overlaps with every other), the energy kept by one rank
    for every module, and the modules that need the largest rank."""
    console = console or Console()
    total, sources = data["total"], data["adapters"]
    console.print(
        _cell(
            f"{len(sources)} adapters of {data['base_model'] or 'an unnamed base model'}, {total['modules']} modules "
            "(figures from the core space; all of them, cosine and conflict too, with --json)"
        ),
        highlight=False,
    )
    adapters = Table(title="adapters: dominance ‖ΔW_t‖ / mean, and overlap (mean cos² of principal angles)")
    for column in ("#", "adapter", "dominance", *(f"B·{i + 1}" for i in range(len(sources))),
                   *(f"A·{i + 1}" for i in range(len(sources)))):  # fmt: skip
        adapters.add_column(column, justify="left" if column == "adapter" else "right")
    for index, source in enumerate(sources):
        adapters.add_row(
            str(index + 1),
            _cell(source),
            f"{total['dominance'][index]:.2f}",
            *(f"{value:.2f}" for value in total["column_overlap"][index]),
            *(f"{value:.2f}" for value in total["row_overlap"][index]),
        )
    console.print(adapters)
    console.print(_cell("B·j: overlap of column spaces with adapter j; A·j: of row spaces (1 = same, 0 = orthogonal)"))
    curves = Table(title="energy of the full-rank merge kept with one rank r for every module")
    width = min(len(curve) for curve in total["curves"].values())
    ranks = [rank for rank in SHOWN_RANKS if rank <= width]
    for column in ("merge", *(f"r={rank}" for rank in ranks), "rank for 90 / 95 / 99%"):
        curves.add_column(column, justify="left" if column == "merge" else "right")
    for label, curve in total["curves"].items():
        keeps = " / ".join(str(rank) for rank in total["ranks_for_keep"][label].values())
        curves.add_row(label, *(f"{curve[rank - 1]:.1%}" for rank in ranks), keeps)
    console.print(curves)
    worst = Table(title="modules needing the largest rank to keep 95%")
    for column in ("module", "rank for 95%", "overlap B", "overlap A"):
        worst.add_column(column, justify="left" if column == "module" else "right")
    names = _short_names([row["name"] for row in data["worst_modules"]])
    for name, row in zip(names, data["worst_modules"], strict=True):
        worst.add_row(
            _cell(name), str(row["rank_for_95"]), f"{row['mean_column_overlap']:.2f}", f"{row['mean_row_overlap']:.2f}"
        )
    console.print(worst)


def _pyplot() -> Any:
    """matplotlib's pyplot without a display, or a usage error saying how to install it."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'ctm-merge[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def check_plot_target(path: Path) -> None:
    """Refuse, before any work, a --plot file that is not a .png or whose folder does not exist; and check
    that matplotlib is there."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: the file must end in .png")
    if not path.parent.is_dir():
        raise OutputError(f"--plot {path}: the folder {path.parent} does not exist")
    _pyplot()


def save_plot(data: dict[str, Any], path: Path) -> None:
    """A PNG of the energy-kept curves (one rank for every module, with the 90 / 95 / 99% lines) and of the two
    overlap matrices."""
    pyplot = _pyplot()
    total, tasks = data["total"], len(data["adapters"])
    figure, (curves, columns, rows) = pyplot.subplots(1, 3, figsize=(15, 4.5), width_ratios=(1.4, 1, 1))
    for label, curve in total["curves"].items():
        curves.plot(range(1, len(curve) + 1), curve, label=label)
    for keep in (0.90, 0.95, 0.99):
        curves.axhline(keep, color="grey", linewidth=0.6, linestyle=":")
    curves.set(xlabel="rank r (every module)", ylabel="share of the full-rank merge's energy kept", ylim=(0, 1.01))
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.legend()
    labels = [str(index + 1) for index in range(tasks)]
    for axis, key, title in ((columns, "column_overlap", "column spaces (B)"), (rows, "row_overlap", "row spaces (A)")):
        image = axis.imshow(total[key], vmin=0, vmax=1, cmap="viridis")
        axis.set(title=f"overlap of {title}", xticks=range(tasks), yticks=range(tasks))
        axis.set_xticklabels(labels)
        axis.set_yticklabels(labels)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(", ".join(f"{index + 1}: {source}" for index, source in enumerate(data["adapters"]))[:200])
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise OutputError(f"--plot {path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        pyplot.close(figure)
