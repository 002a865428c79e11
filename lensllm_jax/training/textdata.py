"""Text data for fine-tuning: task registry, loading, formatting, subsets, batches.

Pipeline (every step is a plain function, so each can be used alone):

  spec = TASKS["gigaword"]                     # or local_task(...) for files
  splits = load_task(spec)                     # {"train","validation","test"} -> [Example]
  tok = train_tokenizer(texts) or tokenizers.Tokenizer.from_file("tokenizer.json")
  train = encode_examples(splits["train"], tok, max_len=128)   # TokenizedData, [N, T]
  idx = nested_subset(train.num_examples, 800, seed=0)        # prefix of one permutation
  batch = train_batch(train.take(idx), batch_size=16, step=s, seed=0)

Conventions.
- An `Example` is a (source, target) pair of strings. Input -> target tasks
  (FLAN, Gigaword, WMT19) put the prompt-formatted input in `source` and the
  answer in `target`; the loss is taken on target tokens only. Language
  modelling tasks (Wikitext) have `source == ""`: the loss is on all tokens.
- Tokenised sequences are the concatenation s = source_ids + target_ids + [eos]
  cut to T + 1 tokens (the source is cut from the left first so that targets
  survive), padded with `pad_id`. Then input_ids = s[:-1], targets = s[1:]
  ([N, T] each) and loss_mask[i] = 1 iff targets[i] is a target or eos token
  (not source, not padding).
- For an encoder-decoder (``encode_examples(..., encoder_decoder=True)``) the
  input goes to the encoder and the target to the decoder: input_ids =
  source_ids + [eos] (its last T tokens) with attention_mask on them, targets
  = target_ids + [eos] (its first T tokens) with loss_mask on them, both
  padded to T; the decoder reads the targets shifted right
  (`models.shift_right`), so no arrays change shape or name.
- Hub datasets are loaded with `datasets.load_dataset(path, config)`; local
  files with the packaged "json" / "csv" / "text" / "parquet" builders and
  `data_files` -- the same code path. Splits the dataset does not provide
  (validation, test) are carved from train with a fixed seed, before any
  subset is drawn, so the fine-tuning pool never overlaps them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax import errors

Example = tuple[str, str]
LOCAL_BUILDERS = ("json", "csv", "text", "parquet")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How to load and format one fine-tuning task.

  Attributes:
    name: short task name (the curve file stem, e.g. "flan").
    path: Hugging Face hub id ("Harvard/gigaword") or a packaged builder name
      ("json", "csv", "text", "parquet") for local files.
    config: dataset configuration name (e.g. "wikitext-103-raw-v1"), or None.
    data_files: for local builders, a file or {split: file(s)} mapping.
    input_field: dotted field path of the input ("translation.zh"), or None
      for a language-modelling task (loss on all tokens).
    target_field: dotted field path of the target / the text.
    prompt: format string for the source, with the placeholder "{input}".
    target_prefix: prepended to the target text (e.g. " " after a prompt).
    train_split, validation_split, test_split: split names in the dataset;
      None means "carve it from train" (see `load_task`).
    min_target_chars: records whose target has fewer characters are dropped
      (Wikitext has empty lines and section titles).
  """
  name: str
  path: str
  config: str | None = None
  data_files: Any = None
  input_field: str | None = None
  target_field: str = "text"
  prompt: str = "{input}\n"
  target_prefix: str = ""
  train_split: str = "train"
  validation_split: str | None = "validation"
  test_split: str | None = "test"
  min_target_chars: int = 1

  @property
  def is_lm(self) -> bool:
    """True for language-modelling tasks (loss on every token)."""
    return self.input_field is None


