"""Tests of the stdlib corpus, the study tasks and the zoo specs (lensllm_jax.training.zoo, study_tasks)."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from lensllm_jax import models
from lensllm_jax.training import study_tasks, zoo

SOURCE = textwrap.dedent('''\
    """Module docstring.

    Second paragraph.
    """
    import os


    def alpha(x, y=1, *args, z, **kw):
      """Adds things.

      Longer description.
      """
      total = x + y
      return total


    class Box:
      """A box."""

      def put(self, item):
        """Puts an item."""
        def inner():
          """Nested doc."""
          return item
        return inner()

      def __init__(self):
        self.items = []


    async def fetch(url):
      return url
    ''')


def test_parse_source_records_and_stripped_text():
  stripped, recs = zoo.parse_source(SOURCE, "pkg.mod")
  by_qual = {r.qualname: r for r in recs}
  assert set(by_qual) == {"alpha", "Box.put", "Box.put.inner", "Box.__init__", "fetch"}
  a = by_qual["alpha"]
  assert (a.module, a.name) == ("pkg.mod", "alpha")
  assert a.args == "x, y=1, *args, z, **kw"
  assert a.docstring == "Adds things.\n\nLonger description."
  assert a.body == "total = x + y\nreturn total"
  put = by_qual["Box.put"]
  # The nested function's docstring is removed from the enclosing body too.
  assert put.body == "def inner():\n  return item\nreturn inner()"
  assert by_qual["fetch"].docstring == "" and by_qual["fetch"].body == "return url"
  for doc in ("Module docstring", "Second paragraph", "Adds things", "Longer description",
              "A box.", "Puts an item", "Nested doc"):
    assert doc not in stripped
  # Everything that is not a docstring survives.
  for code in ("import os", "def alpha(x, y=1, *args, z, **kw):", "total = x + y",
               "class Box:", "self.items = []", "async def fetch(url):"):
    assert code in stripped


def test_parse_source_syntax_error():
  with pytest.raises(SyntaxError):
    zoo.parse_source("def f(:\n  pass\n", "bad")


def test_chunk_text_packs_paragraphs_and_cuts_long_ones():
  paras = [f"p{i:02d} " + "x" * (10 + 4 * i) for i in range(12)]  # 14..58 chars
  text = "\n\n".join(paras)
  chunks = zoo.chunk_text(text, 60)
  assert all(len(c) <= 60 for c in chunks)
  # Re-joining the chunks gives the paragraphs back in order.
  assert "\n\n".join(chunks).split("\n\n") == paras
  long = "\n".join(f"line{i:02d}" for i in range(40))  # 279 chars, one paragraph
  parts = zoo.chunk_text(long, 50)
  assert all(len(p) <= 50 for p in parts)
  assert "\n".join(parts) == long


def test_file_split_is_deterministic_and_has_the_right_fraction():
  paths = [f"pkg{i // 50}/mod{i}.py" for i in range(4000)]
  a = [zoo.is_pretraining_file(p, 0.3) for p in paths]
  assert a == [zoo.is_pretraining_file(p, 0.3) for p in paths]
  frac = sum(a) / len(a)
  # Binomial(4000, 0.3): sd = 0.0072; 5 sd.
  assert abs(frac - 0.3) < 0.036
  assert not any(zoo.is_pretraining_file(p, 0.0) for p in paths[:100])
  assert all(zoo.is_pretraining_file(p, 1.0) for p in paths[:100])
  with pytest.raises(ValueError, match="pretrain_fraction"):
    zoo.is_pretraining_file("a.py", 1.5)


def _fake_stdlib(root: pathlib.Path) -> None:
  for i in range(30):
    (root / f"m{i:02d}.py").write_text(
        f'"""Doc of m{i}."""\n\ndef f{i}(a):\n  """Doc f{i}."""\n  return a + {i}\n\n'
        f'def g{i}():\n  return {i}\n')
  (root / "site-packages").mkdir()
  (root / "site-packages" / "third.py").write_text("def h():\n  return 1\n")
  (root / "broken.py").write_text("def (:\n")


def test_stdlib_files_and_build_corpus(tmp_path):
  _fake_stdlib(tmp_path)
  files = zoo.stdlib_files(tmp_path)
  assert files == sorted(files)
  assert "site-packages/third.py" not in files and "m00.py" in files
  assert zoo.stdlib_files(tmp_path, max_files=5) == files[:5]
  corpus = zoo.build_corpus(tmp_path, pretrain_fraction=0.5, chunk_chars=100)
  assert corpus.skipped == ("broken.py",)
  assert set(corpus.pretrain_files).isdisjoint(corpus.task_files)
  assert len(corpus.pretrain_files) + len(corpus.task_files) == 30
  assert 0 < len(corpus.pretrain_files) < 30
  # Functions come from task files only, two per file.
  task_mods = {f[:-3] for f in corpus.task_files}
  assert {r.module for r in corpus.functions} == task_mods
  assert len(corpus.functions) == 2 * len(corpus.task_files)
  text = "\n".join(corpus.pretrain_texts)
  assert "Doc" not in text and "return" in text
  again = zoo.Corpus.from_json(corpus.to_json())
  assert again == corpus


def test_real_stdlib_is_found():
  files = zoo.stdlib_files(max_files=50)
  assert len(files) == 50
  assert all((zoo.stdlib_dir() / f).is_file() for f in files)
  assert not any(part in zoo.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])


def test_code2name_records_filters_and_dedupes():
  recs = [zoo.FunctionRecord("m", "f", "f", "", "", "return 1"),
          zoo.FunctionRecord("m", "f", "f", "", "", "return 1"),      # duplicate
          zoo.FunctionRecord("m", "C.__init__", "__init__", "self", "", "self.a = 1"),
          zoo.FunctionRecord("m", "g", "g", "", "", ""),               # empty body
          zoo.FunctionRecord("m", "h", "h", "", "", "a = 1\nb = 2\nreturn a + b")]
  out = study_tasks.code2name_records(recs, max_body_chars=12)
  assert out == [{"src": "return 1", "tgt": "f"}, {"src": "a = 1\nb = 2", "tgt": "h"}]


def test_truncate_at_line():
  assert study_tasks.truncate_at_line("abc\ndef\nghi", 8) == "abc\ndef"
  assert study_tasks.truncate_at_line("abc\ndef", 100) == "abc\ndef"
  assert study_tasks.truncate_at_line("abcdefgh\nx", 4) == "abcd"


def test_make_splits_are_disjoint_and_formatted():
  recs = study_tasks.translate_records(300, seed=0)
  splits = study_tasks.make_splits("translate", recs, num_validation=20, num_test=30,
                                   min_train=200)
  assert [len(splits[k]) for k in ("train", "validation", "test")] == [250, 20, 30]
  formatted = {(r["src"] + " =>", " " + r["tgt"]) for r in recs}
  seen = []
  for k in ("train", "validation", "test"):
    for ex in splits[k]:
      assert ex in formatted
      seen.append(ex)
  # Every record lands in exactly one split (records may repeat as strings: compare counts).
  assert len(seen) == len(recs)
  with pytest.raises(ValueError, match="largest subset size"):
    study_tasks.make_splits("translate", recs, num_validation=20, num_test=30, min_train=251)
  with pytest.raises(ValueError, match="unknown study task"):
    study_tasks.task_spec("nope")


def test_code2name_format():
  spec = study_tasks.task_spec("code2name")
  src, tgt = study_tasks.textdata.format_example(spec, {"src": "return 1", "tgt": "one"})
  assert src == "return 1\n# name of this function:" and tgt == " one"


def test_zoo_specs_and_configs():
  specs = zoo.zoo_from_dicts([dict(name="a", arch="gpt2", d_model=32, n_layers=1, n_heads=2,
                                   pretrain_steps=5),
                              dict(name="b", arch="llama", d_model=48, n_layers=2, n_heads=4,
                                   pretrain_steps=5)])
  assert [s.family for s in specs] == ["GPT-2", "Llama"]
  c = zoo.model_config(specs[1], vocab_size=300, max_len=40)
  assert (c.arch, c.vocab_size, c.max_len, c.d_model, c.n_layers, c.n_heads) == \
      ("llama", 300, 40, 48, 2, 4)
  with pytest.raises(ValueError, match="duplicate"):
    zoo.zoo_from_dicts([dict(name="a", arch="gpt2", d_model=32, n_layers=1, n_heads=2,
                             pretrain_steps=5)] * 2)


def test_presets_meet_the_issue_requirements():
  from configs import study

  full = study.get_config("full")
  specs = zoo.zoo_from_dicts([dict(r) for r in full.zoo])
  assert len(specs) >= 8
  assert {s.arch for s in specs} == {"gpt2", "llama"}
  sizes = {models.num_params(zoo.model_config(s, full.tokenizer_vocab, 48)) for s in specs}
  assert len(sizes) >= 3
  assert len({s.pretrain_steps for s in specs}) >= 3
  assert full.subsets.sizes == [200 * 2 ** k for k in range(8)]
  assert len(full.tasks) >= 2
  tiny = study.get_config("tiny")
  assert {dict(r)["arch"] for r in tiny.zoo} == {"gpt2", "llama"}
