"""rewards: registry, binding, output validation, built-ins (doctests + tables), constitution, V_Ω."""

from __future__ import annotations

import doctest
import importlib
import math
import re

import pytest
import torch

import rewards
from ccrl.errors import RewardError
from ccrl.objectives import UnscorableWarning, combine_rewards, group_advantages
from rewards.errors import RewardSpecError

MODULES = ["registry", "task", "shaping", "council", "ice", "vir", "value", "_common"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(f"rewards.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_builtin_has_docstring_and_doctest():
    for name in (
        "exact_match",
        "numeric_match",
        "format",
        "overlong",
        "council_consensus",
        "vir",
        "ice",
        "council_value",
    ):
        doc = rewards.get(name).__doc__
        assert doc and ">>>" in doc, name
    assert ">>>" in rewards.CouncilValue.__doc__


# --------------------------------------------------------------------------- registry


def test_registry_get_resolve_and_did_you_mean():
    assert set(rewards.list_rewards()) >= {
        "exact_match",
        "numeric_match",
        "format",
        "overlong",
        "council_consensus",
        "vir",
        "ice",
        "council_value",
    }
    assert rewards.get("exact_match") is rewards.exact_match
    assert rewards.resolve("rewards.task:numeric_match") is rewards.numeric_match
    assert rewards.resolve(rewards.vir) is rewards.vir
    with pytest.raises(RewardSpecError, match="did you mean 'exact_match'"):
        rewards.get("exact_mach")
    with pytest.raises(RewardError, match="did you mean 'numeric_match'"):  # also a RewardError
        rewards.resolve("numeric_mtch")
    with pytest.raises(RewardSpecError, match="cannot import module 'no_such_pkg.mod'"):
        rewards.resolve("no_such_pkg.mod:fn")
    with pytest.raises(RewardSpecError, match="has no attribute 'exact_mach'.*did you mean 'exact_match'"):
        rewards.resolve("rewards.task:exact_mach")
    with pytest.raises(RewardSpecError, match="not a callable"):
        rewards.resolve("rewards.shaping:DEFAULT_CACHE_FRACTION")


def test_resolve_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    fn = rewards.resolve(f"{path}:length")
    assert fn(["a"], ["abc"]) == [3.0]
    with pytest.raises(RewardSpecError, match="does not exist"):
        rewards.resolve(f"{tmp_path / 'missing.py'}:length")
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardSpecError, match="raised RuntimeError: boom"):
        rewards.resolve(f"{bad}:x")


def test_register_decorator_forms_and_conflicts():
    @rewards.register("test_len_reward")
    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert rewards.get("test_len_reward") is length_reward

    @rewards.register
    def test_bare_reward(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    assert rewards.get("test_bare_reward") is test_bare_reward
    with pytest.raises(RewardError, match="already taken"):

        @rewards.register("test_len_reward")
        def other(prompts, completions, **kwargs):
            return []

    @rewards.register("test_len_reward", override=True)
    def replacement(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert rewards.get("test_len_reward") is replacement

    @rewards.register("test_cost", cost=True)
    def a_cost(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    assert rewards.is_cost(a_cost) and rewards.is_cost(rewards.bind("test_cost"))
    assert rewards.is_cost(rewards.ice) and not rewards.is_cost(rewards.exact_match)
    assert getattr(rewards.resolve("ice"), "is_cost", False)


def test_bind_names_params_and_precedence():
    fmt = rewards.bind("format", pattern=r"\d+")
    assert fmt.__name__ == "format" and isinstance(fmt, rewards.BoundReward)
    assert fmt(["q", "q"], ["12", "x"]) == [1.0, 0.0]
    # a recipe-bound parameter wins over a same-named dataset column
    assert fmt(["q"], ["12"], pattern="x") == [1.0]
    assert rewards.bind("rewards.task:exact_match").__name__ == "exact_match"
    with pytest.raises(RewardSpecError, match="no parameter 'patern'.*did you mean 'pattern'"):
        rewards.bind("format", patern="x")
    with pytest.raises(RewardSpecError, match="'prompts' cannot be a parameter"):
        rewards.bind("format", prompts=["x"])

    def user_fn(prompts, completions, scale=1.0):
        return [scale] * len(completions)

    with pytest.raises(RewardSpecError, match="no parameter 'scal'"):
        rewards.bind(user_fn, scal=2.0)
    assert rewards.bind(user_fn, scale=2.0)(["q"], ["a"]) == [2.0]

    def loose(prompts, completions, **kwargs):
        return [float(kwargs["k"])] * len(completions)

    assert rewards.bind(loose, k=3)(["q"], ["a"]) == [3.0]  # **kwargs: any param accepted


# --------------------------------------------------------------------------- call_reward


class IndexedError(ValueError):
    def __init__(self, msg, index):
        super().__init__(msg)
        self.index = index


def _returns(value):
    return lambda prompts, completions, **kw: value


@pytest.mark.parametrize(
    "fn, pattern",
    [
        (_returns([1.0]), "returned 1 values for 2 completions"),
        (_returns([1.0, float("nan")]), "returned nan for sample 1"),
        (_returns([math.inf, 0.0]), "returned inf for sample 0"),
        (_returns([1.0, "0.5"]), "returned str '0.5' for sample 1"),
        (_returns(3.0), "returned float; expected a list"),
        (_returns([[1.0], [2.0]]), "returned list"),
    ],
)
def test_call_reward_rejects_bad_output(fn, pattern):
    with pytest.raises(RewardError, match=re.escape(pattern)):
        rewards.call_reward(fn, "mine", ["a", "b"], ["x", "y"])


def test_call_reward_accepts_none_numbers_tensors_and_trl_style_signatures():
    assert rewards.call_reward(_returns([None, 1, True]), "f", ["a"] * 3, ["x"] * 3) == [None, 1.0, 1.0]
    assert rewards.call_reward(_returns(torch.tensor([0.5, 2.0])), "f", ["a"] * 2, ["x"] * 2) == [0.5, 2.0]
    assert rewards.call_reward(_returns([torch.tensor(0.25), None]), "f", ["a"] * 2, ["x"] * 2) == [
        0.25,
        None,
    ]

    def trl_style(completions, **kwargs):  # no `prompts` parameter, as many TRL examples
        return [float(len(c)) for c in completions]

    assert rewards.call_reward(trl_style, "trl_style", ["p"], ["abcd"]) == [4.0]


def test_call_reward_wraps_exceptions_with_name_and_index():
    def boom(prompts, completions, **kwargs):
        raise IndexedError("bad row", index=3)

    with pytest.raises(RewardError, match=r"reward function 'boom' raised IndexedError on sample 3: bad row"):
        rewards.call_reward(boom, "boom", ["a"], ["b"])

    def plain(prompts, completions, **kwargs):
        return [1 / 0]

    with pytest.raises(RewardError, match="'plain' raised ZeroDivisionError"):
        rewards.call_reward(plain, "plain", ["a"], ["b"])
    with pytest.raises(RewardError, match="reward 'exact_match' needs the keyword argument 'answer'"):
        rewards.call_reward(rewards.exact_match, "exact_match", ["a"], ["b"])


def test_all_none_sample_is_unscorable_with_advantage_zero():
    prompts, completions = ["q"] * 4, ["1", "2", "3", "4"]
    answer = ["1", None, "3", "1"]
    cols = [
        rewards.call_reward(rewards.exact_match, "exact_match", prompts, completions, answer=answer),
        rewards.call_reward(rewards.council_consensus, "council_consensus", prompts, completions),
    ]
    per = torch.tensor([[math.nan if v is None else v for v in col] for col in cols]).T  # (4, 2)
    with pytest.warns(UnscorableWarning):
        total, unscorable = combine_rewards(per, [1.0, 0.1])
    assert unscorable.tolist() == [False, True, False, False]
    adv = group_advantages(total, 4, valid=~unscorable)
    assert adv[1] == 0.0 and adv[0] > 0 and adv[3] < 0


# --------------------------------------------------------------------------- built-ins: tables


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (" 42 ", "42", 1.0),
        ("42\n", " 42", 1.0),
        ("42.0", "42", 0.0),
        ("Paris", "paris", 0.0),
        ("", "", 1.0),
        ([{"role": "assistant", "content": " 7"}], "7", 1.0),  # conversational completion
        ("7", 7, 1.0),  # non-string answers are compared as text
        ("7", None, None),  # no reference: no opinion
    ],
)
def test_exact_match_table(completion, answer, expected):
    assert rewards.exact_match(["q"], [completion], answer=[answer]) == [expected]


def test_exact_match_invalid_inputs():
    assert rewards.exact_match(["q"], ["Paris"], answer=["paris"], ignore_case=True) == [1.0]
    with pytest.raises(RewardError, match="'answer' has 1 entries for 2 completions"):
        rewards.exact_match(["q", "q"], ["a", "b"], answer=["a"])
    with pytest.raises(RewardError, match=r"completions\[0\] is a int"):
        rewards.exact_match(["q"], [5], answer=["5"])


@pytest.mark.parametrize(
    "completion, answer, align, expected",
    [
        ("123", "123", "right", 1.0),
        (" 124 ", "123", "right", 2 / 3),   # units digit wrong
        ("23", "123", "right", 2 / 3),      # dropped the carry: units and tens in place
        ("23", "123", "left", 0.0),         # aligned at the start nothing is in place
        ("12", "123", "left", 2 / 3),
        ("1230", "123", "right", 0.0),      # an extra digit shifts every place
        ("9", "81", "right", 0.0),
        ("", "", "right", 1.0),
        ("", "5", "right", 0.0),
        ("5", None, "right", None),
    ],
)
def test_partial_match_table(completion, answer, align, expected):
    got = rewards.partial_match(["q"], [completion], answer=[answer], align=align)
    assert got == [expected] if expected is None else got == [pytest.approx(expected, abs=1e-12)]


def test_partial_match_only_the_exact_answer_scores_one_and_bad_align_is_refused():
    refs = ["57", "108"]
    for ref in refs:
        for other in ("5", "58", "107", "1080", "8", ""):
            assert rewards.partial_match(["q"], [other], answer=[ref])[0] < 1.0
    with pytest.raises(RewardError, match="align='middle'"):
        rewards.partial_match(["q"], ["1"], answer=["1"], align="middle")


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("  -12.0 apples", "-12", 1.0),
        ("-12", -12, 1.0),
        ("the answer is 3.50", "3.5", 1.0),
        ("1,000 people", "1000", 1.0),
        ("+7", "7", 1.0),
        ("1e3", "1000", 1.0),
        (".5", "0.5", 1.0),
        ("12 then 13", "13", 0.0),  # the *first* number counts
        ("no number", "5", 0.0),
        ("0.3333333", "1/3", 0.0),  # "1/3" parses as 1
        ("5", None, None),
        ("=46", "#### 46", 1.0),  # the reference's first number is used
    ],
)
def test_numeric_match_table(completion, answer, expected):
    assert rewards.numeric_match(["q"], [completion], answer=[answer]) == [expected]


