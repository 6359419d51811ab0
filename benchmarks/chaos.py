"""Chaos check: a run killed with SIGKILL at random moments ends exactly as an uninterrupted one.

    python benchmarks/chaos.py --config=configs/transformer.py:tiny --kills=20

Trains the config once without interruption, then again in another workdir while killing the
process with SIGKILL up to `--kills` times (restarting it with the same command each time; a run
too short for them all ends first: give it more steps), and compares the two: the final
parameters bitwise, metrics.jsonl row for row and TensorBoard's scalars event for event (every
value bitwise but the timing, `train/steps_per_second`). Each kill lands at one of three kinds of
moment, drawn in turn: a random time after the start (a random fraction of the uninterrupted
run's wall time, so the kills spread over start-up, compiling and training on a fast machine as on
a slow one), just as a checkpoint starts to be written (orbax's temporary folder appears), or just
after a report was appended to metrics.jsonl. Prints what differed, if anything, and one JSON line
with the counts; exits 1 if anything differed. `--workdir` is emptied first, so it must be new,
empty, or one that chaos.py made (it leaves a `chaos-workdir` file in each): anything else is
refused, never deleted.

--at=report:12,save:20,step:27 kills at exact moments instead, the same on every machine (what
tests use): the Nth start of the run SIGKILLs itself at the Nth moment, by train/__main__.py's
test hook (JAXMODELS_TEST_SIGNAL): `step:N` after the call that ran step N, `report:N` after the
report of step N was written, `save:N` after the async save of step N's checkpoint started (the
first such moment at or after step N).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np

from train import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("train/steps_per_second",)  # values no two runs share
MOMENTS = ("random", "checkpoint", "report")
MARKER = "chaos-workdir"  # the file that marks a workdir as chaos.py's own, to empty at will
AT_MOMENTS = ("step", "report", "save")  # --at: the moments of train/__main__.py's test hook


def command(config: str, workdir: pathlib.Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}", *overrides]


def prepare_workdir(workdir: pathlib.Path) -> None:
    """Leaves `workdir` an empty directory holding only MARKER, deleting nothing chaos.py did not
    make: it creates a missing one, takes an empty one, and empties one that holds MARKER.

    Raises:
      SystemExit: (one line) `workdir` is a file, or a directory with other files and no MARKER.
    """
    if workdir.exists() and not workdir.is_dir():
        raise SystemExit(f"chaos: --workdir={workdir} is a file; name a new directory.")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise SystemExit(
                f"chaos: --workdir={workdir} is not empty and was not made by chaos.py (it has no "
                f"{MARKER} file), so it is not deleted; name a new or empty directory."
            )
        for path in workdir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:  # a file, or a link, not followed
                path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(
        "Made by benchmarks/chaos.py, which empties this directory when it is given it again.\n"
    )


def run_to_end(arguments: list[str], log) -> float:
    """Runs `arguments` to the end; returns its wall time in seconds."""
    start = time.monotonic()
    result = subprocess.run(arguments, cwd=REPO, stdout=log, stderr=log, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"chaos: {' '.join(arguments)} failed with status {result.returncode}")
    return time.monotonic() - start


def wait_for(moment: str, workdir: pathlib.Path, process: subprocess.Popen, delay: float) -> bool:
    """Waits until `moment` in the run in `workdir`; False if the process ended first."""
    checkpoints, report_file = workdir / "checkpoints", workdir / "metrics.jsonl"

    def checkpoint_tmp() -> bool:
        return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())

    def report_count() -> int:
        return len(report_file.read_bytes().splitlines()) if report_file.exists() else 0

    start, reports = time.monotonic(), report_count()
    while process.poll() is None:
        if moment == "random" and time.monotonic() - start >= delay:
            return True
        if moment == "checkpoint" and time.monotonic() - start >= delay and checkpoint_tmp():
            return True
        if moment == "report" and report_count() > reports:
            return True
        time.sleep(0.002)
    return False


def kill_and_restart(
    arguments: list[str], workdir: pathlib.Path, kills: int, seed: int, log, span: float
) -> list[str]:
    """Runs `arguments` to the end, SIGKILLing it `kills` times; returns the moments hit.

    `span` is the wall time of one uninterrupted run; random delays are fractions of it.
    """
    rng = random.Random(seed)
    hit = []
    while len(hit) < kills:
        moment = MOMENTS[len(hit) % len(MOMENTS)]
        process = subprocess.Popen(arguments, cwd=REPO, stdout=log, stderr=log)
        # A fraction of a whole run, which a restart (start-up, compiling, then at least one
        # checkpoint's worth of steps) takes about as long as: the kill lands before it ends.
        if wait_for(moment, workdir, process, delay=rng.uniform(0.1, 0.6) * span):
            process.send_signal(signal.SIGKILL)
            process.wait()
            hit.append(moment)
            print(f"chaos: kill {len(hit)}/{kills} at a {moment} moment", file=sys.stderr)
        else:  # it finished before the moment came: no more kills (give it more steps)
            if process.returncode != 0:
                raise SystemExit(f"chaos: the run failed with status {process.returncode}")
            print(f"chaos: the run finished after {len(hit)} kills", file=sys.stderr)
            return hit
    run_to_end(arguments, log)
    return hit


def kill_at(arguments: list[str], at: list[str], log) -> list[str]:
    """Runs `arguments` to the end, its Nth start SIGKILLing itself at moment `at[N]`
    (MOMENT:STEP); returns the moments hit. A start that resumes past its moment is killed at
    the first such moment after it; one that ends first ends the kills."""
    hit = []
    for moment in at:
        env = dict(os.environ, JAXMODELS_TEST_SIGNAL=f"SIGKILL@{moment}")
        result = subprocess.run(arguments, cwd=REPO, stdout=log, stderr=log, env=env, timeout=3600)
        if result.returncode == 0:
            print(f"chaos: the run finished after {len(hit)} kills", file=sys.stderr)
            return hit
        if result.returncode != -signal.SIGKILL:
            raise SystemExit(f"chaos: the run failed with status {result.returncode}")
        hit.append(moment)
        print(f"chaos: kill {len(hit)}/{len(at)} at {moment}", file=sys.stderr)
    run_to_end(arguments, log)
    return hit


def final_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The newest checkpoint's parameters, flattened to {path: array}."""
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    restored = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(steps[-1]) / "state")
    flat = {}

    def visit(prefix: str, tree) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                visit(f"{prefix}/{key}", value)
        else:
            flat[prefix] = np.asarray(tree)

    visit("", restored["params"])
    return flat


