"""python -m train.plot: the metrics of real runs (tests/data/metrics) drawn into a PNG."""

import json
import pathlib
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from train import plot

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = REPO / "tests" / "data" / "metrics"
WORKDIRS = [RUNS / "mlp-tiny", RUNS / "transformer-tiny"]
# matplotlib's first two line colours (tab:blue, tab:orange), one per run, as RGB in [0, 1].
RUN_COLOURS = np.array([[31, 119, 180], [255, 127, 14]]) / 255


def test_reports_are_read_in_order():
    reports = plot.read_reports(WORKDIRS[0])
    assert [r["step"] for r in reports] == list(range(20, 201, 20))
    assert [r["step"] for r in reports if "eval/loss" in r] == [100, 200]


def test_one_panel_per_metric_and_one_line_per_run():
    runs = dict(zip(plot.run_names(WORKDIRS), map(plot.read_reports, WORKDIRS), strict=True))
    figure = plot.plot_runs(runs)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == [title for _, title in plot.PANELS]
    for ax, (metric, _) in zip(axes, plot.PANELS, strict=True):
        assert [line.get_label() for line in ax.lines] == ["mlp-tiny", "transformer-tiny"]
        steps, values = ax.lines[1].get_data()
        want = [(r["step"], r[metric]) for r in runs["transformer-tiny"] if metric in r]
        assert list(zip(steps, values, strict=True)) == want  # 10 points, or 2 for eval metrics
    legend = [text.get_text() for text in axes[0].get_legend().get_texts()]
    assert legend == ["mlp-tiny", "transformer-tiny"]


def test_command_line_writes_a_png_that_is_not_blank(tmp_path):
    out = tmp_path / "runs.png"
    result = subprocess.run(
        [sys.executable, "-m", "train.plot", *map(str, WORKDIRS), f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"Wrote {out}\n"
    pixels = matplotlib.image.imread(out)  # float RGBA in [0, 1]
    assert pixels.shape == (800, 1500, 4)  # 15 x 8 inches at 100 dpi
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05
    assert 0.02 < (rgb < 0.9).any(axis=-1).mean() < 0.5  # ink, but mostly white paper
    for colour in RUN_COLOURS:  # each run's lines are there
        assert (np.abs(rgb - colour).max(axis=-1) < 0.02).sum() > 500


def test_plotting_needs_no_jax(run_python):
    imported = run_python("import json, sys, train.plot; print(json.dumps(sorted(sys.modules)))")
    assert "jax" not in imported and "matplotlib.pyplot" not in imported  # no global backend


def test_run_names_are_the_folders_or_the_paths_where_two_share_one(tmp_path):
    assert plot.run_names(["runs/cnn", "runs/mlp/"]) == ["cnn", "mlp"]
    assert plot.run_names(["a/cnn", "b/cnn"]) == ["a/cnn", "b/cnn"]
    assert plot.default_out(["runs/cnn"]) == pathlib.Path("runs/cnn/metrics.png")
    assert plot.default_out(["runs/cnn", "runs/mlp"]) == pathlib.Path("metrics.png")


def bad_runs(tmp_path: pathlib.Path) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "broken").mkdir()
    good = json.dumps({"step": 1, "train/loss": 2.0})
    (tmp_path / "broken" / "metrics.jsonl").write_text(f'{good}\n{{"step": 2,\n')
    return {"tmp": str(tmp_path), "run": str(WORKDIRS[0])}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["{tmp}/none"],
            "none/metrics.jsonl does not exist; pass the workdir of a python -m train",
        ),
        (["{tmp}/empty"], "empty/metrics.jsonl holds no reports yet."),
        (["{tmp}/broken"], "broken/metrics.jsonl line 2 is not JSON"),
        (["{run}", "--out={tmp}/plot.txt"], r"--out=.*plot.txt: use one of the suffixes .*\.png"),
        ([], "the following arguments are required: WORKDIR"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, message, tmp_path, capsys):
    paths = bad_runs(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        plot.main([arg.format(**paths) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"error: .*{message}", err), err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.txt"))
