"""The data pipeline: embedded corpus, local tokenizer, loading, held-out split, packing, resumable batches."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch

from flexmore.training import corpus
from flexmore.training.corpus import DOMAINS, CorpusConfig, build_domain, build_general, build_world
from flexmore.training.data import BatchIterator, fingerprint, load_texts, pack, split_heldout
from flexmore.training.tokenizer import EOS_TOKEN, train_tokenizer

SMALL = CorpusConfig(max_chars_per_domain=150_000)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(build_general(SMALL), vocab_size=1024)


class CharTokenizer:
    """Toy tokenizer: one token per character (its code point); eos is 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


# ---------------------------------------------------------------- packing


def test_pack_blocks_are_the_eos_separated_concatenation():
    blocks = pack(["ab", "cde", "f"], CharTokenizer(), seq_len=3)
    # stream: a b <eos> c d e <eos> f <eos> -> three full blocks
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[97, 98, 0], [99, 100, 101], [0, 102, 0]]
    # the incomplete tail is dropped: 9 tokens in blocks of 4 -> 2 blocks, last token gone
    assert pack(["ab", "cde", "f"], CharTokenizer(), seq_len=4).tolist() == [[97, 98, 0, 99], [100, 101, 0, 102]]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack(["ab"], CharTokenizer(), seq_len=10)


def test_pack_with_trained_tokenizer_is_deterministic_and_batch_independent(tokenizer):
    texts = build_domain("docs", SMALL)[:200]
    a = pack(texts, tokenizer, seq_len=64, batch_size=7)
    b = pack(texts, tokenizer, seq_len=64, batch_size=1000)
    assert torch.equal(a, b)
    stream = []
    for t in texts:
        stream += [*tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert a.flatten().tolist() == stream[: a.numel()]
    # eos appears exactly at document ends: as many eos in the stream as documents
    assert stream.count(tokenizer.eos_token_id) == len(texts)


def test_pack_never_turns_literal_eos_text_into_a_boundary(tokenizer):
    blocks = pack([f"x {EOS_TOKEN} y " * 20], tokenizer, seq_len=8)
    ids = blocks.flatten().tolist()
    assert tokenizer.eos_token_id not in ids[:-1]


# ---------------------------------------------------------------- held-out split


def test_split_heldout_is_deterministic_disjoint_complete_and_order_free():
    docs = [f"document number {i}" for i in range(500)]
    train, held = split_heldout(docs, 0.2, seed=3)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert 60 < len(held) < 140  # ~100 expected
    assert split_heldout(docs, 0.2, seed=3) == (train, held)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_heldout(shuffled, 0.2, seed=3)[1]) == set(held)
    # a document's side does not depend on the others
    assert set(split_heldout(docs[:250], 0.2, seed=3)[1]) == set(held) & set(docs[:250])
    assert set(split_heldout(docs, 0.2, seed=4)[1]) != set(held)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_heldout_never_leaves_a_side_empty(fraction):
    train, held = split_heldout(["one", "two"], fraction, seed=0)
    assert len(train) == 1 and len(held) == 1
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(["one", "two"], 1.0)


# ---------------------------------------------------------------- corpus


def _fresh(name: str, config: CorpusConfig, share: corpus.Share = "all") -> list[str]:
    corpus._domain_all.cache_clear()  # really rebuild, not the in-memory copy
    return build_domain(name, config, share)


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_is_deterministic_nonempty_and_capped(name):
    docs = build_domain(name, SMALL, share="all")
    assert docs == _fresh(name, SMALL)
    assert len(docs) >= 10 and len(set(docs)) == len(docs)
    assert 100_000 < sum(map(len, docs)) <= SMALL.max_chars_per_domain
    assert all(len(d.strip()) >= SMALL.min_doc_chars for d in docs)
    other = build_domain(name, CorpusConfig(seed=1, max_chars_per_domain=150_000), share="all")
    assert other != docs


def test_domains_are_distinct_and_shares_partition_them():
    sets = {name: set(build_domain(name, SMALL, share="all")) for name in DOMAINS}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    general = build_general(SMALL)
    for name in DOMAINS:
        private, public = set(build_domain(name, SMALL)), set(build_domain(name, SMALL, "public"))
        assert private | public == sets[name] and not private & public
        assert 0.1 < len(public) / len(sets[name]) < 0.35  # general_fraction 0.2
        assert public <= set(general)
    assert len(general) == sum(len(build_domain(n, SMALL, "public")) for n in DOMAINS)
    assert build_general(SMALL) == general


