"""Data loaders -> EvalSplit: every format on generated data, against the raw ids / the
tokenizer's own encode, plus every documented bad-input error."""
import gzip
import json
import logging
import os
import re
import tracemalloc

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from moe_grok.checkpoints import test_correctness as test_accuracy
from moe_grok.data import corpus as data
from moe_grok.data.splits import EvalSplit

from config_files import CONFIG_DIR, load_config

PAD = data.OLMOE_PAD_ID
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "past", "two", "red", "cars",
         "and", "one", "blue", "bike", "near", "old", "green", "trees", "in", "quiet", "morning", "light"]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
def random_text(rng, lo=2, hi=20):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def write_jsonl(path, records, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def assert_lm_row(split, row, ids, seq_len, pad_id=PAD):
    """Row `row` of split holds `ids` (already <= seq_len) right-padded, with next-token targets."""
    n = len(ids)
    expected = np.full(seq_len, pad_id)
    expected[:n] = ids
    np.testing.assert_array_equal(split.tokens[row], expected)
    np.testing.assert_array_equal(split.mask[row], (np.arange(seq_len) < n).astype(int))
    np.testing.assert_array_equal(split.targets[row, : n - 1], ids[1:])
    np.testing.assert_array_equal(split.target_mask[row], (np.arange(seq_len) < n - 1).astype(int))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny BPE trained in-test, saved as tokenizer.json; pad "<|padding|>" = id 1 like OLMoE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|padding|>", "<|endoftext|>"])
    rng = np.random.default_rng(0)
    tok.train_from_iterator([random_text(rng) for _ in range(200)], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_path)


# ----------------------------------------------------------------------------------------
# Shared core
# ----------------------------------------------------------------------------------------
def test_split_targets_are_next_tokens_over_real_positions():
    split = data.make_lm_split({"a": [[5, 6, 7, 8], [9, 10]]}, seq_len=5, pad_id=1)
    np.testing.assert_array_equal(split.targets[0], [6, 7, 8, 1, 0])  # position 3 targets padding ...
    np.testing.assert_array_equal(split.target_mask[0], [1, 1, 1, 0, 0])  # ... so it is not scored
    np.testing.assert_array_equal(split.target_mask[1], [1, 0, 0, 0, 0])
    assert split.targets.dtype == np.int32 and split.target_mask.dtype == np.int32


def test_make_lm_split_layout_and_groups():
    split, info = data.make_lm_split({"a": [[5, 6, 7], [8, 9]], "b": [[3, 4, 5, 6, 7, 8]]}, seq_len=4,
                                     return_info=True)
    assert isinstance(split, EvalSplit)
    assert split.group_names == ("a", "b") and split.groups.tolist() == [0, 0, 1]
    assert split.tokens.dtype == np.int32 and split.mask.dtype == np.int32
    assert_lm_row(split, 0, np.array([5, 6, 7]), 4)
    assert_lm_row(split, 1, np.array([8, 9]), 4)
    assert_lm_row(split, 2, np.array([3, 4, 5, 6]), 4)
    assert split.tokens[1].tolist() == [8, 9, PAD, PAD]
    assert info.n_truncated == 1 and info.lengths.tolist() == [3, 2, 4]
    custom = data.make_lm_split({"a": [[5, 6]]}, seq_len=3, pad_id=0)
    assert custom.tokens.tolist() == [[5, 6, 0]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=1), "seq_len must be an integer >= 2"),
    (dict(seq_len=4, pad_id=10, vocab_size=10), r"pad_id 10 must be an integer in \[0, 10\)"),
    (dict(seq_len=4, max_samples_per_group=0), "max_samples_per_group"),
    (dict(seq_len=4, on_short="ignore"), "on_short"),
])
def test_common_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.make_lm_split({"a": [[1, 2, 3]]}, **kwargs)


def test_short_samples_dropped_with_warning_or_error(caplog):
    samples = {"a": [[4, 5], [7], [], [6, 7, 8]], "b": [[1, 2]]}
    with caplog.at_level(logging.WARNING, logger="moe_grok.data"):
        split, info = data.make_lm_split(samples, seq_len=4, return_info=True)
    assert info.n_dropped_short == 2 and info.sample_ids == ("a[0]", "a[3]", "b[0]")
    assert split.tokens[:, :2].tolist() == [[4, 5], [6, 7], [1, 2]]
    assert "dropped 2 sample(s)" in caplog.text and "a[1]" in caplog.text
    with pytest.raises(ValueError, match=r"a\[1\]: sample has 1 token"):
        data.make_lm_split(samples, seq_len=4, on_short="error")
    with pytest.raises(ValueError, match="group 'b' has no sample with >= 2 tokens"):
        data.make_lm_split({"a": [[1, 2]], "b": [[3], []]}, seq_len=4)
    with pytest.raises(ValueError, match="group 'b' has no samples"):
        data.make_lm_split({"a": [[1, 2]], "b": []}, seq_len=4)


