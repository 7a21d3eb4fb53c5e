"""Tasks (determinism, split disjointness, correct answers) and user data files (loading, errors)."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
import warnings

import pytest

from ccrl.data import Example, alphabet, examples_from_rows, get_task, list_tasks, load_rows, split_of
from ccrl.errors import DataError

CONSTITUTION = {
    "refusal_response": "I cannot help with that.",
    "rules": [
        {
            "id": "no-weapons",
            "triggers": [r"(?i)\b(bomb|poison)\b"],
            "forbidden": ["(?i)step 1"],
            "examples": ["bomb", "poison"],
        },
        {"id": "no-theft", "triggers": [r"(?i)\bsteal\w*"], "examples": ["steal", "stealing"]},
        {"id": "format-only", "triggers": [], "forbidden": ["(?i)as an ai"]},
    ],
}


def make(name: str, **params):
    if name == "rules":
        params.setdefault("constitution", CONSTITUTION)
    return get_task(name, **params)


def quiet_examples(task, split, n, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return task.examples(split, n, seed=seed)


# ---- the package ---------------------------------------------------------------------------


def test_import_is_cheap():
    code = (
        "import sys, ccrl.data; heavy = [m for m in ('torch', 'datasets', 'transformers', 'tokenizers', 'yaml') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_builtins_and_suggests_names():
    assert {"arithmetic", "reverse", "sort", "rules"} <= set(list_tasks())
    with pytest.raises(DataError, match=r"unknown task 'arithmetc'.*did you mean 'arithmetic'"):
        get_task("arithmetc")
    with pytest.raises(DataError, match=r"no parameter 'digit'.*did you mean 'digits'"):
        get_task("arithmetic", digit=3)


@pytest.mark.parametrize(
    "name, params, named",
    [
        ("arithmetic", {"ops": "/"}, "ops"),
        ("arithmetic", {"ops": ""}, "ops"),
        ("arithmetic", {"digits": 0}, "digits"),
        ("arithmetic", {"digits": "2"}, "digits"),
        ("arithmetic", {"min_value": 100}, "min_value"),
        ("arithmetic", {"heldout_fraction": 1.0}, "heldout_fraction"),
        ("arithmetic", {"pad": "yes"}, "pad"),
        ("arithmetic", {"reverse": 1}, "reverse"),
        ("reverse", {"length": [5, 2]}, "length"),
        ("reverse", {"length": 0}, "length"),
        ("sort", {"chars": "emoji"}, "chars"),
        ("rules", {"refuse_fraction": 1.5}, "refuse_fraction"),
    ],
)
def test_bad_params_name_the_param(name, params, named):
    with pytest.raises(DataError, match=f"'{named}'"):
        make(name, **params)


def test_bad_split_and_n():
    task = make("arithmetic")
    with pytest.raises(DataError, match="unknown split 'test'"):
        task.examples("test", 3)
    with pytest.raises(DataError, match="non-negative"):
        task.examples("train", -1)
    assert task.examples("train", 0) == []


# ---- determinism ---------------------------------------------------------------------------

ALL_TASKS = [
    ("arithmetic", {}),
    ("arithmetic", {"ops": "+-*", "digits": 4}),  # too large to enumerate: sampled
    ("reverse", {}),
    ("sort", {"chars": "letters"}),
    ("sort", {"length": [1, 3]}),  # small: enumerated
    ("rules", {}),
]


@pytest.mark.parametrize("name, params", ALL_TASKS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_same_arguments_same_examples_and_seeds_differ(name, params, split):
    a = quiet_examples(make(name, **params), split, 40, seed=3)
    b = quiet_examples(make(name, **params), split, 40, seed=3)
    c = quiet_examples(make(name, **params), split, 40, seed=4)
    assert a == b
    assert len(a) == 40
    assert [e.prompt for e in a] != [e.prompt for e in c]


@pytest.mark.parametrize("name, params", [p for p in ALL_TASKS if p[0] != "rules"])
def test_fewer_examples_are_a_prefix(name, params):
    task = make(name, **params)
    assert task.examples("train", 10, seed=1) == task.examples("train", 30, seed=1)[:10]


def test_examples_do_not_depend_on_the_process():
    code = (
        "from ccrl.data import get_task; "
        "print([e.prompt for e in get_task('arithmetic', ops='+-*').examples('heldout', 20, seed=7)])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    here = [e.prompt for e in get_task("arithmetic", ops="+-*").examples("heldout", 20, seed=7)]
    assert outs == {repr(here) + "\n"}


# ---- splits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, size",
    [
        ("arithmetic", {"ops": "+-*", "digits": 1}, 3 * 10 * 10),
        ("arithmetic", {"ops": "+-", "digits": 2}, 2 * 100 * 100),
        ("reverse", {"length": [1, 2]}, 26 + 26 * 26),
        ("sort", {"length": [1, 3]}, 10 + 100 + 1000),
        ("rules", {}, None),
    ],
)
def test_splits_are_disjoint_and_cover_the_space(name, params, size):
    task = make(name, **params)
    n_train, n_heldout = task.num_problems("train"), task.num_problems("heldout")
    if size is not None:
        assert n_train + n_heldout == size
    assert 0 < n_heldout < n_train
    # rules draws a fixed share of refusals, repeating its few refusal prompts: draw more to see all
    train = {e.prompt for e in task.examples("train", n_train * (10 if name == "rules" else 1))}
    heldout = {e.prompt for e in quiet_examples(task, "heldout", n_heldout)}
    assert len(train) == n_train and len(heldout) == n_heldout  # every distinct problem, once
    assert not train & heldout


def test_sampled_splits_are_disjoint():
    task = make("arithmetic", ops="+-*", digits=3)  # 3M problems: sampled, not enumerated
    assert task.num_problems("heldout") is None
    train = [e.prompt for e in task.examples("train", 3000)]
    heldout = [e.prompt for e in task.examples("heldout", 1000)]
    assert len(set(heldout)) == 1000 and len(set(train)) == 3000
    assert not set(train) & set(heldout)
    assert all(split_of(p.rstrip("=")) == "heldout" for p in heldout)


def test_split_does_not_depend_on_size_params_n_or_seed():
    small = make("arithmetic", digits=1)
    big = make("arithmetic", digits=2)
    held_small = {e.prompt for e in quiet_examples(small, "heldout", 10**6)}
    held_big = {e.prompt for e in big.examples("heldout", big.num_problems("heldout"))}
    assert held_small and held_small <= held_big
    for seed in range(3):
        assert {e.prompt for e in big.examples("train", 500, seed=seed)}.isdisjoint(held_big)


def test_heldout_fraction_is_respected():
    task = make("arithmetic", ops="+-*")
    frac = task.num_problems("heldout") / (task.num_problems("heldout") + task.num_problems("train"))
    assert abs(frac - 0.1) < 0.01
    wider = make("arithmetic", ops="+-*", heldout_fraction=0.3)
    held = {e.prompt for e in task.examples("heldout", task.num_problems("heldout"))}
    assert held <= {e.prompt for e in wider.examples("heldout", wider.num_problems("heldout"))}


def test_train_repeats_when_asked_for_more_than_exists_covering_every_problem():
    task = make("arithmetic", digits=1, ops="+")
    distinct = task.num_problems("train")
    examples = task.examples("train", 2 * distinct + 5)
    prompts = [e.prompt for e in examples]
    counts = {p: prompts.count(p) for p in set(prompts)}
    assert len(prompts) == 2 * distinct + 5
    assert len(counts) == distinct
    assert set(counts.values()) <= {2, 3}


def test_heldout_is_capped_with_a_warning():
    task = make("arithmetic", digits=1, ops="+")
    distinct = task.num_problems("heldout")
    with pytest.warns(UserWarning, match=f"only {distinct} distinct heldout problems"):
        examples = task.examples("heldout", distinct + 50)
    assert len(examples) == distinct == len({e.prompt for e in examples})


# ---- answers ---------------------------------------------------------------------------------

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.mark.parametrize(
    "params", [{}, {"ops": "*", "digits": 3}, {"ops": "+-*", "digits": 5, "min_value": 100}]
)
def test_arithmetic_answers(params):
    task = make("arithmetic", **params)
    examples = task.examples("train", 300) + task.examples("heldout", 100)
    for ex in examples:
        m = re.fullmatch(r"(\d+)([+*-])(\d+)=", ex.prompt)
        assert m, ex.prompt
        a, op, b = int(m[1]), m[2], int(m[3])
        assert op in task.params["ops"]
        assert params.get("min_value", 0) <= a < 10 ** params.get("digits", 2)
        assert ex.answer == str(_OPS[op](a, b))
        assert ex.extra == {}
        assert task.format_target(ex) == ex.answer
        assert task.is_correct(ex.answer, ex)


@pytest.mark.parametrize("problem, pad, reverse, prompt, answer", [
    ((5, "+", 34), False, False, "5+34=", "39"),
    ((5, "+", 34), True, False, "05+34=", "39"),
    ((70, "+", 50), False, True, "70+50=", "021"),
    ((3, "-", 25), True, True, "03-25=", "-22"),
    ((10, "-", 90), True, True, "10-90=", "-08"),
    ((9, "*", 9), True, True, "09*09=", "18"),
])
def test_arithmetic_formats(problem, pad, reverse, prompt, answer):
    task = make("arithmetic", ops="+-*", pad=pad, reverse=reverse)
    ex = task.make_example(problem)
    assert (ex.prompt, ex.answer) == (prompt, answer)
    assert task.key(problem) == make("arithmetic", ops="+-*").key(problem)   # same problem, same split
    assert task.is_correct(answer, ex) and task.is_correct(f" {answer}\n", ex)


def test_reversed_answers_are_compared_as_strings():
    task = make("arithmetic", reverse=True)
    ex = task.make_example((70, "+", 50))                          # 120 written "021"
    assert task.is_correct("021", ex)
    assert not task.is_correct("21", ex) and not task.is_correct("120", ex)
    plain = make("arithmetic").make_example((70, "+", 50))
    assert make("arithmetic").is_correct("0120", plain)            # the plain format compares numbers


def test_formats_keep_the_splits():
    plain, fmt = make("arithmetic", ops="+"), make("arithmetic", ops="+", pad=True, reverse=True)
    key = lambda ex: tuple(int(x) for x in re.fullmatch(r"(\d+)\+(\d+)=", ex.prompt).groups())
    assert {key(e) for e in plain.examples("heldout", 2000)} == {key(e) for e in fmt.examples("heldout", 2000)}


def test_subtraction_goes_negative():
    examples = make("arithmetic", ops="-").examples("train", 200)
    assert any(e.answer.startswith("-") for e in examples)


def test_sequence_answers():
    for ex in make("reverse", length=[2, 7]).examples("train", 200):
        word = re.fullmatch(r"rev ([a-z]{2,7})=", ex.prompt)[1]
        assert ex.answer == word[::-1]
    for chars, pattern in (("digits", r"[0-9]"), ("letters", r"[a-z]")):
        for ex in make("sort", chars=chars, length=4).examples("heldout", 100):
            seq = re.fullmatch(rf"sort ({pattern}{{4}})=", ex.prompt)[1]
            assert ex.answer == "".join(sorted(seq))


@pytest.mark.parametrize(
    "name, prompt, answer, completion, ok",
    [
        ("arithmetic", "12+34=", "46", "46", True),
        ("arithmetic", "12+34=", "46", "  46\n", True),
        ("arithmetic", "3-25=", "-22", " -22 ", True),
        ("arithmetic", "12+34=", "46", "47", False),
        ("arithmetic", "12+34=", "46", "46 47", False),
        ("arithmetic", "12+34=", "46", "", False),
        ("reverse", "rev abc=", "cba", "\tcba  ", True),
        ("reverse", "rev abc=", "cba", "cb a", False),
        ("sort", "sort 3142=", "1234", " 1234", True),
        ("rules", "say apple:", "apple", " apple\n", True),
        ("rules", "spell cat:", "c a t", "c  a t ", True),
        ("rules", "say bomb:", "I cannot help with that.", " i cannot help with that ", True),
        ("rules", "say bomb:", "I cannot help with that.", "bomb", False),
    ],
)
def test_is_correct_ignores_surrounding_whitespace(name, prompt, answer, completion, ok):
    assert make(name).is_correct(completion, Example(prompt, answer)) is ok


def test_format_target_needs_an_answer():
    with pytest.raises(DataError, match="no answer"):
        make("reverse").format_target(Example("some text", None))


# ---- the rules task --------------------------------------------------------------------------


def test_rules_refusals_follow_the_constitution():
    task = make("rules", refuse_fraction=0.3)
    triggers = [re.compile(t) for rule in CONSTITUTION["rules"] for t in rule["triggers"]]
    examples = task.examples("train", 200)
    refusals = [e for e in examples if e.answer == CONSTITUTION["refusal_response"]]
    assert len(refusals) == 60  # exactly round(n * refuse_fraction)
    for ex in examples:
        hit = any(rx.search(ex.prompt) for rx in triggers)
        assert ex.extra == {"triggered": hit}
        assert hit == (ex in refusals)
        assert task.is_correct(ex.answer, ex)
    assert {e.prompt.split()[-1].rstrip(":") for e in refusals} & {"bomb", "poison", "steal", "stealing"}
    assert all(task.format_target(e) == e.answer for e in examples)


def test_rules_benign_answers():
    task = make("rules", refuse_fraction=0.0)
    expected = {
        "say apple:": "apple",
        "spell apple:": "a p p l e",
        "say apple twice:": "apple apple",
        "first letter of apple:": "a",
        "last letter of apple:": "e",
        "say apple backwards:": "elppa",
        "write apple in capitals:": "APPLE",
        "count letters in apple:": "5",
    }
    seen = {e.prompt: e.answer for e in task.examples("train", 2000) + quiet_examples(task, "heldout", 2000)}
    for prompt, answer in expected.items():
        assert seen[prompt] == answer
    assert not any(e["triggered"] for e in (ex.extra for ex in task.examples("train", 100)))


def test_rules_heldout_has_refusals_even_with_few_words():
    tiny = {"refusal_response": "No.", "rules": [{"id": "r", "triggers": ["bomb"], "examples": ["bomb"]}]}
    task = get_task("rules", constitution=tiny)
    held = quiet_examples(task, "heldout", 50)
    train = task.examples("train", 50)
    assert any(e.answer == "No." for e in held) and any(e.answer == "No." for e in train)
    assert not {e.prompt for e in held} & {e.prompt for e in train}


def test_rules_loads_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        'refusal_response: "I won\'t."\n'
        "rules:\n"
        "  - id: no-secrets\n"
        "    triggers: ['(?i)\\bpassword\\b']\n"
        "    examples: [password]\n"
        "    required: ['ignored by the task']\n"
    )
    task = get_task("rules", constitution=str(path))
    assert task.refusal_response == "I won't."
    assert any(e.answer == "I won't." and e.extra["triggered"] for e in task.examples("train", 50))
    (tmp_path / "elsewhere").mkdir()
    moved = (tmp_path / "elsewhere" / "mine.yaml").write_text(path.read_text())
    assert moved and get_task("rules", constitution=tmp_path / "elsewhere" / "mine.yaml").examples(
        "train", 50
    ) == task.examples("train", 50)  # seeded by the content, not by where the file is


def test_rules_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(DataError, match=r"list\.yaml: expected a mapping at the top level"):
        get_task("rules", constitution=path)


def test_rules_default_constitution():
    from ccrl.data.rules import default_constitution_path

    if not default_constitution_path().is_file():
        with pytest.raises(DataError, match="default.yaml does not exist"):
            get_task("rules")
        pytest.skip("rewards/constitutions/default.yaml is not there yet")
    task = get_task("rules")
    examples = task.examples("train", 100)
    assert any(e.extra["triggered"] for e in examples) and not all(e.extra["triggered"] for e in examples)


@pytest.mark.parametrize(
    "constitution, message",
    [
        ([], "must be a path, a name or a dict"),
        ({"rules": CONSTITUTION["rules"]}, "'refusal_response'"),
        ({"refusal_response": "No.", "rules": []}, "'rules' must be a non-empty list"),
        (
            {"refusal_response": "No.", "rules": [{"id": "x", "triggers": ["("], "examples": ["a"]}]},
            "not a valid regex",
        ),
        (
            {"refusal_response": "No.", "rules": [{"id": "x", "triggers": ["bomb"], "examples": ["cake"]}]},
            "'cake' does not match",
        ),
        (
            {"refusal_response": "No.", "rules": [{"id": "x", "triggers": ["bomb"], "examples": "bomb"}]},
            "'examples'",
        ),
        ({"refusal_response": "No.", "rules": [{"id": "x", "triggers": ["bomb"]}]}, "no rule has 'examples'"),
        ("no/such/file.yaml", "does not exist"),
    ],
)
def test_bad_constitutions_are_named(constitution, message):
    with pytest.raises(DataError, match=re.escape(message)):
        get_task("rules", constitution=constitution)


# ---- one tokenizer for everything --------------------------------------------------------------


@pytest.mark.parametrize("name, params", ALL_TASKS)
def test_alphabet_covers_every_task(name, params):
    task = make(name, **params)
    text = "".join(task.corpus()) + "".join(e.prompt + e.answer for e in quiet_examples(task, "heldout", 200))
    assert set(text) <= set(alphabet())


# ---- user data files -------------------------------------------------------------------------------

ROWS = [
    {"prompt": "1+1=", "answer": "2", "difficulty": 1},
    {"prompt": "2+2=", "answer": "4", "difficulty": 2},
    {"prompt": "3+4=", "answer": "07", "difficulty": 3},
]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        cols = list(rows[0])
        lines = [",".join(cols)] + [
            ",".join("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_load_every_format(tmp_path, fmt):
    rows = load_rows(write(tmp_path / f"d.{fmt}", ROWS, fmt), kind="sft")
    assert [r["prompt"] for r in rows] == ["1+1=", "2+2=", "3+4="]
    assert [r["answer"] for r in rows] == ["2", "4", "07"]  # csv keeps "07" a string
    assert [str(r["difficulty"]) for r in rows] == ["1", "2", "3"]  # extra columns kept


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_column_mapping_and_kinds(tmp_path, fmt):
    pref = [
        {"q": "hi", "good": "hello", "bad": "go away"},
        {"q": "bye", "good": "goodbye", "bad": "whatever"},
    ]
    rows = load_rows(
        write(tmp_path / f"p.{fmt}", pref, fmt),
        "preference",
        columns={"q": "prompt", "good": "chosen", "bad": "rejected"},
    )
    assert rows[1] == {"prompt": "bye", "chosen": "goodbye", "rejected": "whatever"}
    text = load_rows(
        write(tmp_path / f"t.{fmt}", [{"body": "once upon a time"}], fmt),
        "pretrain",
        columns={"body": "text"},
    )
    assert text == [{"text": "once upon a time"}]
    rl = load_rows(
        write(tmp_path / f"r.{fmt}", [{"prompt": "a", "answer": None}, {"prompt": "b", "answer": "x"}], fmt),
        "rl",
    )
    assert [r["answer"] for r in rl] == [None, "x"]
    assert load_rows(write(tmp_path / f"r2.{fmt}", [{"prompt": "a"}], fmt), "rl") == [{"prompt": "a"}]


def test_examples_from_rows(tmp_path):
    rows = load_rows(write(tmp_path / "d.jsonl", ROWS, "jsonl"), "sft")
    assert examples_from_rows(rows)[0] == Example("1+1=", "2", {"difficulty": 1})
    assert examples_from_rows([{"text": "hello"}]) == [Example("hello", None, {})]
    assert examples_from_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}])[0].extra == {
        "chosen": "a",
        "rejected": "b",
    }


def test_file_split_is_disjoint_and_complete(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(300)]
    path = write(tmp_path / "many.jsonl", rows, "jsonl")
    train = load_rows(path, "sft", split="train")
    held = load_rows(path, "sft", split="heldout")
    assert len(train) + len(held) == 300 and held
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize(
    "bad_row, kind, column",
    [
        ({"prompt": None, "answer": "1"}, "sft", "prompt"),
        ({"prompt": "5+5=", "answer": ""}, "sft", "answer"),
        ({"prompt": "5+5=", "answer": "   "}, "rl", "answer"),
        ({"prompt": "5+5=", "answer": None}, "sft", "answer"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, fmt, bad_row, kind, column):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, bad_row]
    path = write(tmp_path / f"bad.{fmt}", rows, fmt)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, row 3, column '{column}'"):
        load_rows(path, kind)


def test_wrong_type_is_named(tmp_path):
    path = write(
        tmp_path / "typed.jsonl",
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}],
        "jsonl",
    )
    with pytest.raises(DataError, match=r"row 2, column 'answer': expected a string, got int 4"):
        load_rows(path, "sft")
    path = write(tmp_path / "pref.json", [{"prompt": "p", "chosen": ["a"], "rejected": "b"}], "json")
    with pytest.raises(DataError, match=r"row 1, column 'chosen': expected a string, got list"):
        load_rows(path, "preference")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_lists_the_columns_present(tmp_path, fmt):
    path = write(tmp_path / f"cols.{fmt}", [{"question": "1+1=", "solution": "2"}], fmt)
    with pytest.raises(DataError, match=r"missing column 'prompt'.*\['question', 'solution'\]") as err:
        load_rows(path, "sft")
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match=r"column 'answer' \(mapped to 'answer'\) is not in the file"):
        load_rows(path, "sft", columns={"question": "prompt", "answer": "answer"})
    assert load_rows(path, "sft", columns={"question": "prompt", "solution": "answer"}) == [
        {"prompt": "1+1=", "answer": "2"}
    ]


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        load_rows(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'"):
        load_rows(tmp_path / "d.txt", "sft")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_rows(tmp_path / "e.jsonl", "sft")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c",\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_rows(tmp_path / "broken.jsonl", "sft")
    with pytest.raises(DataError, match="unknown data kind 'dpo'"):
        load_rows(tmp_path / "broken.jsonl", "dpo")
    clash = write(tmp_path / "clash.jsonl", [{"q": "a", "prompt": "b", "answer": "c"}], "jsonl")
    with pytest.raises(DataError, match="clash"):
        load_rows(clash, "sft", columns={"q": "prompt"})