def test_code_and_docs_come_from_the_stdlib_without_tests():
    code = build_domain("code", SMALL, share="all")
    paths = [re.match(r"# file: (\S+)", d).group(1) for d in code]  # type: ignore[union-attr]
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in {"test", "tests", "site-packages", "idlelib"} for p in paths for part in p.split("/"))
    files = corpus.stdlib_files(corpus._stdlib_root(SMALL))
    assert len(files) > 300 and all("site-packages" not in f.parts for f in files)
    docs = build_domain("docs", CorpusConfig(), share="all")
    from pydoc_data.topics import topics

    assert topics["assert"].strip() + "\n" in docs  # pydoc topics are included verbatim
    assert any(d.startswith("json.dumps(") for d in docs)  # docstrings with their signature


def test_large_files_are_cut_at_top_level_statements():
    source = "".join(f"def f{i}():\n    return {i}\n\n\n" for i in range(100))
    chunks = corpus._chunk_source(source, 200)
    assert "".join(chunks) == source and all(len(c) <= 200 for c in chunks)
    assert all(c.startswith("def f") for c in chunks)


def test_math_answers_are_correct():
    safe = re.compile(r"^[0-9+\-*() ]+$")
    checked = 0
    for doc in build_domain("math", SMALL, share="all")[:300]:
        for item in doc.strip().split("\n\n"):
            if m := re.fullmatch(r"Q: (\d+) divided by (\d+) = \?\nA: (\d+) remainder (\d+)", item):
                a, b, q, r = map(int, m.groups())
                assert q * b + r == a and 0 <= r < b
            else:
                m = re.fullmatch(r"Q: (.+) = \?\n(?:Steps: (.+)\n)?A: (-?\d+)", item)
                assert m, item
                expression, steps, answer = m.groups()
                assert safe.match(expression) and eval(expression) == int(answer), item
                if steps:
                    values = []
                    for step in steps.split("; "):
                        lhs, rhs = step.rsplit(" = ", 1)
                        assert safe.match(lhs) and eval(lhs) == int(rhs), step
                        values.append(int(rhs))
                    assert values[-1] == int(answer)
            checked += 1
    assert checked > 1000


