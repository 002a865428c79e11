"""Tests for lensllm_jax.training.textdata on small local files written here."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lensllm_jax import errors
from lensllm_jax.training import textdata

WORDS = "the cat sat on a mat and dog ran far away from home to see big red sun".split()


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = rng.choice(WORDS, size=rng.integers(3, 8))
    out.append({"doc": f"{i} " + " ".join(words), "summ": " ".join(sorted(words)[:2])})
  return out


@pytest.fixture(scope="module")
def tok():
  texts = [r["doc"] + " " + r["summ"] for r in _records(200)]
  return textdata.train_tokenizer(texts, vocab_size=300)


def test_registry_has_paper_tasks():
  for name in ("flan", "wikitext", "gigaword", "wmt19"):
    spec = textdata.TASKS[name]
    assert spec.name == name
  assert textdata.TASKS["wikitext"].is_lm
  assert not textdata.TASKS["gigaword"].is_lm
  # Dotted fields reach into WMT's nested "translation" records.
  src, tgt = textdata.format_example(
      textdata.TASKS["wmt19"], {"translation": {"zh": "你好", "en": "hello"}})
  assert "你好" in src and tgt == " hello"
  with pytest.raises(errors.DataError, match="translation.en"):
    textdata.format_example(textdata.TASKS["wmt19"], {"translation": {"zh": "x"}}, where="row 3")


def test_local_json_csv_text_same_path(tmp_path):
  recs = _records(30)
  jpath = tmp_path / "d.jsonl"
  jpath.write_text("".join(json.dumps(r) + "\n" for r in recs))
  cpath = tmp_path / "d.csv"
  with open(cpath, "w", newline="") as f:
    w = csv.DictWriter(f, ["doc", "summ"])
    w.writeheader()
    w.writerows(recs)
  kw = dict(input_field="doc", target_field="summ", prompt="S: {input}\nT:", target_prefix=" ")
  sj = textdata.load_task(textdata.local_task("j", str(jpath), **kw), num_validation=5,
                          num_test=5, cache_dir=str(tmp_path / "c"))
  sc = textdata.load_task(textdata.local_task("c", str(cpath), **kw), num_validation=5,
                          num_test=5, cache_dir=str(tmp_path / "c"))
  assert sj == sc
  assert [len(sj[k]) for k in ("train", "validation", "test")] == [20, 5, 5]
  # Carved splits are disjoint and cover the file.
  ids = [s.split()[1] for k in sj for s, _ in sj[k]]
  assert sorted(ids, key=int) == [str(i) for i in range(30)]
  src, tgt = sj["train"][0]
  assert src.startswith("S: ") and src.endswith("\nT:") and tgt.startswith(" ")
  # The "text" builder: a language-modelling task, empty lines dropped.
  tpath = tmp_path / "d.txt"
  tpath.write_text("first line of text\n\nsecond line here\nthird one\n")
  lm = textdata.load_task(textdata.local_task("t", str(tpath), min_target_chars=3),
                          num_validation=1, num_test=1, cache_dir=str(tmp_path / "c"))
  assert sum(len(v) for v in lm.values()) == 3
  assert all(s == "" for v in lm.values() for s, _ in v)


def test_existing_splits_are_used(tmp_path):
  paths = {}
  for split, n in (("train", 12), ("validation", 4), ("test", 6)):
    p = tmp_path / f"{split}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _records(n, seed=len(split))))
    paths[split] = str(p)
  spec = textdata.local_task("x", paths, input_field="doc", target_field="summ",
                             validation_split="validation", test_split="test")
  s = textdata.load_task(spec, max_test=5, cache_dir=str(tmp_path / "c"))
  assert [len(s[k]) for k in ("train", "validation", "test")] == [12, 4, 5]
  s = textdata.load_task(spec, max_train=7, cache_dir=str(tmp_path / "c"))
  assert len(s["train"]) == 7 and len(s["test"]) == 6
  with pytest.raises(ValueError, match="builder"):
    textdata.local_task("y", str(tmp_path / "a.xyz"))


def test_nested_subsets():
  assert textdata.subset_sizes(1600) == [200, 400, 800, 1600]
  n = 5000
  prev = None
  for d in textdata.subset_sizes(3200):
    idx = textdata.nested_subset(n, d, seed=3)
    assert len(np.unique(idx)) == d and idx.max() < n
    if prev is not None:
      np.testing.assert_array_equal(idx[:len(prev)], prev)
    prev = idx
  assert not np.array_equal(textdata.nested_subset(n, 200, seed=4), prev[:200])
  with pytest.raises(ValueError, match="train pool"):
    textdata.nested_subset(100, 200)


def test_encode_masks(tok):
  pad, eos = textdata.special_ids(tok)
  ex = [("S: a b c\nT:", " cat dog"), ("", "the cat sat on the mat"), ("x " * 40, " sun")]
  d = textdata.encode_examples(ex, tok, max_len=16)
  assert d.input_ids.shape == d.targets.shape == d.loss_mask.shape == (3, 16)
  # targets are inputs shifted by one.
  np.testing.assert_array_equal(d.input_ids[:, 1:], d.targets[:, :-1])
  for i, (src, tgt) in enumerate(ex):
    tgt_ids = tok.encode(tgt, add_special_tokens=False).ids + [eos]
    scored = d.targets[i][d.loss_mask[i] > 0]
    if src:  # Loss on target tokens (+ eos) only.
      np.testing.assert_array_equal(scored, tgt_ids)
    else:  # LM task: every token after the first is scored.
      np.testing.assert_array_equal(scored, tgt_ids[1:])
  # The long source was cut from the left; its target survives.
  assert d.attention_mask[2].all() and d.targets[2, -1] == eos
  assert tok.decode(d.input_ids[2].tolist()).endswith("x  sun")  # source "x x ... x " + " sun"
  # Padding is not attended and not scored.
  assert not d.attention_mask[0, -1] and d.input_ids[0, -1] == pad and d.loss_mask[0, -1] == 0


def test_batches_are_functions_of_step():
  n, b = 50, 8
  spe = textdata.steps_per_epoch(n, b)
  assert spe == 6
  epoch0 = np.concatenate([textdata.train_batch_indices(n, b, s, seed=1) for s in range(spe)])
  assert len(np.unique(epoch0)) == spe * b  # no repeats within an epoch
  np.testing.assert_array_equal(textdata.train_batch_indices(n, b, 7, seed=1),
                                textdata.train_batch_indices(n, b, 7, seed=1))
  assert not np.array_equal(textdata.train_batch_indices(n, b, spe, seed=1), epoch0[:b])
  assert len(textdata.train_batch_indices(3, 8, 0)) == 8


def test_eval_batches_cover_once(tok):
  ex = [("q", f" a{i}") for i in range(11)]
  d = textdata.encode_examples(ex, tok, max_len=8)
  batches = list(textdata.eval_batches(d, 4))
  assert len(batches) == 3 and all(b["input_ids"].shape == (4, 8) for b in batches)
  total = sum(b["loss_mask"].sum() for b in batches)
  assert total == d.loss_mask.sum() == textdata.count_tokens(d)[0]