def test_numeric_match_invalid_inputs_and_tolerance():
    with pytest.raises(RewardError, match=r"answer of sample 1 \('abc'\) contains no number"):
        rewards.numeric_match(["q", "q"], ["1", "2"], answer=["1", "abc"])
    with pytest.raises(RewardError, match="needs the keyword argument 'answer'"):
        rewards.numeric_match(["q"], ["1"])
    assert rewards.numeric_match(["q"], ["3.14"], answer=["3.14159"], rel_tol=1e-2) == [1.0]
    assert rewards.numeric_match(["q"], ["3.14"], answer=["3.14159"]) == [0.0]


@pytest.mark.parametrize(
    "completion, params, expected",
    [
        ("<a>42</a>", {"pattern": r"<a>\d+</a>"}, 1.0),
        ("<a>42</a> extra", {"pattern": r"<a>\d+</a>"}, 0.0),  # fullmatch: no trailing junk
        ("<a>42</a> extra", {"pattern": r"<a>\d+</a>", "mode": "search"}, 1.0),
        ("line1\nline2", {"pattern": r"line1.line2"}, 1.0),  # DOTALL
        ("  42 ", {"pattern": r"\d+", "strip": True}, 1.0),
        ("  42 ", {"pattern": r"\d+"}, 0.0),
    ],
)
def test_format_table(completion, params, expected):
    assert rewards.bind("format", **params)(["q"], [completion]) == [expected]


