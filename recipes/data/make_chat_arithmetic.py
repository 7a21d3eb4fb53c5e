"""Write the conversational data of recipes/chat_reward_model.yaml (deterministic; run from the repo root):

    python recipes/data/make_chat_arithmetic.py            # writes recipes/data/chat_arithmetic_{sft,rl,dpo}.jsonl

One-digit additions and subtractions asked in words ("What is 3 plus 4?" -> "7"), in TRL's
conversational formats: SFT ``messages``; RL ``prompt`` (messages); DPO ``prompt`` / ``chosen`` /
``rejected`` (messages), the rejected reply a near miss. Every row has an ``answer`` column, so
``exact_match`` scores each stage's held-out prompts.
Half of the conversations open with a system message.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM = "Reply with the number only."
PHRASINGS = ("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Compute {a} {op} {b}.")
SIZES = {"sft": 200, "rl": 100, "dpo": 100}


def problems() -> list[tuple[int, str, int, int]]:
    """Every (a, op, b, answer) with one-digit operands and a non-negative answer."""
    out = [(a, "plus", b, a + b) for a in range(10) for b in range(10)]
    return out + [(a, "minus", b, a - b) for a in range(10) for b in range(a + 1)]


def conversation(rng: random.Random, a: int, op: str, b: int) -> list[dict]:
    user = {"role": "user", "content": rng.choice(PHRASINGS).format(a=a, op=op, b=b)}
    return ([{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []) + [user]


def rows(kind: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = problems() * 2                     # 155 problems: SFT sees some twice, in another phrasing
    rng.shuffle(pool)
    out = []
    for a, op, b, answer in pool[:SIZES[kind]]:
        prompt = conversation(rng, a, op, b)
        reply = {"role": "assistant", "content": str(answer)}
        if kind == "sft":
            out.append({"messages": prompt + [reply], "answer": str(answer)})
        elif kind == "rl":
            out.append({"prompt": prompt, "answer": str(answer)})
        else:
            wrong = answer + rng.choice([d for d in (-2, -1, 1, 2) if answer + d >= 0])
            out.append({"prompt": prompt, "chosen": [reply],
                        "rejected": [{"role": "assistant", "content": str(wrong)}], "answer": str(answer)})
    return out


def write(folder: Path) -> list[Path]:
    paths = []
    for i, kind in enumerate(SIZES):
        path = folder / f"chat_arithmetic_{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(kind, seed=i)), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent):
        print(p)