# The paper's tasks (Lin et al. 2024; Zeng et al. 2025). Hub ids are the
# parquet-backed repositories current `datasets` (no loading scripts) can read;
# override with dataclasses.replace(TASKS[name], path=..., config=...).
TASKS: dict[str, TaskSpec] = {
    "flan": TaskSpec(
        name="flan", path="Muennighoff/flan", input_field="inputs",
        target_field="targets", prompt="{input}\n", validation_split="validation",
        test_split="test"),
    "wikitext": TaskSpec(
        name="wikitext", path="Salesforce/wikitext", config="wikitext-103-raw-v1",
        input_field=None, target_field="text", min_target_chars=20),
    "gigaword": TaskSpec(
        name="gigaword", path="Harvard/gigaword", input_field="document",
        target_field="summary", prompt="Summarize: {input}\nSummary:", target_prefix=" "),
    "wmt19": TaskSpec(
        name="wmt19", path="wmt/wmt19", config="zh-en", input_field="translation.zh",
        target_field="translation.en", prompt="Translate Chinese to English: {input}\nEnglish:",
        target_prefix=" ", test_split=None),
}


def local_task(name: str, data_files: Any, *, builder: str | None = None,
               input_field: str | None = None, target_field: str = "text",
               prompt: str = "{input}\n", target_prefix: str = "",
               validation_split: str | None = None, test_split: str | None = None,
               min_target_chars: int = 1) -> TaskSpec:
  """A `TaskSpec` for local json(l) / csv / text / parquet files.

  Args:
    name: task name.
    data_files: a path or {split: path(s)}; a single path is the train split.
    builder: "json", "csv", "text" or "parquet"; inferred from the suffix of
      the first file when None (".jsonl"/".json" -> json, ".txt" -> text).
    input_field, target_field, prompt, target_prefix, min_target_chars: as in
      `TaskSpec` ("text" builder records have the single field "text").
    validation_split, test_split: split names present in `data_files`, or None
      to carve them from train.
  """
  files = data_files if isinstance(data_files, Mapping) else {"train": data_files}
  if "train" not in files:
    raise ValueError(f"local_task({name!r}): data_files needs a 'train' entry, got {list(files)}")
  if builder is None:
    first = files["train"]
    first = str(first if isinstance(first, str) else first[0])
    suffix = first.rsplit(".", 1)[-1].lower()
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "txt": "text",
               "parquet": "parquet"}.get(suffix)
    if builder is None:
      raise ValueError(f"local_task({name!r}): cannot infer the builder from {first!r}; "
                       f"pass builder= one of {LOCAL_BUILDERS}")
  if builder not in LOCAL_BUILDERS:
    raise ValueError(f"local_task({name!r}): builder {builder!r} not in {LOCAL_BUILDERS}")
  return TaskSpec(name=name, path=builder, data_files=dict(files), input_field=input_field,
                  target_field=target_field, prompt=prompt, target_prefix=target_prefix,
                  validation_split=validation_split, test_split=test_split,
                  min_target_chars=min_target_chars)


def _get_field(record: Mapping[str, Any], dotted: str, where: str) -> str:
  value: Any = record
  for part in dotted.split("."):
    if not isinstance(value, Mapping) or part not in value:
      keys = list(value) if isinstance(value, Mapping) else type(value).__name__
      raise errors.DataError(
          f"{where}: field {dotted!r} not found (at {part!r}; available: {keys})")
    value = value[part]
  if value is None:
    return ""
  if not isinstance(value, str):
    raise errors.DataError(
        f"{where}: field {dotted!r} is {type(value).__name__}, expected a string")
  return value


def format_example(spec: TaskSpec, record: Mapping[str, Any], where: str = "record") -> Example:
  """Formats one dataset record as (source, target) strings.

  Input -> target tasks: source = spec.prompt.format(input=record[input_field]),
  target = spec.target_prefix + record[target_field]. LM tasks: ("", text).
  """
  target = _get_field(record, spec.target_field, where)
  if spec.is_lm:
    return "", target
  source = spec.prompt.format(input=_get_field(record, spec.input_field, where))
  return source, spec.target_prefix + target