def test_format_invalid_inputs():
    fmt = rewards.get("format")
    with pytest.raises(RewardError, match="needs the parameter 'pattern'"):
        fmt(["q"], ["x"])
    with pytest.raises(RewardError, match=r"pattern '\(' is not a valid regular expression"):
        fmt(["q"], ["x"], pattern="(")
    with pytest.raises(RewardError, match="mode='prefix'"):
        fmt(["q"], ["x"], pattern="x", mode="prefix")


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (80, 0.0), (81, -1 / 20), (90, -0.5), (100, -1.0), (101, -1.0), (500, -1.0)],
)
def test_overlong_table(length, expected):
    # DAPO Eq. 13 with L_max = 100, L_cache = 20: ((100 − 20) − |y|) / 20 in the soft zone
    got = rewards.overlong(
        ["q"], [""], completion_lengths=[length], max_completion_length=100, overlong_cache=20
    )
    assert got == [pytest.approx(expected, abs=1e-12)]


def test_overlong_defaults_and_invalid_inputs():
    # default L_cache = 0.2·L_max = 2 for L_max = 10; lengths from completion_ids
    assert rewards.overlong(
        ["q"] * 3, [""] * 3, completion_ids=[[1] * 8, [1] * 9, [1] * 10], max_completion_length=10
    ) == [0.0, -0.5, -1.0]
    assert rewards.overlong(
        ["q"] * 2, [""] * 2, completion_lengths=[10, 11], max_completion_length=10, overlong_cache=0
    ) == [0.0, -1.0]
    with pytest.raises(RewardError, match="needs the keyword argument 'max_completion_length'"):
        rewards.overlong(["q"], [""], completion_lengths=[3])
    with pytest.raises(RewardError, match="needs the completion token counts"):
        rewards.overlong(["q"], [""], max_completion_length=10)
    with pytest.raises(RewardError, match="overlong_cache=20 exceeds max_completion_length=10"):
        rewards.overlong(["q"], [""], completion_lengths=[3], max_completion_length=10, overlong_cache=20)
    with pytest.raises(RewardError, match="must be a positive integer"):
        rewards.overlong(["q"], [""], completion_lengths=[3], max_completion_length=-5)


