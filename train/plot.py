"""Command line: python -m train.plot WORKDIR [WORKDIR ...] [--out=FILE.png]

Plots the metrics.jsonl of one or more runs side by side: train and eval loss and accuracy, the
learning rate and the training speed, one panel each, one line per run, each run named by its
workdir. The figure goes to FILE (default: WORKDIR/metrics.png for one run, metrics.png here for
several). Needs matplotlib, drawn with its Agg renderer (no display); not JAX. Bad input ends with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from train import cli

# (metric of metrics.jsonl, panel title), in the order of the 2 x 3 grid.
PANELS = (
    ("train/loss", "train loss"),
    ("train/accuracy", "train accuracy"),
    ("train/learning_rate", "learning rate"),
    ("eval/loss", "eval loss"),
    ("eval/accuracy", "eval accuracy"),
    ("train/steps_per_second", "train steps / s"),
)

Reports = list[dict[str, float]]


def read_reports(workdir: str | pathlib.Path) -> Reports:
    """The reports of `workdir`/metrics.jsonl in order; one-line errors for a missing, empty or
    broken file."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass the workdir of a python -m train run."
        )
    reports = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            report = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error.msg}).") from None
        if not isinstance(report, dict) or "step" not in report:
            raise ValueError(f"{path} line {number} is not a report with a step.")
        reports.append(report)
    if not reports:
        raise ValueError(f"{path} holds no reports yet.")
    return reports


def run_names(workdirs: Sequence[str | pathlib.Path]) -> list[str]:
    """Legend names: each workdir's last folder name, or the paths as given where two share it."""
    names = [pathlib.Path(w).resolve().name or str(w) for w in workdirs]
    return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def plot_runs(runs: dict[str, Reports]) -> Figure:
    """A figure of PANELS with one line per run (`runs`: legend name -> reports)."""
    figure = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg renderer, for this figure only: nothing process-wide
    axes = figure.subplots(2, 3, sharex=True).ravel()
    for ax, (metric, title) in zip(axes, PANELS, strict=True):
        for name, reports in runs.items():
            points = [(r["step"], r[metric]) for r in reports if metric in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[3:]:
        ax.set_xlabel("step")
    axes[0].legend(loc="upper right", fontsize="small")
    return figure


def default_out(workdirs: Sequence[str]) -> pathlib.Path:
    """WORKDIR/metrics.png for one run; metrics.png in the current directory for several."""
    if len(workdirs) == 1:
        return pathlib.Path(workdirs[0]) / "metrics.png"
    return pathlib.Path("metrics.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m train.plot", description=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="Workdirs of runs.")
    parser.add_argument("--out", help="Image file (.png, .svg, .pdf, ...).")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else default_out(args.workdirs)
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if out.suffix[1:].lower() not in supported:
        suffixes = ", ".join(f".{suffix}" for suffix in sorted(supported))
        cli.fail(f"--out={out}: use one of the suffixes {suffixes}.")
    try:
        runs = dict(zip(run_names(args.workdirs), map(read_reports, args.workdirs), strict=True))
        figure = plot_runs(runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except (FileNotFoundError, ValueError, OSError) as error:
        cli.fail(error)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