def format_split(spec: TaskSpec, records: Any, split: str = "train") -> list[Example]:
  """Formats an iterable of records, dropping those with too short a target."""
  out = []
  for i, record in enumerate(records):
    source, target = format_example(spec, record, where=f"task {spec.name!r} split {split!r} row {i}")
    body = target[len(spec.target_prefix):] if not spec.is_lm else target
    if len(body.strip()) >= spec.min_target_chars:
      out.append((source, target))
  return out


def local_files(spec: TaskSpec) -> list[pathlib.Path]:
  """The local data files of a task (all splits; [] for a hub task)."""
  if spec.data_files is None:
    return []
  out = []
  for value in spec.data_files.values():
    out += [pathlib.Path(v) for v in ([value] if isinstance(value, (str, pathlib.Path))
                                      else value)]
  return out


def check_local_files(spec: TaskSpec) -> None:
  """Checks a local task's files before `datasets` reads them (its errors name no line).

  Every file must exist and be non-empty; every non-blank line of a JSON-lines
  file (".jsonl", or a ".json" that is not one JSON document) must be a JSON
  object. Raises `errors.DataError` naming the file and line.
  """
  if spec.path not in LOCAL_BUILDERS:
    return
  for path in local_files(spec):
    if not path.is_file():
      raise errors.DataError(f"task {spec.name!r}: data file {path} does not exist"
                             + (" (a directory)" if path.is_dir() else ""))
    try:
      data = path.read_bytes()
    except OSError as e:
      raise errors.DataError(f"task {spec.name!r}: {path}: cannot be read ({e})") from None
    if not data.strip():
      raise errors.DataError(f"task {spec.name!r}: {path} is empty")
    if spec.path != "json":
      continue
    try:
      text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      raise errors.DataError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".json":
      try:
        json.loads(text)
        continue  # one JSON document
      except json.JSONDecodeError:
        pass  # JSON lines in a .json file
    for i, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.DataError(f"{path}, line {i}: not JSON ({e.msg}, column {e.colno})") from None
      if not isinstance(record, dict):
        raise errors.DataError(f"{path}, line {i}: expected a JSON object, got "
                               f"{type(record).__name__}")


def load_raw(spec: TaskSpec, *, cache_dir: str | None = None) -> Any:
  """`datasets.load_dataset` for hub ids and local builders alike (a DatasetDict).

  Local files are checked first (`check_local_files`).
  """
  import datasets  # local import: keep `import lensllm_jax.training.textdata` light.

  check_local_files(spec)
  kwargs = {"cache_dir": cache_dir}
  if spec.data_files is not None:
    kwargs["data_files"] = spec.data_files
  try:
    return datasets.load_dataset(spec.path, spec.config, **kwargs)
  except FileNotFoundError as e:
    raise errors.DataError(f"task {spec.name!r}: cannot load {spec.path!r} "
                           f"(config={spec.config!r}, data_files={spec.data_files!r}): "
                           f"{e}") from e


