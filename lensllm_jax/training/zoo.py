"""A model zoo pre-trained here, on text every Python installation carries.

Corpus. The source files of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`, the `*.py` files below it, sorted by
relative path; `site-packages`, `__pycache__` and the directories in
`EXCLUDED_DIRS` are skipped). Each file is assigned, by a hash of its relative
path (CRC-32, so the assignment is the same on every machine and for every
subset of files), to one of two disjoint parts:

* pre-training files (a fraction `pretrain_fraction` of the files): their
  source with every docstring blanked out, cut into chunks at blank lines
  (causal-LM text, code and comments only);
* task files (the rest): every documented or undocumented function
  definition becomes a `FunctionRecord` (module, qualified name, name,
  argument list, docstring, body without its docstring), the raw material of
  the downstream tasks (`lensllm_jax.training.study_tasks`), so fine-tuning examples
  come from code the models never saw during pre-training.

Nothing is downloaded: the corpus is a deterministic function of the Python
version (the exact version is recorded with the corpus, `Corpus.python`).

Zoo. `ZooSpec` names a model (architecture family, width, depth, heads,
pre-training steps, init seed); `model_config` turns it into a
`lensllm_jax.models.ModelConfig` for a tokenizer's vocabulary. Zoos mix GPT-2
and Llama style models of several sizes with different amounts of
pre-training, so that zero-shot and fine-tuned rankings can disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Sequence

from lensllm_jax import models

# Directories (any path component) left out of the corpus: third-party code,
# generated files, GUI demos, and vendored / deprecated trees.
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3",
                           "ensurepip", "pydoc_data", "tkinter", "config-3", "venv"})


def stdlib_dir() -> pathlib.Path:
  """Directory of the running interpreter's standard library sources."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | pathlib.Path | None = None, *,
                 max_files: int | None = None) -> list[str]:
  """Sorted relative paths of the `*.py` files of the corpus.

  Args:
    root: library directory (default `stdlib_dir()`).
    max_files: keep only the first `max_files` paths (after sorting), for
      small presets; None keeps all.

  Returns:
    list of POSIX relative paths, e.g. ["__future__.py", "_aix_support.py", ...].
  """
  root = pathlib.Path(root) if root is not None else stdlib_dir()
  if not root.is_dir():
    raise FileNotFoundError(f"standard library directory {root} does not exist")
  out = []
  for p in root.rglob("*.py"):
    rel = p.relative_to(root)
    if any(part in EXCLUDED_DIRS or part.startswith("config-3") for part in rel.parts[:-1]):
      continue
    out.append(rel.as_posix())
  out.sort()
  return out[:max_files] if max_files is not None else out


def is_pretraining_file(relpath: str, pretrain_fraction: float) -> bool:
  """Deterministic file split: CRC-32 of the path, in [0, 1), below the fraction."""
  if not 0.0 <= pretrain_fraction <= 1.0:
    raise ValueError(f"pretrain_fraction must be in [0, 1], got {pretrain_fraction}")
  return (zlib.crc32(relpath.encode()) % 10_000) / 10_000 < pretrain_fraction


@dataclasses.dataclass(frozen=True)
class FunctionRecord:
  """One function definition of a task file.

  Attributes:
    module: dotted module name ("json.decoder").
    qualname: name inside the module ("JSONDecoder.decode").
    name: the function name ("decode").
    args: the argument list as source ("self, s, _w=WHITESPACE.match").
    docstring: `inspect.cleandoc`-ed docstring ("" if none).
    body: the body's source lines without the docstring, dedented.
  """
  module: str
  qualname: str
  name: str
  args: str
  docstring: str
  body: str


def _docstring_node(node) -> ast.Constant | None:
  body = getattr(node, "body", None)
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
      and isinstance(body[0].value.value, str):
    return body[0].value
  return None


def _dedent(lines: Sequence[str]) -> str:
  indents = [len(s) - len(s.lstrip()) for s in lines if s.strip()]
  cut = min(indents) if indents else 0
  return "\n".join(s[cut:].rstrip() for s in lines).strip("\n")


def parse_source(text: str, module: str) -> tuple[str, list[FunctionRecord]]:
  """Docstring-free source and the function records of one file.

  Args:
    text: the file's source.
    module: its dotted module name (recorded in the FunctionRecords).

  Returns:
    (source with the lines of every module / class / function docstring
    removed, [FunctionRecord] in source order, nested functions included).

  Raises:
    SyntaxError: if `text` does not parse (the caller skips the file).
  """
  tree = ast.parse(text)
  lines = text.splitlines()
  doc_lines: set[int] = set()
  records = []

  def visit(node, prefix: str):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        qual = f"{prefix}{child.name}"
        doc = _docstring_node(child)
        if doc is not None:
          doc_lines.update(range(doc.lineno - 1, doc.end_lineno))
        if not isinstance(child, ast.ClassDef):
          records.append((child, qual))
        visit(child, qual + ".")
      else:
        visit(child, prefix)

  mod_doc = _docstring_node(tree)
  if mod_doc is not None:
    doc_lines.update(range(mod_doc.lineno - 1, mod_doc.end_lineno))
  visit(tree, "")
  out = []
  for node, qual in records:
    # Bodies are cut once doc_lines is complete (nested docstrings included).
    start = node.body[0].lineno - 1
    doc = _docstring_node(node)
    if doc is not None:
      start = doc.end_lineno
    body = [s for i, s in enumerate(lines[start:node.end_lineno], start) if i not in doc_lines]
    out.append(FunctionRecord(module=module, qualname=qual, name=node.name,
                              args=ast.unparse(node.args), docstring=ast.get_docstring(node) or "",
                              body=_dedent(body)))
  stripped = "\n".join(s for i, s in enumerate(lines) if i not in doc_lines)
  return stripped, out


