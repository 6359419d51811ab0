"""Command line: sampling from a trained language model, or translating with a trained
encoder-decoder, with the newest (or a chosen) checkpoint of a run. The decoding itself is
`train.decode`'s, whose functions this module also offers under their old names.

Usage:
  python -m train.sample --workdir=runs/transformer --prompt="ROMEO:" --length=200 \\
      --temperature=0.8 --top_k=40
  python -m train.sample --workdir=runs/seq2seq --prompt="123+45"
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from train import cli, tasks, trained
from train.decode import (  # noqa: F401  (the decoders, as train.sample offered them)
    ApplyFn,
    check_sampling,
    filter_logits,
    init_cache,
    next_token,
    sample_tokens,
    sample_tokens_cached,
    translate,
    uses_cache,
)

# --- The command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m train.sample",
        description="Samples text from a language-model run, or translates with a seq2seq run, "
        "using the newest checkpoint in --workdir (or --step).",
    )
    parser.add_argument("--workdir", required=True, help="the run's directory (config.json)")
    parser.add_argument("--prompt", default="\n", help="text to continue, or to translate")
    parser.add_argument("--length", type=int, default=200, help="tokens to draw (seq2seq: most)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="0: greedy (default 1, seq2seq 0)"
    )
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely; 0: all")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass kept; 1: all")
    parser.add_argument("--num_samples", type=int, default=1, help="samples drawn at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--step",
        type=cli.checkpoint_step,
        help="checkpoint step, or 'best' (train.keep_best); default: the newest",
    )
    parser.add_argument(
        "--no_cache",
        action="store_true",
        help="re-run the window for every token instead of the key/value cache (for comparison)",
    )
    return parser


def generate(args: argparse.Namespace) -> str:
    """The text `python -m train.sample` prints; logs its timing to stderr."""
    if args.length < 1 or args.num_samples < 1:
        raise ValueError("--length and --num_samples must be at least 1.")
    run = trained.load(args.workdir, args.step)  # config.json, and a checkpoint's parameters
    config, params, info, step = run.config, run.params, run.info, run.step
    task = tasks.for_config(config)
    temperature = task.sample_temperature if args.temperature is None else args.temperature
    check_sampling(temperature, args.top_k, args.top_p)
    if not task.decodes:
        raise ValueError(
            f"{args.workdir} holds a {task.name} run of {config.data.dataset}; train.sample needs "
            "a language-model or seq2seq run."
        )
    apply_fn = run.model.apply
    cache = task.decodes_with_cache(apply_fn) and not args.no_cache
    ids = info.encode(args.prompt)
    if len(ids) == 0:
        raise ValueError("--prompt must hold at least one token.")
    rng = jax.random.key(args.seed)
    function, inputs, length = task.decoder(
        config,
        apply_fn,
        ids,
        num_samples=args.num_samples,
        length=args.length,
        cache=cache,
        settings=dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p),
    )

    start = time.perf_counter()
    compiled = jax.jit(function).lower(params, inputs, rng).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = np.asarray(jax.block_until_ready(compiled(params, inputs, rng)))
    seconds = time.perf_counter() - start
    how = "with the key/value cache" if cache else "re-running the window"
    print(
        f"Checkpoint step {step}: {args.num_samples} x {length} tokens in {seconds:.3f} s "
        f"({args.num_samples * length / seconds:.0f} tokens/s) {how}; compiled in "
        f"{compile_seconds:.2f} s.",
        file=sys.stderr,
    )
    return task.decoded_text(info, tokens)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        text = generate(args)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        cli.fail(error)
    print(text)


if __name__ == "__main__":
    main()
