"""The ``ccrl`` command.

    ccrl run RECIPE.yaml [--set key=value ...] [--resume | --overwrite]   run every stage of a recipe
    ccrl check RECIPE.yaml [--set key=value ...]            validate a recipe without running it
    ccrl compare RECIPE.yaml [--set key=value ...] [--jobs N]  run variants × seeds, write reports/<name>/
    ccrl eval CHECKPOINT --task NAME [--n 200]              held-out accuracy of a checkpoint
    ccrl export CHECKPOINT OUT [--merge] [--packed [--fp-dtype bfloat16]] [--overwrite]   write a standalone checkpoint
    ccrl kernels build [--force] [--verbose]                compile the ternary C++ kernels for this torch
    ccrl kernels info                                       where they are and which ISA path runs

``--set`` takes one or more ``key=value`` pairs and may be repeated: ``--set a=1 b=2 --set c=3``
(a later pair for the same key wins).

Exit codes: 0 success; 2 bad input (recipe, data, checkpoint, reward output), printed as one
paragraph naming the file, the key and what was expected, never a traceback; 130 interrupted
(a resumable checkpoint was written; rerun with ``--resume``); ``ccrl kernels build`` exits 1 when
the kernels cannot be compiled (the reason is printed; the package then runs the PyTorch reference).

Nothing a user has is destroyed without being asked: ``ccrl run`` refuses an ``output_dir`` that
holds an earlier run's results unless ``--resume`` (continue it) or ``--overwrite`` (replace it),
and a folder another run is writing (exit 2, naming that run's pid); ``ccrl export`` refuses a
non-empty target that is not an earlier export unless ``--overwrite``, and an existing file. A
failing stage keeps its last good weights (see ``ccrl.pipeline`` and ``ccrl.trainers.base``).
SIGTERM is handled like SIGINT (exit 130 after a checkpoint is written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import textwrap
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccrl", description="Council-Calibrated RL: alignment recipes for the Quillan council policy.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every stage of a recipe")
    r.add_argument("recipe", nargs="?")
    _set_option(r)
    how = r.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="skip completed stages and continue an interrupted one")
    how.add_argument("--overwrite", action="store_true",
                     help="replace the results of an earlier run in output_dir (moved aside once the new run has "
                          "started, deleted when it completes)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="validate a recipe and print its stages")
    c.add_argument("recipe", nargs="?")
    _set_option(c)
    m = sub.add_parser("compare", help="run a recipe's variants × seeds and write a comparison report")
    m.add_argument("recipe", nargs="?")
    _set_option(m)
    m.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, each in its own process (give jobs × the recipe's threads <= cores)")
    e = sub.add_parser("eval", help="held-out accuracy of a checkpoint on a task")
    e.add_argument("checkpoint")
    e.add_argument("--task", required=True)
    e.add_argument("--options", default="{}", help='task options as JSON, e.g. \'{"digits": 2}\'')
    e.add_argument("--n", type=int, default=200, help="held-out prompts")
    e.add_argument("--max-new-tokens", type=int, default=16)
    x = sub.add_parser("export", help="write a standalone checkpoint (merged adapters and/or packed ternary weights)")
    x.add_argument("checkpoint")
    x.add_argument("out")
    x.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    x.add_argument("--packed", action="store_true", help="pack ternary layers (2-bit) for the C++ inference kernel")
    x.add_argument("--fp-dtype", choices=["float32", "bfloat16"], default=None,
                   help="with --packed: dtype of the full-precision tensors (default: as trained, exact greedy "
                        "tokens; bfloat16: smaller, rounded, greedy tokens may differ)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace OUT even if it is a non-empty folder that is not an earlier ccrl export")
    k = sub.add_parser("kernels", help="compile the ternary C++ kernels against the installed torch, or show them")
    k.add_argument("action", choices=["build", "info"])
    k.add_argument("--force", action="store_true", help="build: compile again even if a binary is cached")
    k.add_argument("--verbose", action="store_true", help="build: show the compiler's commands and output")
    return p


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe keys, e.g. --set stages.rl.lr=1e-5 stages.rl.steps=50 (one or more "
                        "pairs; repeatable)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. ``--set`` takes every following word, so ``ccrl run --set a=1 R.yaml``
    would hand it the recipe too: a word without ``=`` there is the recipe when none was given."""
    p = _parser()
    args = p.parse_args(argv)
    if getattr(args, "overrides", None) is not None:
        if args.recipe is None:
            paths = [o for o in args.overrides if "=" not in o]
            if len(paths) == 1:
                args.recipe = paths[0]
                args.overrides = [o for o in args.overrides if o != paths[0]]
        if args.recipe is None:
            p.error(f"{args.command}: the recipe file (RECIPE.yaml) is missing")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from ccrl.errors import USER_ERRORS

    try:
        return _dispatch(args)
    except USER_ERRORS as e:           # bad input from ccrl, the policies or the rewards
        msg = " ".join(str(e).split())
        # never split a path: no breaks at hyphens or inside a long word
        text = textwrap.fill(f"ccrl: error: {msg}", width=100, break_on_hyphens=False, break_long_words=False)
        print(text, file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        again = "rerun the same command" if args.command == "compare" else "rerun with --resume"
        print(f"ccrl: {e or 'interrupted'}; {again} to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:            # the reader of stdout went away (`ccrl check r.yaml | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())      # so the interpreter's final flush does not raise again
        return 141


def _dispatch(args) -> int:
    if args.command == "run":
        from ccrl.pipeline import format_metrics, run_recipe

        with _sigterm_interrupts():
            summary = run_recipe(args.recipe, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
                                 show_progress=False if args.quiet else None)
        from accelerate import PartialState

        if not PartialState().is_main_process:   # under accelerate launch, one process prints
            return 0
        print(f"\n{summary['recipe']}: {len(summary['stages'])} stages, outputs in {summary['output_dir']}")
        for s in summary["stages"]:
            print(f"  {s['name']:<12} {s['kind']:<8} {s['wall_time_s']:8.1f}s  {format_metrics(s['metrics'])}")
        return 0
    if args.command == "check":
        from ccrl.config import load_recipe
        from ccrl.pipeline import check_data, check_output_dir, existing_results

        rec = load_recipe(args.recipe, args.overrides)
        check_output_dir(rec.output_dir)
        counts = check_data(rec)
        print(f"{rec.source}: valid recipe {rec.name!r}, output_dir {rec.output_dir}")
        if existing_results(Path(rec.output_dir), rec):
            print(f"  note: {rec.output_dir} holds an earlier run's results; `ccrl run` needs --resume or --overwrite")
        for s in rec.stages:
            trainer = ", trained by TRL's GRPOTrainer" if getattr(s, "trainer", "ccrl") == "trl" else ""
            n_train, n_held = counts[s.name]
            print(f"  {s.name}: {s.kind}, {s.steps} steps, data {s.data.task or s.data.path} ({n_train} training, "
                  f"{n_held} held-out examples){trainer}")
        if rec.variants:
            print(f"  compare: {len(rec.variants)} variants ({', '.join(v.name for v in rec.variants)}) × seeds "
                  f"{rec.seeds}" + (f", shared stages {rec.shared_stages}" if rec.shared_stages else "")
                  + (f", budget {rec.budget.value:g} {rec.budget.kind} per rl stage" if rec.budget else "")
                  + (f", baseline {rec.baseline}" if rec.baseline else ""))
        return 0
    if args.command == "compare":
        from ccrl.errors import RecipeError
        from ccrl.reporting.compare import run_compare

        if args.jobs < 1:
            raise RecipeError(f"--jobs {args.jobs}: expected a number of runs at once >= 1")
        with _sigterm_interrupts():
            path = run_compare(args.recipe, overrides=args.overrides, jobs=args.jobs)
        print(f"report written to {path}")
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        from ccrl.export import export_checkpoint

        path = export_checkpoint(args.checkpoint, args.out, merge=args.merge, packed=args.packed,
                                 fp_dtype=args.fp_dtype, overwrite=args.overwrite)
        print(f"exported to {path}")
        return 0
    if args.command == "kernels":
        return _kernels(args)
    raise AssertionError(args.command)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the block runs, SIGTERM raises KeyboardInterrupt like SIGINT (inside a stage the trainer
    handles both: it finishes the step and writes a checkpoint), so ``kill`` ends a run with exit 130."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _kernels(args) -> int:
    import shutil

    import torch

    from policies import kernel_build

    where = kernel_build.build_dir()
    if args.action == "build":
        if args.force and where.exists():
            shutil.rmtree(where)
        try:
            kernel_build.load(build=True, verbose=args.verbose)
        except kernel_build.KernelBuildError as err:
            print(f"ccrl: ternary kernels not built for torch {torch.__version__}: {err}; the PyTorch "
                  "reference runs instead (same results, slower)", file=sys.stderr)
            return 1
    else:
        try:
            kernel_build.load(build=False)
        except kernel_build.KernelBuildError as err:
            print(f"ternary kernels: {err}; the PyTorch reference runs")
            return 0
    import policies.packed as packed

    print(f"ternary kernels: built for torch {torch.__version__} in {where}")
    print(f"kernel path: {packed.kernel_isa()} (this CPU can run: {', '.join(packed.available_isas())})")
    return 0


def _eval(args) -> int:
    from ccrl import data
    from ccrl.errors import CcrlError
    from ccrl.evaluation import evaluate_policy
    from ccrl.models import load_policy
    from ccrl.trainers.base import RunContext

    if args.max_new_tokens < 1:
        raise CcrlError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1 token to generate")
    if args.n < 1:
        raise CcrlError(f"--n {args.n}: expected at least 1 held-out prompt")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise CcrlError(f"--options: not valid JSON ({e})") from None
    model, tok = load_policy(args.checkpoint)
    task = data.get_task(args.task, **options)
    heldout = task.examples("heldout", args.n, seed=0)
    from ccrl.config import EvalConfig

    ctx = RunContext(output_dir=None, seed=0, stage_index=0, stage_name="eval", accelerator=None, tokenizer=tok,
                     task=task, heldout=heldout, eval_config=EvalConfig(max_new_tokens=args.max_new_tokens))
    m = evaluate_policy(model, ctx)
    print(f"heldout_accuracy: {m.get('heldout_accuracy', float('nan')):.4f}  ({len(heldout)} prompts, task {args.task})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
