"""Downstream tasks of the LensLLM study, built from the zoo corpus (no downloads).

Both tasks are input -> target tasks whose text differs from the
pre-training text (docstring-free library source, `lensllm_jax.training.zoo`):

* "code2name": the body of a function from a task file (files never used
  for pre-training; docstring removed, cut to `max_body_chars` characters at
  a line end), formatted as

      source = "{body}\\n# name of this function:"   target = " {name}"

  Dunder methods (`__init__`, ...) and empty bodies are dropped, and
  (body, name) duplicates are removed (first occurrence kept, in corpus
  order). The loss is on the name tokens only: predicting an identifier from
  code, a format the models never saw.
* "translate": `lensllm_jax.training.textdata.synthetic_translation_records`, a
  fixed word-for-word mapping of 48 pseudo-words ("kalo") onto English words
  with Zipf-distributed word frequencies, formatted "{src} =>" -> " {tgt}".
  Neither language occurs in the pre-training corpus: a task of a different
  kind (a new vocabulary and a new mapping), with unlimited examples.

Splits: `make_splits` carves held-out test and validation sets from one
seeded permutation of the records (`textdata.load_task`), before any
fine-tuning subset is drawn, so train subsets never overlap them.
"""

from __future__ import annotations

from collections.abc import Sequence

from lensllm_jax.training import textdata, zoo

TASK_NAMES = ("code2name", "translate")

_SPECS = {
    "code2name": dict(input_field="src", target_field="tgt", prompt="{input}\n# name of this function:",
                      target_prefix=" "),
    "translate": dict(input_field="src", target_field="tgt", prompt="{input} =>",
                      target_prefix=" "),
}


def truncate_at_line(text: str, max_chars: int) -> str:
  """The longest prefix of whole lines with at most max_chars characters.

  A first line longer than max_chars is cut at max_chars.
  """
  if len(text) <= max_chars:
    return text
  cut = text.rfind("\n", 0, max_chars + 1)
  return text[:cut] if cut > 0 else text[:max_chars]


def code2name_records(functions: Sequence[zoo.FunctionRecord], *,
                      max_body_chars: int = 240) -> list[dict[str, str]]:
  """{"src": truncated body, "tgt": name} records (see the module docstring)."""
  seen, out = set(), []
  for f in functions:
    if f.name.startswith("__") or not f.body.strip():
      continue
    body = truncate_at_line(f.body, max_body_chars)
    if (body, f.name) in seen:
      continue
    seen.add((body, f.name))
    out.append({"src": body, "tgt": f.name})
  return out


def translate_records(num: int, *, seed: int = 0) -> list[dict[str, str]]:
  """{"src": pseudo-words, "tgt": English} records of the synthetic mapping."""
  return textdata.synthetic_translation_records(num, seed=seed)


def task_records(name: str, corpus: zoo.Corpus, *, num_records: int, seed: int = 0,
                 max_body_chars: int = 240) -> list[dict[str, str]]:
  """The records of task `name` (code2name: all, at most num_records; translate: num_records)."""
  if name == "code2name":
    return code2name_records(corpus.functions, max_body_chars=max_body_chars)[:num_records]
  if name == "translate":
    return translate_records(num_records, seed=seed)
  raise ValueError(f"unknown study task {name!r}; known: {TASK_NAMES}")


def task_spec(name: str) -> textdata.TaskSpec:
  """The `textdata.TaskSpec` formatting of task `name` (records given in memory)."""
  if name not in _SPECS:
    raise ValueError(f"unknown study task {name!r}; known: {TASK_NAMES}")
  return textdata.TaskSpec(name=name, path="json", validation_split=None, test_split=None,
                           **_SPECS[name])


def make_splits(name: str, records: Sequence[dict[str, str]], *, num_validation: int,
                num_test: int, min_train: int, seed: int = 0) -> dict[str, list[textdata.Example]]:
  """Formatted train / validation / test splits of a task's records.

  Args:
    name: task name.
    records: {"src", "tgt"} dicts.
    num_validation, num_test: held-out sizes, carved first (seeded).
    min_train: the train pool must hold at least this many examples (the
      largest fine-tuning subset); a clear error otherwise.
    seed: seed of the carving permutation.

  Returns:
    {"train", "validation", "test"}: lists of (source, target) pairs.
  """
  splits = textdata.load_task(task_spec(name), num_validation=num_validation,
                              num_test=num_test, seed=seed, raw={"train": list(records)})
  if len(splits["train"]) < min_train:
    raise ValueError(f"task {name!r}: the train pool has {len(splits['train'])} examples "
                     f"but the largest subset size is {min_train} (more files / records, or "
                     f"smaller subsets.sizes)")
  return splits