# ----------------------------------------------------------------------------------------
# JSONL text
# ----------------------------------------------------------------------------------------
def test_jsonl_text_groups_from_field_match_tokenizer(tmp_path, tokenizer, tokenizer_path):
    rng = np.random.default_rng(1)
    domains = ["math", "code", "math", "books", "code", "math"]
    records = [{"text": random_text(rng), "domain": d, "id": i} for i, d in enumerate(domains)]
    path = write_jsonl(tmp_path / "mixed.jsonl", records[:4])
    path2 = write_jsonl(tmp_path / "more.jsonl.gz", records[4:], compress=True)
    seq_len = 40
    split, info = data.load_jsonl_text([path, path2], tokenizer_path, seq_len, group_field="domain",
                                       return_info=True)
    assert split.group_names == ("math", "code", "books")  # first appearance
    # rows: group by group, file order inside a group
    order = [0, 2, 5, 1, 4, 3]
    assert split.groups.tolist() == [0, 0, 0, 1, 1, 2]
    for row, i in enumerate(order):
        ids = np.array(tokenizer.encode(records[i]["text"]).ids)
        assert 2 <= len(ids) <= seq_len
        assert_lm_row(split, row, ids, seq_len)
    assert info.sample_ids[0] == f"{path}:line 1" and info.sample_ids[2] == f"{path2}:line 2"
    assert info.n_truncated == 0 and info.available == {"math": 3, "code": 2, "books": 1}
    # selecting / reordering groups
    only = data.load_jsonl_text([path, path2], tokenizer_path, seq_len, group_field="domain",
                                groups=["books", "math"])
    assert only.group_names == ("books", "math") and only.groups.tolist() == [0, 1, 1, 1]
    np.testing.assert_array_equal(only.tokens[1:], split.tokens[:3])


def test_jsonl_text_groups_from_files_and_eos(tmp_path, tokenizer, tokenizer_path):
    rng = np.random.default_rng(2)
    texts = {"open-web-math": [random_text(rng) for _ in range(3)], "starcoder": [random_text(rng) for _ in range(2)]}
    paths = [write_jsonl(tmp_path / "open-web-math.jsonl", [{"text": t} for t in texts["open-web-math"]]),
             write_jsonl(tmp_path / "starcoder.jsonl.gz", [{"text": t} for t in texts["starcoder"]], compress=True)]
    split = data.load_jsonl_text(paths, tokenizer_path, 64, groups_from_files=True, add_eos=True)
    assert split.group_names == ("open-web-math", "starcoder")
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = texts["open-web-math"] + texts["starcoder"]
    for row, text in enumerate(rows):
        ids = np.array(tokenizer.encode(text).ids + [eos])
        assert_lm_row(split, row, ids, 64)
    # a Tokenizer object works as well as its file, and loads are deterministic
    again = data.load_jsonl_text(paths, tokenizer, 64, groups_from_files=True, add_eos=True)
    assert again.fingerprint() == split.fingerprint()
    with pytest.raises(ValueError, match="'<eos>' is not in the tokenizer"):
        data.load_jsonl_text(paths, tokenizer, 64, groups_from_files=True, add_eos=True, eos_token="<eos>")