def chunk_text(text: str, chunk_chars: int) -> list[str]:
  """Cuts text at blank lines into chunks of about `chunk_chars` characters.

  Paragraphs (blank-line separated) are packed greedily; a paragraph longer
  than `chunk_chars` is cut at line ends. Empty chunks are dropped.
  """
  chunks, cur = [], ""
  for para in text.split("\n\n"):
    para = para.strip("\n")
    if not para.strip():
      continue
    while len(para) > chunk_chars:
      cut = para.rfind("\n", 0, chunk_chars)
      cut = cut if cut > 0 else chunk_chars
      if cur:
        chunks.append(cur)
        cur = ""
      chunks.append(para[:cut])
      para = para[cut:].lstrip("\n")
    if cur and len(cur) + 2 + len(para) > chunk_chars:
      chunks.append(cur)
      cur = ""
    cur = f"{cur}\n\n{para}" if cur else para
  if cur.strip():
    chunks.append(cur)
  return chunks


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The stdlib corpus.

  Attributes:
    python: the interpreter version it was built from ("3.11.7").
    pretrain_files, task_files: relative paths of the two parts.
    pretrain_texts: docstring-free chunks of the pre-training files.
    functions: function records of the task files.
    skipped: relative paths that did not parse or decode.
  """
  python: str
  pretrain_files: tuple[str, ...]
  task_files: tuple[str, ...]
  pretrain_texts: tuple[str, ...]
  functions: tuple[FunctionRecord, ...]
  skipped: tuple[str, ...] = ()

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    return json.dumps(d)

  @classmethod
  def from_json(cls, text: str) -> Corpus:
    d = json.loads(text)
    d["functions"] = tuple(FunctionRecord(**f) for f in d["functions"])
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _module_name(relpath: str) -> str:
  parts = relpath[:-3].split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts) or "__init__"


def build_corpus(root: str | pathlib.Path | None = None, *, max_files: int | None = None,
                 pretrain_fraction: float = 0.3, chunk_chars: int = 400,
                 log_every: int = 0) -> Corpus:
  """Reads and splits the standard library (see the module docstring).

  Args:
    root: library directory (default `stdlib_dir()`).
    max_files: use only the first `max_files` files (sorted relative paths).
    pretrain_fraction: fraction of files (by path hash) for pre-training.
    chunk_chars: approximate characters per pre-training chunk.
    log_every: print progress every this many files (0: silent).

  Returns:
    Corpus.
  """
  root = pathlib.Path(root) if root is not None else stdlib_dir()
  files = stdlib_files(root, max_files=max_files)
  pre_files, task_files, texts, functions, skipped = [], [], [], [], []
  for i, rel in enumerate(files):
    if log_every and i % log_every == 0:
      print(f"  corpus: {i}/{len(files)} files", flush=True)
    try:
      text = (root / rel).read_text(encoding="utf-8")
      stripped, recs = parse_source(text, _module_name(rel))
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
      skipped.append(rel)
      continue
    if is_pretraining_file(rel, pretrain_fraction):
      pre_files.append(rel)
      texts.extend(chunk_text(stripped, chunk_chars))
    else:
      task_files.append(rel)
      functions.extend(recs)
  return Corpus(python=".".join(map(str, sys.version_info[:3])), pretrain_files=tuple(pre_files),
                task_files=tuple(task_files), pretrain_texts=tuple(texts),
                functions=tuple(functions), skipped=tuple(skipped))


# ---------------------------------------------------------------------------
# Zoo specifications.

FAMILIES = {"gpt2": "GPT-2", "llama": "Llama"}


@dataclasses.dataclass(frozen=True)
class ZooSpec:
  """One zoo model.

  Attributes:
    name: model id (the curve files' "config name").
    arch: "gpt2" or "llama".
    d_model, n_layers, n_heads: transformer shape (d_ff from the arch default).
    pretrain_steps: causal-LM pre-training steps on the corpus.
    init_seed: seed of the random initialisation.
  """
  name: str
  arch: str
  d_model: int
  n_layers: int
  n_heads: int
  pretrain_steps: int
  init_seed: int = 0

  @property
  def family(self) -> str:
    return FAMILIES[self.arch]


def model_config(spec: ZooSpec, vocab_size: int, max_len: int) -> models.ModelConfig:
  """The ModelConfig of a zoo model (float32, arch-default d_ff, llama: untied head)."""
  if spec.arch not in FAMILIES:
    raise ValueError(f"zoo model {spec.name!r}: arch {spec.arch!r} not in {sorted(FAMILIES)}")
  return models.ModelConfig(arch=spec.arch, vocab_size=vocab_size, max_len=max_len,
                            d_model=spec.d_model, n_layers=spec.n_layers, n_heads=spec.n_heads)


def zoo_from_dicts(rows: Sequence[dict]) -> list[ZooSpec]:
  """ZooSpecs from config dicts; names must be unique."""
  specs = [ZooSpec(**dict(r)) for r in rows]
  names = [s.name for s in specs]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise ValueError(f"zoo: duplicate model names {sorted(dup)}")
  return specs