def test_facts_are_consistent():
    docs = build_domain("facts", SMALL, share="all")
    world = build_world(SMALL.seed)
    capital = {c.name: c.capital for c in world.countries}
    text = "\n".join(docs)
    claims = re.findall(r"The capital of (\w+) is (\w+)\.", text)
    claims += [(b, a) for a, b in re.findall(r"(\w+) is the capital of (\w+)\.", text)]
    claims += re.findall(r"Q: What is the capital of (\w+)\?\nA: (\w+)", text)
    assert len(claims) > 100 and all(capital[c] == cap for c, cap in claims)
    for p, born, died, age in re.findall(r"(\w+ \w+) \((\d+)-(\d+)\).*? at the age of (\d+)\.", text):
        assert int(died) - int(born) == int(age), p
    for country, others in world.neighbours.items():
        assert all(country in world.neighbours[o] for o in others)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_chars_per_domain"):
        CorpusConfig(max_chars_per_domain=0)
    with pytest.raises(ValueError, match="general_fraction"):
        CorpusConfig(general_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        CorpusConfig(seed=-1)
    with pytest.raises(ValueError, match="unknown domain"):
        build_domain("poetry", SMALL)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_round_trips(tokenizer):
    again = train_tokenizer(build_general(SMALL), vocab_size=1024)
    assert again.get_vocab() == tokenizer.get_vocab() and len(tokenizer) == 1024
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    samples = [
        "Q: 37 + 485 = ?\nA: 522",
        "def f(x):\n\treturn x  ** 2  # square\n",
        "  leading and trailing spaces , . ; ",
        "".join(chr(c) for c in range(32, 127)),
    ]
    for s in samples:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == s
    assert tokenizer("12345", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids(c) for c in "12345"
    ]  # digits are split one per token
    assert tokenizer.decode(tokenizer("héllo ☃", add_special_tokens=False)["input_ids"]) == "héllo ☃"


def test_tokenizer_saves_and_loads_offline(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    text = "import json\nprint(json.dumps({'a': 1}))\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token_id == loaded.pad_token_id == 0 and len(loaded) == len(tokenizer)


# ---------------------------------------------------------------- loading


def test_load_texts_jsonl_folder_and_file(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n{"text": "  "}\n', encoding="utf-8")
    assert load_texts(jsonl) == ["first", "second"]
    assert load_texts(jsonl, max_docs=1) == ["first"]
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("bee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "sub" / "c.py").write_text("see = 1", encoding="utf-8")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    assert load_texts(folder) == ["ay", "bee", "see = 1"]
    assert load_texts(folder / "b.md") == ["bee"]
    assert load_texts("embedded:math", corpus=SMALL) == build_domain("math", SMALL)
    assert load_texts("embedded:general", corpus=SMALL) == build_general(SMALL)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', r"d\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"d\.jsonl:2: no field 'text' \(fields: body\)"),
        ('["text"]\n', r"d\.jsonl:1: expected a JSON object"),
        ('{"text": 3}\n', r"d\.jsonl:1: field 'text' is int"),
        ('{"text": ""}\n\n', "no non-empty documents"),
    ],
)
def test_load_texts_jsonl_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_texts(tmp_path / "d.jsonl")


def test_load_texts_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.txt/\.md/\.py files"):
        load_texts(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown embedded domain"):
        load_texts("embedded:poetry")
    (tmp_path / "x.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="only to Hugging Face datasets"):
        load_texts(tmp_path / "x.txt", split="train")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_texts(tmp_path / "bad.txt")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_source_without_datasets_says_what_to_install():
    with pytest.raises(ImportError, match="pip install"):
        load_texts("someone/some-dataset")


def test_fingerprint_names_the_data():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(["ab", "c"]) == fingerprint(["ab", "c"])


# ---------------------------------------------------------------- batches


def test_batch_iterator_covers_each_epoch_and_resumes_exactly():
    blocks = torch.arange(20 * 3).reshape(20, 3)  # (N=20, seq_len=3); row i starts with 3*i
    it = BatchIterator(blocks, batch_size=4, seed=7)
    epoch0 = torch.cat([next(it) for _ in range(5)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 60, 3))  # each block once per epoch
    epoch1 = torch.cat([next(it) for _ in range(5)])
    assert not torch.equal(epoch0, epoch1)  # a new shuffle each epoch

    ref = BatchIterator(blocks, batch_size=4, seed=7)
    for _ in range(7):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    expected = [next(ref) for _ in range(9)]  # crosses the epoch 1 -> 2 boundary
    resumed = BatchIterator(blocks, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(9)], strict=True))
    assert state["epoch"] == 1 and state["index"] == 2

    with pytest.raises(ValueError, match="cannot resume: data"):
        BatchIterator(blocks + 1, batch_size=4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume: seed"):
        BatchIterator(blocks, batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(blocks, batch_size=21)


def test_embedded_end_to_end_blocks(tokenizer):
    train, held = split_heldout(load_texts("embedded:math", corpus=SMALL), 0.1, seed=0)
    blocks = pack(train, tokenizer, seq_len=128)
    assert blocks.shape[1] == 128 and blocks.shape[0] > 100
    assert int(blocks.max()) < len(tokenizer) and int(blocks.min()) >= 0
    assert held and not set(held) & set(train)
    text = tokenizer.decode(blocks[0].tolist())
    assert "Q: " in text and "\nA: " in text


def test_stdlib_dir_override_uses_only_that_tree(tmp_path: Path):
    # stdlib_dir points the code domain at another tree (e.g. a pinned Python): only its files are used
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text('"""A module docstring long enough to keep it."""\n' + "x = 1\n" * 20)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text("assert True\n" * 20)
    config = CorpusConfig(stdlib_dir=str(tmp_path), min_doc_chars=16)
    code = build_domain("code", config, share="all")
    assert code == ["# file: pkg/mod.py\n" + (tmp_path / "pkg" / "mod.py").read_text()]