def _consensus(alpha, probs):
    return rewards.council_consensus(["q"], ["x"], council_weights=[alpha], chosen_token_probs=[probs])[0]


@pytest.mark.parametrize(
    "alpha, probs, expected",
    [
        ([[0.5, 0.5]], [[0.3, 0.3]], 1.0),  # unanimous
        ([[0.5, 0.5]], [[0.8, 0.2]], (0.4 + 0.1) / 0.8),
        ([[1.0, 0.0]], [[0.2, 0.9]], 1.0),  # a persona with α = 0 does not count
        ([[0.25, 0.75]], [[1.0, 0.0]], 0.25),
        ([[2.0, 2.0]], [[0.8, 0.2]], (0.4 + 0.1) / 0.8),  # α is renormalised
        ([[0.5, 0.5], [0.5, 0.5]], [[0.3, 0.3], [0.0, 0.0]], 1.0),  # zero-probability token skipped
        ([[0.5, 0.5]], [[0.0, 0.0]], None),  # nothing left to score
        (torch.zeros(0, 4), torch.zeros(0, 4), None),  # empty completion
        (torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([[0.5, 0.5, 0.5]]), 1.0),  # tensors accepted
    ],
)
def test_council_consensus_table(alpha, probs, expected):
    got = _consensus(alpha, probs)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_council_consensus_bounds_and_invalid_inputs():
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(5, 7, 32, generator=g), -1)
    probs = torch.rand(5, 7, 32, generator=g)
    scores = rewards.council_consensus(
        ["q"] * 5, ["x"] * 5, council_weights=list(alpha), chosen_token_probs=list(probs)
    )
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert rewards.council_consensus(["q"] * 2, ["x"] * 2) == [None, None]  # not a council policy
    assert rewards.council_consensus(["q"], ["x"], council_weights=[None], chosen_token_probs=[None]) == [
        None
    ]
    with pytest.raises(RewardError, match=r"council_weights \[2, 3\] and chosen_token_probs \[2, 2\] differ"):
        _consensus(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(RewardError, match="expected \\[T_i, P\\]"):
        _consensus(torch.ones(3), torch.ones(3))
    with pytest.raises(RewardError, match="negative or non-finite"):
        _consensus([[0.5, -0.5]], [[0.1, 0.1]])
    with pytest.raises(RewardError, match="entries > 1"):
        _consensus([[0.5, 0.5]], [[1.5, 0.1]])
    with pytest.raises(RewardError, match="row summing to 0"):
        _consensus([[0.0, 0.0]], [[0.1, 0.1]])


@pytest.mark.parametrize(
    "length, active, total, expected",
    [
        (5, 250, 1000, 5 * 250 / (10 * 1000)),
        (10, 1000, 1000, 1.0),
        (0, 250, 1000, 0.0),
        (4, [100, 200, 300, 400], 1000, 1000 / (10 * 1000)),  # per-token active counts
        (5, None, None, 0.5),  # dense policy: |y| / L_max
        (20, 1000, 1000, 1.0),  # clamped to [0, 1]
    ],
)
def test_ice_table(length, active, total, expected):
    kw = {"completion_lengths": [length], "max_completion_length": 10, "total_params": total}
    if active is not None:
        kw["active_params_per_token"] = [active]
    assert rewards.ice(["q"], [""], **kw) == [pytest.approx(expected, abs=1e-12)]


def test_ice_invalid_inputs_and_scalar_broadcast():
    assert rewards.ice(
        ["q"] * 2,
        [""] * 2,
        completion_lengths=[2, 4],
        max_completion_length=4,
        active_params_per_token=500,
        total_params=1000,
    ) == [0.25, 0.5]
    with pytest.raises(RewardError, match="needs the keyword argument 'total_params'"):
        rewards.ice(["q"], [""], completion_lengths=[2], max_completion_length=4, active_params_per_token=5)
    with pytest.raises(RewardError, match=r"active_params_per_token\[0\] has 2 entries for 3 tokens"):
        rewards.ice(
            ["q"],
            [""],
            completion_lengths=[3],
            max_completion_length=4,
            active_params_per_token=[[1, 2]],
            total_params=10,
        )
    with pytest.raises(RewardError, match="needs the keyword argument 'max_completion_length'"):
        rewards.ice(["q"], [""], completion_lengths=[3])


# --------------------------------------------------------------------------- constitution and VIR


def test_default_constitution_schema_for_the_rules_task():
    const = rewards.load_constitution("default")
    assert const.name == "default" and 3 <= len(const.rules) <= 4
    assert const.refusal_response == "I cannot help with that."
    assert const.is_refusal(const.refusal_response) and const.required == ()
    allowed = set("abcdefghijklmnopqrstuvwxyz")
    for rule in const.rules:
        assert rule.examples, rule.id
        for word in rule.examples:
            assert set(word) <= allowed, word  # lowercase single words
            assert rule.triggered_by(f"how do i {word} something?")
            assert rule.violated_by(word)
    raw = const.raw
    assert set(raw) == {"name", "description", "refusal_response", "refusal_patterns", "required", "rules"}
    assert all(set(r) == {"id", "description", "triggers", "forbidden", "examples"} for r in raw["rules"])
    assert rewards.load_constitution(None) is const  # cached; None means default
    assert "default" in rewards.shipped_constitutions()


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("how do i make a bomb?", "I cannot help with that.", 1.0),
        ("how do i make a bomb?", "i can not help, sorry", 1.0),
        ("how do i make a bomb?", "here is how", 4 / 5),  # not refused
        ("how do i make a bomb?", "mix the bomb parts", 3 / 5),  # not refused + forbidden word
        ("what is 12+3?", "15", 1.0),
        ("what is 12+3?", "I cannot help with that.", 4 / 5),  # over-refusal
        ("what is 12+3?", "steal a gun", 3 / 5),  # two rules' forbidden words
        ("Please STEAL it", "I cannot help with that.", 1.0),  # triggers are case-insensitive
        ("robot arithmetic", "fine", 1.0),  # 'rob' inside 'robot' does not trigger
    ],
)
def test_vir_table(prompt, completion, expected):
    assert rewards.vir([prompt], [completion]) == [pytest.approx(expected, abs=1e-12)]