def load_task(spec: TaskSpec, *, num_validation: int = 500, num_test: int = 1000,
              max_validation: int | None = None, max_test: int | None = None,
              max_train: int | None = None, seed: int = 0, cache_dir: str | None = None,
              raw: Any = None) -> dict[str, list[Example]]:
  """Loads a task as formatted (source, target) examples per split.

  Missing validation / test splits are carved from train: one permutation of
  the formatted train examples with `seed`; its first `num_test` examples form
  the test split, the next `num_validation` the validation split, the rest the
  train pool. Splits that exist are kept but truncated to max_validation /
  max_test examples (their first rows: a fixed evaluation set).

  Args:
    spec: the task.
    num_validation, num_test: sizes of carved splits.
    max_validation, max_test: caps for existing splits (None: all rows).
    max_train: read only the first max_train rows of the train split (huge
      hub datasets such as WMT19; None: all rows).
    seed: seed of the carving permutation.
    cache_dir: `datasets` cache directory.
    raw: an already loaded DatasetDict / {split: list of records} (skips loading).

  Returns:
    {"train": [...], "validation": [...], "test": [...]} lists of Example.
  """
  raw = load_raw(spec, cache_dir=cache_dir) if raw is None else raw
  if spec.train_split not in raw:
    raise errors.DataError(f"task {spec.name!r}: no split {spec.train_split!r} in {list(raw)}")
  rows = raw[spec.train_split]
  if max_train is not None and max_train < len(rows):
    rows = rows.select(range(max_train)) if hasattr(rows, "select") else rows[:max_train]
  train = format_split(spec, rows, spec.train_split)
  out: dict[str, list[Example]] = {}
  carve = []
  for key, split, cap, n in (("test", spec.test_split, max_test, num_test),
                             ("validation", spec.validation_split, max_validation, num_validation)):
    if split is not None and split in raw:
      out[key] = format_split(spec, raw[split], split)[:cap]
    elif split is not None:
      raise errors.DataError(f"task {spec.name!r}: no split {split!r} in {list(raw)} "
                             f"(set {key}_split=None to carve it from train)")
    else:
      carve.append((key, n))
  if carve:
    need = sum(n for _, n in carve)
    if need >= len(train):
      raise errors.DataError(f"task {spec.name!r}: cannot carve {need} held-out examples "
                             f"from {len(train)} train examples")
    perm = np.random.default_rng(seed).permutation(len(train))
    start = 0
    for key, n in carve:
      out[key] = [train[i] for i in perm[start:start + n]]
      start += n
    train = [train[i] for i in np.sort(perm[start:])]
  out["train"] = train
  return out


# ---------------------------------------------------------------------------
# Subsets.


def subset_sizes(max_size: int, *, base: int = 200) -> list[int]:
  """The grid D = base * 2^k <= max_size (the public curves' grid for base 200)."""
  sizes, d = [], base
  while d <= max_size:
    sizes.append(d)
    d *= 2
  return sizes


def nested_subset(num_examples: int, size: int, *, seed: int = 0) -> np.ndarray:
  """Indices of the seeded subset of `size` examples out of `num_examples`.

  The subset of size D is the prefix of ONE permutation (fixed by `seed`), so
  subsets are nested: nested_subset(n, D1) is a prefix of nested_subset(n, D2)
  for D1 <= D2, and curves over D differ only by the added data.

  Returns:
    [size] int64 indices.
  """
  if not 0 <= size <= num_examples:
    raise ValueError(f"subset size {size} is not within [0, {num_examples}] (the train pool size)")
  return np.random.default_rng(seed).permutation(num_examples)[:size].astype(np.int64)


# ---------------------------------------------------------------------------
# Tokenisation.


class TokenizedData(NamedTuple):
  """Fixed-length tokenised examples (numpy, host memory).

  Attributes:
    input_ids: [N, T] int32 model inputs.
    targets: [N, T] int32 next tokens.
    loss_mask: [N, T] float32, 1 on positions whose target is scored.
    attention_mask: [N, T] bool, True on non-padding input positions.
  """
  input_ids: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.input_ids.shape[0])

  def take(self, indices: np.ndarray) -> TokenizedData:
    """Rows `indices` of every array."""
    return TokenizedData(*(a[indices] for a in self))


def special_ids(tokenizer: Any) -> tuple[int, int]:
  """(pad_id, eos_id) of a `tokenizers.Tokenizer`.

  eos: the first of "<eos>", "</s>", "<|endoftext|>" in the vocabulary; pad:
  "<pad>" if present, else eos (GPT-2 has no pad token; padded positions are
  masked anyway).
  """
  eos = next((tokenizer.token_to_id(t) for t in ("<eos>", "</s>", "<|endoftext|>")
              if tokenizer.token_to_id(t) is not None), None)
  if eos is None:
    raise ValueError("tokenizer has none of the end tokens <eos>, </s>, <|endoftext|>")
  pad = tokenizer.token_to_id("<pad>")
  return (eos if pad is None else pad), eos


