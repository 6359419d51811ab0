"""benchmarks/chaos.py deletes only what it made, and reads TensorBoard scalars exactly (no JAX)."""

import importlib.util
import pathlib

import pytest
from tensorboardX import SummaryWriter

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contents(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_new_or_empty_workdir_gets_the_marker(chaos, tmp_path):
    new = tmp_path / "a" / "new"
    chaos.prepare_workdir(new)
    assert contents(new) == [chaos.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    chaos.prepare_workdir(empty)
    assert contents(empty) == [chaos.MARKER]


def test_a_workdir_chaos_made_is_emptied_but_not_what_its_links_point_to(chaos, tmp_path):
    workdir, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    chaos.prepare_workdir(workdir)
    (workdir / "reference" / "checkpoints").mkdir(parents=True)
    (workdir / "reference" / "metrics.jsonl").write_text("{}\n")
    (workdir / "chaos.log").write_text("log")
    (workdir / "link").symlink_to(elsewhere, target_is_directory=True)
    chaos.prepare_workdir(workdir)
    assert contents(workdir) == [chaos.MARKER]
    assert contents(elsewhere) == ["keep.txt"]


def test_a_full_workdir_that_chaos_did_not_make_is_refused_untouched(chaos, tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    before = contents(tmp_path)
    with pytest.raises(SystemExit) as refused:
        chaos.prepare_workdir(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"--workdir={tmp_path} is not empty and was not made by chaos.py" in message
    assert contents(tmp_path) == before
    # Through main, before any run starts.
    with pytest.raises(SystemExit):
        chaos.main(["--config=configs/mlp.py:tiny", f"--workdir={tmp_path}"])
    assert contents(tmp_path) == before


def test_a_file_as_workdir_is_refused(chaos, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("notes")
    with pytest.raises(SystemExit, match="is a file; name a new directory"):
        chaos.prepare_workdir(path)
    assert path.read_text() == "notes"


def test_tensorboard_scalars_are_read_as_written(chaos, tmp_path):
    # Two event files, as a stopped and resumed run leaves them; values as float32 (0.1 rounds).
    for suffix, steps in ((".from0000000000", (5, 10)), (".from0000000010", (15,))):
        writer = SummaryWriter(str(tmp_path / "tensorboard"), filename_suffix=suffix)
        for step in steps:
            writer.add_scalar("train/loss", step / 50, step)
            writer.add_scalar("train/steps_per_second", 1000.0 + step, step)
        writer.close()
    assert chaos.tensorboard_scalars(tmp_path) == [
        (5, "train/loss", 0.10000000149011612),
        (5, "train/steps_per_second", 1005.0),
        (10, "train/loss", 0.20000000298023224),
        (10, "train/steps_per_second", 1010.0),
        (15, "train/loss", 0.30000001192092896),
        (15, "train/steps_per_second", 1015.0),
    ]


def write_run(workdir: pathlib.Path, losses: dict[int, float], speed: float) -> pathlib.Path:
    writer = SummaryWriter(str(workdir / "tensorboard"))
    for step, loss in losses.items():
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/steps_per_second", speed, step)
    writer.close()
    return workdir


def test_tensorboard_values_are_compared_bitwise_but_for_the_timing(chaos, tmp_path):
    reference = write_run(tmp_path / "reference", {5: 2.5, 10: 1.25}, speed=100.0)
    same = write_run(tmp_path / "same", {5: 2.5, 10: 1.25}, speed=900.0)
    assert chaos.tensorboard_differences(reference, same) == []
    # 1.25 and the next float32 up: the same to 7 digits, not bitwise.
    next_up = write_run(tmp_path / "next_up", {5: 2.5, 10: 1.2500001}, speed=100.0)
    assert chaos.tensorboard_differences(reference, next_up) == [
        "TensorBoard step 10: train/loss 1.25 against 1.2500001192092896"
    ]
    shorter = write_run(tmp_path / "shorter", {5: 2.5}, speed=100.0)
    assert chaos.tensorboard_differences(reference, shorter) == [
        "TensorBoard scalars differ in step or tag from scalar 3 on: "
        "[(10, 'train/loss'), (10, 'train/steps_per_second')] against [] (4 against 2 scalars)"
    ]