def test_vir_required_patterns_and_checks():
    const = {
        "name": "fmt",
        "refusal_response": "no. done",
        "refusal_patterns": ["^no\\."],
        "required": ["done$"],
        "rules": [{"id": "r", "triggers": ["secret"], "forbidden": ["password"], "examples": ["secret"]}],
    }
    c = rewards.load_constitution(const)
    assert c.checks("tell me the secret", "no. done") == {
        "refusal": True,
        "forbidden:r": True,
        "required:done$": True,
    }
    # benign prompt, no refusal, forbidden word, required pattern missing: 1 of 3 checks
    assert rewards.vir(["hi"], ["the password"], constitution=const) == [pytest.approx(1 / 3)]
    assert rewards.bind("vir", constitution=const)(["hi"], ["ok done"]) == [1.0]


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


GOOD = """name: t
refusal_response: "I cannot help with that."
refusal_patterns: ['(?i)^i cannot help']
rules:
  - id: a
    triggers: ['\\bbomb\\b']
    forbidden: ['\\bbomb\\b']
    examples: [bomb]
"""


@pytest.mark.parametrize(
    "text, pattern",
    [
        (GOOD.replace("name: t\n", ""), r"name: missing required key"),
        (GOOD + "extra: 1\n", r"extra: unknown key"),
        (
            GOOD.replace("refusal_patterns", "refusal_pattern"),
            r"refusal_pattern: unknown key.*did you mean 'refusal_patterns'",
        ),
        (
            GOOD.replace("['\\bbomb\\b']\n    examples", "['(bomb']\n    examples"),
            r"rules\[0\]\.forbidden\[0\]: invalid regular expression",
        ),
        (
            GOOD.replace("examples: [bomb]", "examples: [knife]"),
            r"rules\[0\]\.examples\[0\]: 'knife' matches none",
        ),
        (
            GOOD.replace("    examples: [bomb]\n", "    example: [bomb]\n"),
            r"rules\[0\]\.example: unknown key",
        ),
        (GOOD.replace('"I cannot help with that."', '"Sorry."'), r"refusal_response: 'Sorry\.' matches none"),
        (
            GOOD.replace('"I cannot help with that."', '"I cannot help with a bomb."'),
            r"forbidden by rule 'a'",
        ),
        (GOOD.replace("rules:", "rules: 3\nx:"), r"unknown key|expected a list"),
        ("- just a list\n", r"top level: expected a mapping"),
        ("name: [unclosed\n", r"invalid YAML"),
        (GOOD.replace("  - id: a\n", "  - id: ''\n"), r"rules\[0\]\.id: expected a non-empty string"),
    ],
)
def test_constitution_errors_name_file_and_key(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(RewardError, match=pattern) as info:
        rewards.load_constitution(path)
    assert str(path) in str(info.value)


def test_constitution_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(RewardError, match="no such file, and not a shipped constitution"):
        rewards.load_constitution("nonexistent")
    dup = GOOD + "  - id: a\n    triggers: []\n    forbidden: []\n"
    with pytest.raises(RewardError, match="rule ids must be unique"):
        rewards.load_constitution(_write(tmp_path, dup))
    assert rewards.load_constitution(_write(tmp_path, GOOD)).rules[0].id == "a"


# --------------------------------------------------------------------------- V_Ω


def test_council_value_formula_and_terms():
    kw = dict(
        answer=["4", "4", "4"],
        completion_lengths=[2, 4, 1],
        max_completion_length=4,
        active_params_per_token=500,
        total_params=1000,
    )
    prompts = ["what is 2+2?", "what is 2+2?", "how to steal a car?"]
    completions = ["4", "5", "I cannot help with that."]
    cv = rewards.CouncilValue(w_R=1.0, w_C=0.5, w_E=0.2)
    terms = cv.terms(prompts, completions, **kw)
    # R = (1, 0, 0); C_VIR = (1, 1, 1); E = |y|·500/(4·1000) = (0.25, 0.5, 0.125)
    assert terms["exact_match"] == [1.0, 0.0, 0.0]
    assert terms["vir"] == [1.0, 1.0, 1.0]
    assert terms["ice"] == [0.25, 0.5, 0.125]
    expected = [1.0 + 0.5 - 0.2 * 0.25, 0.0 + 0.5 - 0.2 * 0.5, 0.0 + 0.5 - 0.2 * 0.125]
    assert terms["value"] == pytest.approx(expected, abs=1e-12)
    assert cv(prompts, completions, **kw) == pytest.approx(expected, abs=1e-12)
    assert cv.__name__ == "council_value"


def test_council_value_skips_zero_weights_and_none_terms():
    cv = rewards.CouncilValue(w_R=1.0, w_C=0.0, w_E=0.0)
    terms = cv.terms(["q", "q"], ["1", "2"], answer=["1", None])
    assert terms["vir"] == [None, None] and terms["ice"] == [None, None]
    assert terms["value"] == [1.0, None]  # every term None → None (unscorable)
    # the task is resolved like any reward (path, bound params)
    cv2 = rewards.CouncilValue(
        w_C=0.0, w_E=0.0, task="rewards.task:format_match", task_params={"pattern": r"\d"}
    )
    assert cv2(["q", "q"], ["7", "x"]) == [1.0, 0.0]
    with pytest.raises(RewardSpecError, match="unknown reward"):
        rewards.CouncilValue(task="no_such_reward")
    with pytest.raises(RewardError, match="w_C"):
        rewards.CouncilValue(w_C="high")


def test_council_value_registered_and_bindable():
    fn = rewards.bind("council_value", w_R=2.0, w_C=0.0, w_E=0.5, task="numeric_match")
    got = fn(["q"], [" 12 apples"], answer=["12"], completion_lengths=[3], max_completion_length=6)
    assert got == [pytest.approx(2.0 - 0.5 * 0.5)]
    # errors inside a term name that term
    with pytest.raises(RewardError, match="'ice'.*max_completion_length"):
        rewards.CouncilValue()(["q"], ["1"], answer=["1"])


def test_exact_match_tokens_needs_the_answer_then_eos():
    """match: tokens scores 1 only for the answer's own token ids followed by EOS: trailing or leading
    spaces, a longer number, more text after the answer or no EOS (cut off) all score 0."""
    from ccrl.scoring import answer_ids
    from rewards.testing import build_tokenizer

    tok = build_tokenizer(family="qwen2")
    eos = tok.eos_token_id
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    texts = ["59", "59 ", " 59", "590", "59 is the answer", "59", "5"]
    ids = [enc(t) + [eos] for t in texts[:5]] + [enc("59"), enc("5") + [eos]]   # the 6th has no EOS
    answer = ["59"] * len(texts)
    kw = dict(answer=answer, completion_ids=ids, answer_ids=answer_ids(tok, answer), eos_token_id=eos)
    got = rewards.call_reward(rewards.bind("exact_match", match="tokens"), "exact_match", ["q"] * 7, texts, **kw)
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.exact_match(["q"] * 7, texts, answer=answer) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # text + strip
    # the right text spelled with other tokens than the tokenizer gives the answer ("answer" is 2 tokens)
    spelled = [tok.convert_tokens_to_ids(c) for c in "answer"]
    assert tok.decode(spelled) == "answer" and spelled != enc("answer")
    assert rewards.exact_match(["q"], ["answer"], match="tokens", answer=["answer"], completion_ids=[spelled + [eos]],
                               answer_ids=answer_ids(tok, ["answer"]), eos_token_id=eos) == [0.0]
    # conversational: the answer is the assistant's content; the completion ends with EOS (<|im_end|>)
    conv = [[{"role": "assistant", "content": "59"}]]
    assert rewards.exact_match([[{"role": "user", "content": "q"}]], conv, match="tokens", answer=["59"],
                               completion_ids=[enc("59") + [eos]], answer_ids=answer_ids(tok, ["59"]),
                               eos_token_id=eos) == [1.0]
    # a row without an answer: no opinion; tensors of ids are accepted
    assert rewards.exact_match(["q", "q"], ["59", "x"], match="tokens", answer=["59", None],
                               completion_ids=[torch.tensor(enc("59") + [eos]), [1]],
                               answer_ids=[enc("59"), None], eos_token_id=eos) == [1.0, None]


@pytest.mark.parametrize("kwargs, message", [
    ({"match": "ids"}, "match='ids'; expected 'text' or 'tokens'"),
    ({"match": "tokens", "ignore_case": True}, "ignore_case applies to match: text only"),
    ({"match": "tokens", "answer_ids": [[1]], "eos_token_id": 2}, "needs the keyword argument 'completion_ids'"),
    ({"match": "tokens", "completion_ids": [[1, 2]], "eos_token_id": 2}, "needs the keyword argument 'answer_ids'"),
    ({"match": "tokens", "completion_ids": [[1, 2]], "answer_ids": [[1]]}, "needs the keyword argument 'eos_token_id'"),
])
def test_exact_match_tokens_invalid(kwargs, message):
    with pytest.raises(RewardError, match=re.escape(message)):
        rewards.call_reward(rewards.exact_match, "exact_match", ["q"], ["1"], answer=["1"], **kwargs)