def test_jsonl_text_truncation_is_counted_and_logged(tmp_path, tokenizer, tokenizer_path, caplog):
    rng = np.random.default_rng(3)
    texts = [random_text(rng, 2, 4), random_text(rng, 30, 40), random_text(rng, 30, 40)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": t, "g": "x"} for t in texts])
    seq_len = 8
    with caplog.at_level(logging.WARNING, logger="moe_grok.data"):
        split, info = data.load_jsonl_text(path, tokenizer_path, seq_len, text_field="body", group_field="g",
                                           return_info=True)
    full = [tokenizer.encode(t).ids for t in texts]
    assert sum(len(ids) > seq_len for ids in full) == 2 == info.n_truncated
    assert "truncated 2 of 3 sample(s)" in caplog.text
    for row, ids in enumerate(full):
        assert_lm_row(split, row, np.array(ids[:seq_len]), seq_len)
    assert info.lengths.tolist() == [min(len(ids), seq_len) for ids in full]


def test_jsonl_seeded_subsampling_is_deterministic_and_per_group(tmp_path, tokenizer_path):
    rng = np.random.default_rng(4)
    a = [{"text": f"cat {random_text(rng)}", "i": i} for i in range(30)]
    b = [{"text": random_text(rng)} for _ in range(5)]
    pa, pb = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)

    def load(paths, seed):
        return data.load_jsonl_text(paths, tokenizer_path, 32, groups_from_files=True, max_samples_per_group=7,
                                    seed=seed, return_info=True)

    s1, i1 = load([pa, pb], 0)
    s2, i2 = load([pa, pb], 0)
    s3, i3 = load([pa, pb], 1)
    assert s1.fingerprint() == s2.fingerprint() and i1.sample_ids == i2.sample_ids
    assert i1.sample_ids != i3.sample_ids
    assert np.bincount(s1.groups).tolist() == [7, 5] and i1.available == {"a": 30, "b": 5}
    lines = [int(s.rsplit(" ", 1)[1]) for s in i1.sample_ids[:7]]
    assert lines == sorted(lines) and len(set(lines)) == 7  # without replacement, file order kept
    # a group's choice does not depend on the other groups
    s4, i4 = load([pa], 0)
    assert i4.sample_ids == i1.sample_ids[:7]
    np.testing.assert_array_equal(s4.tokens, s1.tokens[:7])


def test_jsonl_grouping_and_format_errors(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "the cat sat", "domain": "a"}])
    with pytest.raises(ValueError, match="exactly one of group_field"):
        data.load_jsonl_text(good, tokenizer_path, 8)
    with pytest.raises(ValueError, match="exactly one of group_field"):
        data.load_jsonl_text(good, tokenizer_path, 8, group_field="domain", groups_from_files=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: file is empty"):
        data.load_jsonl_text([good, str(empty)], tokenizer_path, 8, groups_from_files=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat", "domain": "a"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:line 2: invalid JSON"):
        data.load_jsonl_text(str(bad), tokenizer_path, 8, group_field="domain")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "a cat", "domain": "a"}, {"text": "the dog"}])
    with pytest.raises(ValueError, match="nofield.jsonl:line 2: record has no group field 'domain'"):
        data.load_jsonl_text(nofield, tokenizer_path, 8, group_field="domain")
    with pytest.raises(ValueError, match="good.jsonl:line 1: record has no field 'content'"):
        data.load_jsonl_text(good, tokenizer_path, 8, text_field="content", groups_from_files=True)
    notext = write_jsonl(tmp_path / "notext.jsonl", [{"text": ["a"], "domain": "a"}])
    with pytest.raises(ValueError, match="notext.jsonl:line 1: field 'text' must be a string"):
        data.load_jsonl_text(notext, tokenizer_path, 8, group_field="domain")
    with pytest.raises(ValueError, match=r"group\(s\) \['zzz'\] not found"):
        data.load_jsonl_text(good, tokenizer_path, 8, group_field="domain", groups=["a", "zzz"])
    with pytest.raises(FileNotFoundError):
        data.load_jsonl_text(str(tmp_path / "missing.jsonl"), tokenizer_path, 8, groups_from_files=True)


def test_malformed_tokenizer_json_is_named(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "the cat sat", "domain": "a"}])
    with open(tokenizer_path) as f:
        text = f.read()
    truncated = tmp_path / "tokenizer.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))}: not a valid tokenizers tokenizer.json"):
        data.load_jsonl_text(good, str(truncated), 8, group_field="domain")


