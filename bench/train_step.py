"""The Quillan policy's training step on CPU: the micro-swarm's two training forms and AdamW's two
update forms, side by side on one model.

One step is what a supervised stage runs: forward with labels, backward, AdamW step (the stages'
settings: betas 0.9 / 0.95, weight decay 1.0 as in the quickstart's SFT). The model is the
recipe's Quillan policy (``--recipe``; its ``model`` section, vocabulary ``--vocab``) with random
weights, the batch ``--batch`` rows of ``--seq`` random tokens. Variants:

- ``gathered+foreach``: the micro-swarm gathers each row's h·m·r agent rows of d
  (``policies.modeling_quillan.GROUPED_TABLE_RATIO`` forced to 0) and AdamW runs ``foreach``;
- ``grouped+foreach``: the micro-swarm's grouped matmuls over whole agent tables;
- ``grouped+fused``: that, with torch's fused AdamW (``ccrl.trainers.optim.build_optimizer``'s
  choice on CPU): what a stage runs while the tables are within ``GROUPED_TABLE_RATIO``.

Each variant owns a copy of the same initial model; they step in turn (interleaved), so load on
the machine falls on all of them alike. A trial times ``--steps`` steps per variant after
``--warmup``; the script prints min / median / max over ``--trials`` trials of each variant's
median step and the ratio to ``gathered+foreach`` per trial.

``--model-set micro_agents=N`` changes the agent tables' size: the grouped form multiplies
S/(h·m) times more than it keeps (S agents per persona, h·m retrieved per row), which is where
``GROUPED_TABLE_RATIO`` puts the limit past which the model trains on gathered rows.

Run:  python bench/train_step.py --recipe recipes/quickstart.yaml --threads 1 --trials 5
      python bench/train_step.py --model-set micro_agents=256 --trials 3   (S/(h·m) = 32)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import environment_lines, table  # noqa: E402

VARIANTS = ("gathered+foreach", "grouped+foreach", "grouped+fused")


def build(recipe: str, vocab: int, fields: list[str]):
    import yaml

    from ccrl.config import load_recipe
    from policies import QuillanConfig, QuillanForCausalLM

    spec = load_recipe(recipe).model
    if spec.preset is None:
        raise SystemExit(f"{recipe}: the model is not a Quillan preset")
    extra = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in fields)}
    return QuillanForCausalLM(QuillanConfig.preset(spec.preset, **{**spec.overrides, **extra, "vocab_size": vocab}))


def step(model, opt, ids, grouped: bool) -> float:
    import policies.modeling_quillan as mq

    saved = mq.GROUPED_TABLE_RATIO
    mq.GROUPED_TABLE_RATIO = float("inf") if grouped else 0      # each form forced, whatever the table size
    try:
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    finally:
        mq.GROUPED_TABLE_RATIO = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--model-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="QuillanConfig fields over the recipe's (e.g. micro_agents=1024)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ccrl.trainers.optim import build_optimizer

    torch.manual_seed(0)
    base = build(a.recipe, a.vocab, a.model_set)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    stage = argparse.Namespace(name="bench", lr=1e-3, weight_decay=1.0, adam_betas=[0.9, 0.95], adam_epsilon=1e-8,
                               optimizer_state_dtype=None)
    runs = {}
    for name in VARIANTS:
        model = copy.deepcopy(base).train()
        params = [q for q in model.parameters() if q.requires_grad]
        if name.endswith("fused"):
            opt = build_optimizer([{"params": params}], params, stage)
            assert opt.defaults.get("fused"), "fused AdamW is not available here"
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1.0, betas=(0.9, 0.95), foreach=True)
        runs[name] = (model, opt, name.startswith("grouped"))
    medians = {name: [] for name in VARIANTS}
    for _ in range(a.trials):
        times = {name: [] for name in VARIANTS}
        for i in range(a.warmup + a.steps):
            for name, (model, opt, grouped) in runs.items():
                dt = step(model, opt, ids, grouped)
                if i >= a.warmup:
                    times[name].append(dt)
        for name in VARIANTS:
            medians[name].append(statistics.median(times[name]) * 1e3)
    print("\n".join(environment_lines(a.threads)))
    params = sum(q.numel() for q in base.parameters())
    fields = f" with {' '.join(a.model_set)}" if a.model_set else ""
    print(f"model: {a.recipe}{fields} ({params:,} parameters), batch {a.batch} x {a.seq} tokens, "
          f"{a.trials} trials x {a.steps} steps")
    ref = medians[VARIANTS[0]]
    rows = []
    for name in VARIANTS:
        ms = medians[name]
        ratio = sorted(r / m for r, m in zip(ref, ms))
        rows.append([name, min(ms), statistics.median(ms), max(ms),
                     f"{ratio[0]:.2f} / {statistics.median(ratio):.2f} / {ratio[-1]:.2f}"])
    print(table(["variant", "min ms", "median ms", "max ms", "speed-up vs gathered+foreach (min / median / max)"],
                rows))


if __name__ == "__main__":
    main()