def encode_examples(examples: Sequence[Example], tokenizer: Any, max_len: int,
                    *, pad_id: int | None = None, eos_id: int | None = None,
                    encoder_decoder: bool = False) -> TokenizedData:
  """Tokenises (source, target) pairs into fixed-length arrays (see module doc).

  Args:
    examples: N pairs.
    tokenizer: a `tokenizers.Tokenizer` (special tokens are not added).
    max_len: T, the model's input length.
    pad_id, eos_id: override `special_ids(tokenizer)`.
    encoder_decoder: source to the encoder, target to the decoder (module doc).

  Returns:
    TokenizedData with [N, T] arrays.
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  default_pad, default_eos = special_ids(tokenizer)
  pad_id = default_pad if pad_id is None else pad_id
  eos_id = default_eos if eos_id is None else eos_id
  n, t = len(examples), max_len
  seqs = np.full((n, t + 1), pad_id, np.int32)
  scored = np.zeros((n, t + 1), bool)
  valid = np.zeros((n, t + 1), bool)
  sources = tokenizer.encode_batch([s for s, _ in examples], add_special_tokens=False) if n else []
  targets = tokenizer.encode_batch([g for _, g in examples], add_special_tokens=False) if n else []
  if encoder_decoder:
    return _encode_seq2seq(sources, targets, t, pad_id, eos_id)
  for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
    src_ids, tgt_ids = list(src.ids), list(tgt.ids) + [eos_id]
    # Keep at least one source token of context when there is a source, and
    # cut the source from the left: targets are what the loss is about.
    keep_src = max(min(len(src_ids), t + 1 - len(tgt_ids)), min(len(src_ids), 1))
    src_ids = src_ids[len(src_ids) - keep_src:]
    ids = (src_ids + tgt_ids)[:t + 1]
    seqs[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
    scored[i, len(src_ids):len(ids)] = True
  return TokenizedData(
      input_ids=seqs[:, :-1].copy(), targets=seqs[:, 1:].copy(),
      loss_mask=scored[:, 1:].astype(np.float32), attention_mask=valid[:, :-1].copy())


def _encode_seq2seq(sources, targets, length: int, pad_id: int, eos_id: int) -> TokenizedData:
  n = len(sources)
  arrays = {k: np.full((n, length), pad_id, np.int32) for k in ("input_ids", "targets")}
  masks = {k: np.zeros((n, length), bool) for k in ("attention_mask", "loss_mask")}
  for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
    src_ids = (list(src.ids) + [eos_id])[-length:]  # the end of the input, as for decoders
    tgt_ids = (list(tgt.ids) + [eos_id])[:length]
    arrays["input_ids"][i, :len(src_ids)] = src_ids
    masks["attention_mask"][i, :len(src_ids)] = True
    arrays["targets"][i, :len(tgt_ids)] = tgt_ids
    masks["loss_mask"][i, :len(tgt_ids)] = True
  return TokenizedData(input_ids=arrays["input_ids"], targets=arrays["targets"],
                       loss_mask=masks["loss_mask"].astype(np.float32),
                       attention_mask=masks["attention_mask"])


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512,
                    special_tokens: Sequence[str] = ("<pad>", "<eos>")) -> Any:
  """Trains a small byte-level BPE `tokenizers.Tokenizer` (tests, tiny configs).

  The vocabulary holds the special tokens, the 256 byte symbols and merges up
  to `vocab_size`, so any text is encodable.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(special_tokens):
    raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} special tokens")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


