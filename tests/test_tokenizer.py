"""Tokenizer: exact round trips on every task's corpus, special ids, left padding, save/load."""

from __future__ import annotations

import warnings

import pytest

from ccrl.data import (
    SPECIAL_TOKENS,
    alphabet,
    build_tokenizer,
    default_tokenizer,
    get_task,
    list_tasks,
    load_tokenizer,
)
from ccrl.errors import CheckpointError, DataError

CONSTITUTION = {
    "refusal_response": "I cannot help with that.",
    "rules": [{"id": "no-weapons", "triggers": [r"(?i)\b(bomb|poison)\b"], "examples": ["bomb", "poison"]}],
}
BUILTINS = ["arithmetic", "reverse", "sort", "rules"]


def task(name):
    return get_task(name, constitution=CONSTITUTION) if name == "rules" else get_task(name)


def texts_of(name):
    t = task(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held = t.examples("heldout", 300)
    return t.corpus() + [e.prompt + t.format_target(e) for e in held]


@pytest.fixture(scope="module")
def char_tok():
    return default_tokenizer()


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(list_tasks())


def check_special_tokens(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == list(SPECIAL_TOKENS)
    assert tok.padding_side == "left"


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("name", BUILTINS)
def test_round_trip_on_every_task(name, kind):
    tok = build_tokenizer(task(name).corpus(), kind=kind, vocab_size=None if kind == "char" else 200)
    check_special_tokens(tok)
    for text in texts_of(name):
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", BUILTINS)
def test_default_tokenizer_serves_every_task(char_tok, name):
    for text in texts_of(name):
        ids = char_tok.encode(text)
        assert len(ids) == len(text) and char_tok.unk_token_id not in ids
        assert char_tok.decode(ids) == text


def test_char_tokenizer_is_deterministic_and_exact(char_tok):
    check_special_tokens(char_tok)
    assert default_tokenizer().get_vocab() == char_tok.get_vocab()
    assert len(char_tok) == 4 + len(alphabet())
    assert [char_tok.convert_ids_to_tokens(4 + i) for i in range(len(alphabet()))] == list(alphabet())
    for text in ["  say  apple:  ", " ", "I cannot help with that.", "(1+2)*3=9", "it's a b c"]:
        assert char_tok.decode(char_tok.encode(text)) == text


def test_no_bos_or_eos_added_and_unknown_characters(char_tok):
    ids = char_tok.encode("12+34=")
    assert len(ids) == 6 and char_tok.bos_token_id not in ids and char_tok.eos_token_id not in ids
    assert char_tok("46")["input_ids"] == char_tok.encode("46")
    assert char_tok.encode("1~2") == [char_tok.encode("1")[0], char_tok.unk_token_id, char_tok.encode("2")[0]]
    target = char_tok.encode("46") + [char_tok.eos_token_id]
    assert char_tok.decode(target, skip_special_tokens=True) == "46"


def test_bpe_merges_words_and_spells_numbers():
    corpus = ["the cat sat on the mat 123"] * 50 + [alphabet()]
    tok = build_tokenizer(corpus, kind="bpe", vocab_size=120)
    check_special_tokens(tok)
    pieces = tok.tokenize("the cat 123")
    assert "the" in pieces and {"1", "2", "3"} <= set(pieces)
    assert tok.decode(tok.encode("the  cat, 123 ")) == "the  cat, 123 "
    assert build_tokenizer(corpus, kind="bpe", vocab_size=120).get_vocab() == tok.get_vocab()


def test_left_padding_batch(char_tok):
    batch = char_tok(["1+1=", "12+34="], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 6)
    assert ids[0, :2].tolist() == [0, 0] and mask[0].tolist() == [0, 0, 1, 1, 1, 1]
    assert ids[0, 2:].tolist() == char_tok.encode("1+1=")
    assert mask[1].tolist() == [1] * 6


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load(tmp_path, kind):
    from transformers import AutoTokenizer

    corpus = task("arithmetic").corpus()
    tok = build_tokenizer(corpus, kind=kind)
    tok.save_pretrained(tmp_path / "tok")
    samples = corpus[:50] + ["  7 - 8 = -1 "]
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))):
        check_special_tokens(loaded)
        assert loaded.get_vocab() == tok.get_vocab()
        for text in samples:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == text
        assert loaded(["1=", "12+3="], padding=True)["input_ids"][0][:3] == [0, 0, 0]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        build_tokenizer(["abc"], kind="wordpiece")
    with pytest.raises(DataError, match="needs 7 tokens"):
        build_tokenizer(["abc"], kind="char", vocab_size=5)
    with pytest.raises(DataError, match="empty"):
        build_tokenizer([""], kind="char")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