def differences(reference: pathlib.Path, other: pathlib.Path) -> list[str]:
    """What differs between two finished runs: parameters bitwise; metrics.jsonl's reports and
    TensorBoard's scalars, every value bitwise but the timing."""
    found = []
    want, got = final_params(reference), final_params(other)
    for name in sorted(want.keys() | got.keys()):
        if name not in want or name not in got or not np.array_equal(want[name], got[name]):
            found.append(f"parameter {name} differs")
    rows = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        for run in (reference, other)
    ]
    if [r["step"] for r in rows[0]] != [r["step"] for r in rows[1]]:
        found.append(
            f"metrics.jsonl steps differ: {[r['step'] for r in rows[0]]} against "
            f"{[r['step'] for r in rows[1]]}"
        )
    for a, b in zip(*rows, strict=False):
        for key in sorted((a.keys() | b.keys()) - set(TIMING)):
            if a.get(key) != b.get(key):
                found.append(f"step {a['step']}: {key} {a.get(key)!r} against {b.get(key)!r}")
    return found + tensorboard_differences(reference, other)


def tensorboard_differences(reference: pathlib.Path, other: pathlib.Path) -> list[str]:
    """What differs between two runs' TensorBoard scalars: the (step, tag) of each, in order, and
    its float32 value bitwise, but for the timing."""
    found = []
    events = [tensorboard_scalars(run) for run in (reference, other)]
    keys = [[(step, tag) for step, tag, _ in run] for run in events]
    if keys[0] != keys[1]:
        first = next(
            (i for i, pair in enumerate(zip(*keys, strict=False)) if pair[0] != pair[1]),
            min(map(len, keys)),
        )
        found.append(
            f"TensorBoard scalars differ in step or tag from scalar {first + 1} on: "
            f"{keys[0][first : first + 3]} against {keys[1][first : first + 3]} "
            f"({len(keys[0])} against {len(keys[1])} scalars)"
        )
    for (step, tag, a), (other_step, other_tag, b) in zip(*events, strict=False):
        if (step, tag) != (other_step, other_tag) or tag in TIMING:
            continue  # reported above; timing differs from run to run
        if struct.pack("<f", a) != struct.pack("<f", b):
            found.append(f"TensorBoard step {step}: {tag} {a!r} against {b!r}")
    return found


def tensorboard_scalars(workdir: pathlib.Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a run's TensorBoard event files, in the order written
    (`train.metrics.read_events`, without TensorBoard)."""
    return metrics.read_events(workdir / "tensorboard")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/transformer.py:tiny")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/chaos")
    parser.add_argument(
        "--at", default="", help="Exact moments instead: report:12,save:20,step:27 (see above)."
    )
    # Anything else (--config.FIELD=VALUE) is passed to both runs.
    args, overrides = parser.parse_known_args(argv)
    at = [moment for moment in args.at.split(",") if moment]
    for moment in at:
        kind, _, step = moment.partition(":")
        if kind not in AT_MOMENTS or not step.isdigit():
            parser.error(f"--at={args.at}: write MOMENT:STEP, MOMENT one of {AT_MOMENTS}")
    workdir = pathlib.Path(args.workdir).absolute()
    prepare_workdir(workdir)
    start = time.monotonic()
    with open(workdir / "chaos.log", "w") as log:
        span = run_to_end(command(args.config, workdir / "reference", overrides), log)
        arguments = command(args.config, workdir / "killed", overrides)
        if at:
            hit = kill_at(arguments, at, log)
        else:
            hit = kill_and_restart(arguments, workdir / "killed", args.kills, args.seed, log, span)
    found = differences(workdir / "reference", workdir / "killed")
    for line in found:
        print(line)
    summary = {
        "config": args.config,
        "kills": len(hit),
        "moments": {moment: hit.count(moment) for moment in MOMENTS} if not at else hit,
        "differences": len(found),
        "wall_s": round(time.monotonic() - start, 1),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
    }
    print(json.dumps(summary))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