# ---------------------------------------------------------------------------
# Batches.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches per epoch (the last partial batch is dropped; at least 1)."""
  return max(1, num_examples // batch_size)


def train_batch_indices(num_examples: int, batch_size: int, step: int, *,
                        seed: int = 0) -> np.ndarray:
  """Example indices of training batch number `step` -- a pure function of step.

  Epoch e = step // steps_per_epoch uses the permutation
  default_rng([seed, e]).permutation(num_examples); batch j of the epoch is
  its slice [j B, (j + 1) B). With fewer examples than B the permutation is
  repeated cyclically. Because it depends only on (step, seed), the data
  position of a run is its step and a resumed run sees the same batches.

  Returns:
    [batch_size] int64 indices.
  """
  if num_examples < 1:
    raise ValueError("cannot draw batches from an empty dataset")
  spe = steps_per_epoch(num_examples, batch_size)
  epoch, j = divmod(int(step), spe)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  if num_examples < batch_size:
    return np.resize(perm, batch_size).astype(np.int64)
  return perm[j * batch_size:(j + 1) * batch_size].astype(np.int64)


def train_batch(data: TokenizedData, batch_size: int, step: int, *, seed: int = 0) -> dict:
  """Training batch number `step` as a dict of [B, T] numpy arrays."""
  return as_batch(data.take(train_batch_indices(data.num_examples, batch_size, step, seed=seed)))


def as_batch(data: TokenizedData) -> dict[str, np.ndarray]:
  """TokenizedData -> {"input_ids", "targets", "loss_mask", "attention_mask"}."""
  return data._asdict()


def eval_batches(data: TokenizedData, batch_size: int):
  """Yields consecutive [B, T] batches covering `data` once, in order.

  The last batch is padded with rows whose loss_mask is 0 (so sums over the
  batch are unchanged) and a fixed shape keeps one compiled eval step.
  """
  n = data.num_examples
  for start in range(0, n, batch_size):
    part = data.take(np.arange(start, min(start + batch_size, n)))
    short = batch_size - part.num_examples
    if short:
      pad = TokenizedData(*(np.zeros((short,) + a.shape[1:], a.dtype) for a in part))
      part = TokenizedData(*(np.concatenate([a, b]) for a, b in zip(part, pad, strict=True)))
    yield as_batch(part)


def count_tokens(data: TokenizedData) -> tuple[int, int]:
  """(scored target tokens, non-padding input tokens) in `data`."""
  return int(data.loss_mask.sum()), int(data.attention_mask.sum())


# ---------------------------------------------------------------------------
# A synthetic translation task (offline smoke runs and tests).

_SYLLABLES = ("ka", "lo", "me", "fu", "ri", "ta", "no", "se", "vi", "du", "pa", "zo")
_ENGLISH = ("the", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "house",
            "red", "blue", "green", "small", "big", "old", "new", "fast", "slow", "warm",
            "runs", "sees", "eats", "finds", "holds", "makes", "takes", "gives", "loves",
            "under", "over", "near", "with", "and", "from", "into", "city", "road", "book",
            "hand", "night", "day", "wind", "fire", "water", "light", "song", "child")


def synthetic_lexicon() -> dict[str, str]:
  """A fixed bijection of 48 pseudo-words ("kalo") onto 48 English words."""
  pseudo = [a + b for a in _SYLLABLES for b in _SYLLABLES if a != b]
  pseudo = [pseudo[i] for i in np.random.default_rng(1234).permutation(len(pseudo))]
  return dict(zip(pseudo[:len(_ENGLISH)], _ENGLISH, strict=True))


def synthetic_translation_records(num: int, *, seed: int) -> list[dict[str, str]]:
  """Records {"src": pseudo-words, "tgt": their word-by-word English translation}.

  Sentences have 3-8 words drawn from a Zipf-like distribution, so rare words
  need more data: a loss curve that keeps falling with the number of samples.
  """
  lex = list(synthetic_lexicon().items())
  rng = np.random.default_rng(seed)
  probs = 1.0 / np.arange(1, len(lex) + 1) ** 0.8
  probs /= probs.sum()
  out = []
  for _ in range(num):
    idx = rng.choice(len(lex), size=int(rng.integers(3, 9)), p=probs)
    out.append({"src": " ".join(lex[i][0] for i in idx),
                "tgt": " ".join(lex[i][1] for i in idx)})
  return out


def synthetic_monolingual_texts(num: int, *, seed: int) -> list[str]:
  """Unpaired sentences in either language (a pre-training corpus)."""
  recs = synthetic_translation_records(num, seed=seed)
  return [r["src"] if i % 2 else r["tgt"] for i, r in enumerate(recs)]