# ----------------------------------------------------------------------------------------
# JSONL ids
# ----------------------------------------------------------------------------------------
def test_jsonl_ids_match_raw_ids(tmp_path, rng):
    recs = {g: [rng.integers(0, 1000, size=int(rng.integers(2, 15))).tolist() for _ in range(4)]
            for g in ("wiki", "books")}
    paths = [write_jsonl(tmp_path / f"{g}.jsonl", [{"input_ids": ids} for ids in seqs]) for g, seqs in recs.items()]
    split, info = data.load_jsonl_ids(paths, 10, groups_from_files=True, vocab_size=1000, return_info=True)
    assert split.group_names == ("wiki", "books")
    rows = recs["wiki"] + recs["books"]
    for row, ids in enumerate(rows):
        assert_lm_row(split, row, np.array(ids[:10]), 10)
    assert info.n_truncated == sum(len(ids) > 10 for ids in rows)
    # group field, custom field name
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"ids": [3, 4, 5], "src": 7}, {"ids": [6, 7], "src": "x"}])
    split = data.load_jsonl_ids(mixed, 4, ids_field="ids", group_field="src")
    assert split.group_names == ("7", "x") and split.tokens.tolist() == [[3, 4, 5, PAD], [6, 7, PAD, PAD]]


def test_jsonl_ids_errors_name_the_sample(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 50, 6]}])
    with pytest.raises(ValueError, match=r"ids.jsonl:line 2: token id 50 outside \[0, 50\)"):
        data.load_jsonl_ids(path, 8, groups_from_files=True, vocab_size=50)
    neg = write_jsonl(tmp_path / "neg.jsonl", [{"input_ids": [1, -3]}])
    with pytest.raises(ValueError, match="neg.jsonl:line 1: token id -3"):
        data.load_jsonl_ids(neg, 8, groups_from_files=True)
    flt = write_jsonl(tmp_path / "flt.jsonl", [{"input_ids": [1, 2.5]}])
    with pytest.raises(ValueError, match="flt.jsonl:line 1: token ids must be integers, found 2.5"):
        data.load_jsonl_ids(flt, 8, groups_from_files=True)
    txt = write_jsonl(tmp_path / "txt.jsonl", [{"input_ids": "1 2 3"}])
    with pytest.raises(ValueError, match="txt.jsonl:line 1: expected a list of integer token ids"):
        data.load_jsonl_ids(txt, 8, groups_from_files=True)
    short = write_jsonl(tmp_path / "short.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [9]}])
    with pytest.raises(ValueError, match="short.jsonl:line 2: sample has 1 token"):
        data.load_jsonl_ids(short, 8, groups_from_files=True, on_short="error")
    # ids beyond seq_len are never used, so they are not checked
    tail = write_jsonl(tmp_path / "tail.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 99]}])
    assert data.load_jsonl_ids(tail, 2, groups_from_files=True, vocab_size=50).tokens.tolist() == [[1, 2], [4, 5]]


# ----------------------------------------------------------------------------------------
# .npy id matrices
# ----------------------------------------------------------------------------------------
def test_npy_ids_full_rows_lengths_and_file_pad(tmp_path, rng):
    a = rng.integers(2, 500, size=(6, 12)).astype(np.int64)
    b = rng.integers(2, 500, size=(3, 5)).astype(np.uint16)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    split, info = data.load_npy_ids({"math": tmp_path / "a.npy", "code": tmp_path / "b.npy"}, 8, return_info=True)
    assert split.group_names == ("math", "code") and split.groups.tolist() == [0] * 6 + [1] * 3
    for row in range(6):
        assert_lm_row(split, row, a[row, :8], 8)
    for row in range(3):
        assert_lm_row(split, 6 + row, b[row], 8)
    assert info.n_truncated == 6 and info.sample_ids[7] == f"{tmp_path / 'b.npy'}:row 1"

    lengths = np.array([12, 3, 0, 7, 1, 5])
    np.save(tmp_path / "a_len.npy", lengths)
    split, info = data.load_npy_ids({"math": tmp_path / "a.npy"}, 8, lengths_by_group={"math": tmp_path / "a_len.npy"},
                                    return_info=True)
    kept = [0, 1, 3, 5]  # lengths 0 and 1 dropped
    assert info.n_dropped_short == 2 and info.n_truncated == 1
    for row, r in enumerate(kept):
        assert_lm_row(split, row, a[r, :min(lengths[r], 8)], 8)

    padded = np.array([[5, 6, 7, 0, 0], [8, 0, 9, 0, 0], [3, 4, 5, 6, 7]])
    np.save(tmp_path / "p.npy", padded)
    split = data.load_npy_ids({"x": tmp_path / "p.npy"}, 6, file_pad_id=0)
    assert split.mask.sum(1).tolist() == [3, 3, 5]  # only the trailing pad run is padding
    assert split.tokens[1].tolist() == [8, 0, 9, PAD, PAD, PAD]


def test_npy_ids_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(10))
    np.save(tmp_path / "float.npy", np.ones((2, 3)))
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.int32))
    np.save(tmp_path / "obj.npy", np.array([[1, 2], [3]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ok.npy", np.arange(12).reshape(3, 4))
    np.save(tmp_path / "badlen.npy", np.array([2, 5, 1]))
    cases = [
        ({"g": tmp_path / "flat.npy"}, {}, r"flat.npy \(group 'g'\): expected a 2-D"),
        ({"g": tmp_path / "float.npy"}, {}, "float.npy .*must be integers"),
        ({"g": tmp_path / "empty.npy"}, {}, r"empty.npy \(group 'g'\): file is empty"),
        ({"g": tmp_path / "obj.npy"}, {}, "obj.npy: cannot read token ids"),
        ({"g": tmp_path / "ok.npy"}, {"lengths_by_group": {"g": tmp_path / "badlen.npy"}},
         r"badlen.npy: row 1 length 5 outside \[0, 4\]"),
        ({"g": tmp_path / "ok.npy"}, {"lengths_by_group": {"g": tmp_path / "flat.npy"}}, "shape \\(3,\\)"),
        ({"g": tmp_path / "ok.npy"}, {"vocab_size": 10}, r"ok.npy:row 2: token id 11 outside \[0, 10\)"),
        ({"g": tmp_path / "ok.npy"}, {"lengths_by_group": {}, "file_pad_id": 0}, "at most one"),
    ]
    for paths, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            data.load_npy_ids(paths, 8, **kwargs)


# ----------------------------------------------------------------------------------------
# OLMo memory-mapped token files
# ----------------------------------------------------------------------------------------
def write_tokens(path, tokens, dtype):
    np.asarray(tokens, dtype).tofile(path)  # raw, no header: like OLMo's .npy token files
    return str(path)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_olmo_memmap_fixed_chunks(tmp_path, rng, dtype):
    high = 60000 if dtype == np.uint16 else 2**31 - 1
    streams = {"web": rng.integers(0, high, size=53), "code": rng.integers(0, high, size=24)}
    paths = [write_tokens(tmp_path / f"{g}.npy", s, dtype) for g, s in streams.items()]
    L = 8
    split, info = data.load_olmo_memmap(paths, L, dtype=dtype, return_info=True)
    assert split.group_names == ("web", "code")
    assert np.bincount(split.groups).tolist() == [6, 3]  # 53 // 8 (remainder dropped), 24 // 8
    assert split.mask.all()
    for row in range(6):
        assert_lm_row(split, row, streams["web"][row * L:(row + 1) * L], L)
    for row in range(3):
        assert_lm_row(split, 6 + row, streams["code"][row * L:(row + 1) * L], L)
    # global OLMo numbering: the code file's first chunk is instance 6
    assert info.sample_ids[6] == f"{paths[1]}[instance 6]" and info.n_truncated == 0
    # instances longer than seq_len: truncated and counted; only seq_len tokens are used
    split, info = data.load_olmo_memmap(paths, 5, dtype=dtype, instance_length=12, return_info=True)
    assert info.n_truncated == len(split.tokens) == 4 + 2
    np.testing.assert_array_equal(split.tokens[5], streams["code"][12:17])
    # group mapping: both files into one group, in mapping order
    split = data.load_olmo_memmap({"all": [paths[1], paths[0]]}, L, dtype=dtype)
    assert split.group_names == ("all",) and len(split.tokens) == 9
    np.testing.assert_array_equal(split.tokens[3], streams["web"][:L])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_olmo_memmap_explicit_instance_index(tmp_path, rng, dtype):
    a, b = rng.integers(0, 1000, size=40), rng.integers(0, 1000, size=30)
    paths = [write_tokens(tmp_path / "a.bin", a, dtype), write_tokens(tmp_path / "b.bin", b, dtype)]
    L = 10  # a: instances 0-3, b: instances 4-6
    np.save(tmp_path / "ids.npy", np.array([5, 2, 0, 6]))
    split, info = data.load_olmo_memmap(paths, L, dtype=dtype, instances=tmp_path / "ids.npy", return_info=True)
    assert split.group_names == ("a", "b") and split.groups.tolist() == [0, 0, 1, 1]
    expected = [a[20:30], a[0:10], b[10:20], b[20:30]]  # index order kept inside a group
    for row, ids in enumerate(expected):
        assert_lm_row(split, row, ids, L)
    assert info.sample_ids == (f"{paths[0]}[instance 2]", f"{paths[0]}[instance 0]",
                               f"{paths[1]}[instance 5]", f"{paths[1]}[instance 6]")  # global OLMo ids
    # [start, end) offsets in the concatenated stream (b starts at 40); ragged lengths pad
    offsets = np.array([[3, 9], [41, 52], [0, 40]])
    split, info = data.load_olmo_memmap(paths, 12, dtype=dtype, instances=offsets, return_info=True)
    assert_lm_row(split, 0, a[3:9], 12)
    assert_lm_row(split, 1, a[0:12], 12)
    assert_lm_row(split, 2, b[1:12], 12)
    assert info.n_truncated == 1 and info.sample_ids[2] == f"{paths[1]}[tokens 1:12]"
    # groups given by a mapping of instance ids (one data file, two selections)
    split = data.load_olmo_memmap(paths[0], L, dtype=dtype, instances={"memorized": [3, 1], "other": np.array([0])})
    assert split.group_names == ("memorized", "other")
    np.testing.assert_array_equal(split.tokens, np.stack([a[30:40], a[10:20], a[0:10]]))
    # subsampling an index is seeded and deterministic
    many = data.load_olmo_memmap(paths, 5, dtype=dtype, instances=np.arange(14), max_samples_per_group=3, seed=9,
                                 return_info=True)
    again = data.load_olmo_memmap(paths, 5, dtype=dtype, instances=np.arange(14), max_samples_per_group=3, seed=9,
                                  return_info=True)
    assert many[1].sample_ids == again[1].sample_ids and many[0].fingerprint() == again[0].fingerprint()
    assert np.bincount(many[0].groups).tolist() == [3, 3] and many[1].available == {"a": 8, "b": 6}


def test_olmo_memmap_errors(tmp_path):
    a = write_tokens(tmp_path / "a.npy", np.arange(40), np.uint32)
    b = write_tokens(tmp_path / "b.npy", np.arange(30), np.uint32)
    odd = write_tokens(tmp_path / "odd.npy", np.arange(5), np.uint16)  # 10 bytes: not uint32
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    short = write_tokens(tmp_path / "short.npy", np.arange(3), np.uint32)
    cases = [
        (dict(data_paths=[a, odd]), "odd.npy: size 10 bytes is not a multiple of uint32"),
        (dict(data_paths=[a, str(empty)]), "empty.npy: file is empty"),
        (dict(data_paths=[a, short]), "group 'short': .* hold no complete 10-token instance"),
        (dict(data_paths=[a, b], instances=[1, 7]), r"instance id 7 \(entry 1\) outside \[0, 7\)"),
        (dict(data_paths=[a, b], instances=[[35, 45]]), r"entry 0 offsets \[35, 45\) are not a non-empty range"),
        (dict(data_paths=[a, b], instances=[0, 1]), "group 'b': the instance index selects no instance"),
        (dict(data_paths=[a], instances=[2, 2]), r"instance .*\[instance 2\] is selected twice"),
        (dict(data_paths=[a], instances=[0.5]), "must be integers"),
        (dict(data_paths=[a], vocab_size=35), r"a.npy\[instance 3\]: token id 39 outside \[0, 35\)"),
        (dict(data_paths=[a], dtype=np.int64), "dtype must be uint16 or uint32"),
        (dict(data_paths={"g": a}, instances={"g": [0]}), "not both"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            data.load_olmo_memmap(seq_len=10, **kwargs)


def test_olmo_memmap_reads_only_selected_instances(tmp_path):
    """A 256 MiB sparse token file: sampling 4 instances must not pull the file into RAM."""
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        split = data.load_olmo_memmap([str(path)], 16, max_samples_per_group=4, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert split.tokens.shape == (4, 16) and not split.tokens.any()
    assert peak < 8 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_open_token_file_reads_headered_npy(tmp_path):
    tokens = np.arange(20, dtype=np.uint16)
    np.save(tmp_path / "with_header.npy", tokens)
    arr = data.open_token_file(tmp_path / "with_header.npy", dtype=np.uint32)  # header dtype wins
    np.testing.assert_array_equal(arr, tokens)
    split = data.load_olmo_memmap([str(tmp_path / "with_header.npy")], 5)
    np.testing.assert_array_equal(split.tokens.ravel(), tokens)


# ----------------------------------------------------------------------------------------
# Test-accuracy CSV
# ----------------------------------------------------------------------------------------
def write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_test_accuracy_csv_parsing(tmp_path):
    path = write_csv(tmp_path / "acc.csv", "step,group,accuracy,note\n"
                     "2000,math,0.5,x\n1000,math,0.25,\n1000,code,0.1,\n2000,code,1,\n 3000 ,math, 0.75\n"
                     "3000.0,code,0.0,\n\n")
    steps, acc = test_accuracy.load_test_accuracy_csv(path)
    assert steps.tolist() == [1000, 2000, 3000] and steps.dtype == np.int64
    assert list(acc) == ["math", "code"]
    np.testing.assert_allclose(acc["math"], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(acc["code"], [0.1, 1.0, 0.0])
    steps, acc = test_accuracy.load_test_accuracy_csv(path, steps=[3000, 1000])
    assert steps.tolist() == [1000, 3000] and acc["math"].tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"no accuracy for checkpoint step\(s\) \[1500\]"):
        test_accuracy.load_test_accuracy_csv(path, steps=[1000, 1500])


@pytest.mark.parametrize("text, match", [
    ("", "file is empty"),
    ("step,group,acc\n1,a,0.5\n", r"missing column\(s\) \['accuracy'\]"),
    ("step,group,accuracy\n", "no data rows"),
    ("step,group,accuracy\n1,a,0.5\nten,a,0.5\n", "line 3: step 'ten' is not a number"),
    ("step,group,accuracy\n1.5,a,0.5\n", "line 2: step '1.5' must be a non-negative integer"),
    ("step,group,accuracy\n1,a,0.5\n2,a,1.2\n", r"line 3: accuracy 1.2 outside \[0, 1\]"),
    ("step,group,accuracy\n1,a,-0.1\n", r"line 2: accuracy -0.1 outside \[0, 1\]"),
    ("step,group,accuracy\n1,a,nan\n", r"line 2: accuracy nan outside \[0, 1\]"),
    ("step,group,accuracy\n1,a,high\n", "line 2: accuracy 'high' is not a number"),
    ("step,group,accuracy\n1,,0.3\n", "line 2: empty group"),
    ("step,group,accuracy\n1,a,0.3\n1,a,0.4\n", r"line 3: duplicate row for group 'a' step 1 \(first at line 2\)"),
    ("step,group,accuracy\n1,a,0.3\n2,a,0.4\n1,b,0.3\n", r"group 'b' has no row for step\(s\) \[2\]"),
    ("step,group,accuracy\n1,a\n", "line 2: expected 3 columns"),
])
def test_test_accuracy_csv_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        test_accuracy.load_test_accuracy_csv(write_csv(tmp_path / "bad.csv", text))


# ----------------------------------------------------------------------------------------
# Config-driven entry point
# ----------------------------------------------------------------------------------------
def _data_config(**values):
    config = load_config("olmoe_grokking").data
    config.update(values)
    return config


def test_load_split_from_config_every_format(tmp_path, tokenizer, tokenizer_path, rng):
    texts = {"owm": ["one two three", "the cat sat on a mat"], "code": ["red cars and bikes"]}
    paths = [write_jsonl(tmp_path / f"{g}.jsonl", [{"text": t} for t in ts]) for g, ts in texts.items()]
    split = data.load_split(_data_config(paths=",".join(paths), tokenizer=tokenizer_path, seq_len=16))
    assert split.group_names == ("owm", "code")
    direct = data.load_jsonl_text(paths, tokenizer_path, 16, groups_from_files=True, max_samples_per_group=1000)
    assert split.fingerprint() == direct.fingerprint()

    ids = [rng.integers(0, 100, size=(4, 6)), rng.integers(0, 100, size=(2, 6))]
    npys = [str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    for p, a in zip(npys, ids, strict=False):
        np.save(p, a)
    split = data.load_split(_data_config(format="npy", paths=",".join(npys), seq_len=6, max_samples_per_group=0))
    assert split.group_names == ("x", "y")
    np.testing.assert_array_equal(split.tokens, np.concatenate(ids))

    flat = write_tokens(tmp_path / "shard.npy", np.arange(40), np.uint16)
    np.save(tmp_path / "idx.npy", np.array([3, 1]))
    split = data.load_split(_data_config(format="olmo_memmap", paths=flat, seq_len=10, memmap_dtype="uint16",
                                         instances=str(tmp_path / "idx.npy")))
    assert split.tokens[:, 0].tolist() == [30, 10]
    ids_file = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3], "d": "a"}])
    split, info = data.load_split(_data_config(format="jsonl_ids", paths=ids_file, seq_len=2, group_field="d",
                                               groups_from_files=False), return_info=True)
    assert split.tokens.tolist() == [[1, 2]] and info.n_truncated == 1
    with pytest.raises(ValueError, match="data format must be one of"):
        data.load_split(_data_config(format="parquet", paths=flat, seq_len=8))
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        data.load_split(_data_config(paths=paths[0], tokenizer="", seq_len=8))
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['tokenizer'"):
        data.load_split({"format": "npy", "paths": npys, "seq_len": 6})


class _Recorder(dict):
    """A mapping that records which keys were read."""

    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading the config file
def test_every_key_the_loader_reads_is_declared_and_settable_from_the_command_line(tmp_path, tokenizer_path):
    declared = load_config("olmoe_grokking").data
    assert set(declared) == set(data.DATA_CONFIG_KEYS)
    for fmt in data.FORMATS:  # the loader reads only declared keys (it fails before reading files otherwise)
        recorder = _Recorder(_data_config(format=fmt, paths=str(tmp_path / "absent")).to_dict())
        with pytest.raises((FileNotFoundError, ValueError)):
            data.load_split(recorder)
        assert recorder.read <= set(declared), recorder.read - set(declared)

    overrides = {"add_eos": "True", "eos_token": "<eos>", "add_special_tokens": "False", "text_field": "body",
                 "ids_field": "ids", "pad_id": "0", "vocab_size": "50304", "on_short": "error", "lengths": "a.npy",
                 "file_pad_id": "0", "instance_length": "256", "instances": "idx.npy", "group_field": "domain",
                 "groups_from_files": "False", "max_samples_per_group": "7", "seed": "3", "seq_len": "64",
                 "memmap_dtype": "uint16", "format": "npy", "paths": "a.npy,b.npy", "tokenizer": "tok.json"}
    assert set(overrides) == set(declared)
    flag_values = flags.FlagValues()  # the command line parsed as experiments/olmoe_grokking.py's absl flags are
    argv = ["show_config", *(f"--config.data.{k}={v}" for k, v in overrides.items())]
    config = config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "olmoe_grokking.py"),
                                             flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    parsed = config.value.data.to_dict()
    for key, text in overrides.items():
        expected = {"True": True, "False": False}.get(text, text)
        assert str(parsed[key]) == str(expected), (key, parsed[key])


def test_test_correctness_csv(tmp_path):
    path = tmp_path / "correct.csv"
    path.write_text("step,group,sample,correct\n" + "".join(
        f"{step},{group},{sample},{int(step >= onset)}\n"
        for step in (100, 200, 300) for group, sample, onset in (("math", "q1", 200), ("code", "c1", 300),
                                                                  ("math", "q2", 100))))
    steps, correct, rows = test_accuracy.load_test_correctness_csv(path)
    assert steps.tolist() == [100, 200, 300]
    assert correct["math"].tolist() == [[False, True], [True, True], [True, True]]  # [checkpoints, samples]
    assert {k: v.tolist() for k, v in rows.items()} == {"math": [0, 2], "code": [1]}  # first-appearance order
    assert test_accuracy.load_test_correctness_csv(path, steps=[300, 100])[0].tolist() == [100, 300]
    for text, message in (("step,group,sample\n1,a,b\n", r"missing column\(s\) \['correct'\]"),
                          ("step,group,sample,correct\n1,a,b,maybe\n", "line 2: correct 'maybe' must be 0/1"),
                          ("step,group,sample,correct\n1,a,b,1\n1,a,b,0\n", "line 3: duplicate row"),
                          ("step,group,sample,correct\n1,a,b,1\n2,a,b,1\n1,a,c,1\n", r"sample 'c' has no row for "
                                                                                      r"step\(s\) \[2\]"),
                          ("step,group,sample,correct\n", "no data rows")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            test_accuracy.load_test_correctness_csv(path)
    with pytest.raises(ValueError, match=r"no correctness for checkpoint step\(s\) \[7\]"):
        path.write_text("step,group,sample,correct\n1,a,b,1\n")
        test_accuracy.load_test_correctness_csv(path, steps=[7])
