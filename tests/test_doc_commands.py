"""Every command line shown in README.md and docs/*.md names flags and config fields that exist.

A command is `python -m experiments.NAME ARGS` in a code block (lines joined
at a trailing backslash) or in an inline code span (which may wrap lines), or
a span `experiments.NAME ARGS` (the README's table). For each: the binary
exists; each plain flag `--x` is one the binary defines (the module is
imported and its `define_flags()` called, as its `__main__` block does; main
never runs); each `--config.a.b=...` is a field of the config that
`--config=configs/FILE.py:VARIANT` loads (`get_config(VARIANT)`), or of the
binary's default config. A span of flags alone (`--workdir=...`) belongs to
the last binary the same section named before it.
"""

from __future__ import annotations

import functools
import importlib
import re
import shlex
import sys
from dataclasses import dataclass

import pytest
from absl import flags

from helpers import REPO_ROOT

_DOCS = [REPO_ROOT / "README.md"] + sorted((REPO_ROOT / "docs").glob("*.md"))
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
_BINARY = re.compile(r"(?:python -m |^)experiments\.(\w+)(.*)", re.DOTALL)
_MENTION = re.compile(r"experiments\.(\w+)")
# Spans that show a mistake on purpose.
_DELIBERATELY_WRONG = {("docs/binaries.md", "--config.num_restart=3")}
# Flags every absl program has (logging, help), not defined by the binary.
_ABSL_FLAGS = ("help", "helpshort", "helpfull", "verbosity", "v", "logtostderr",
               "alsologtostderr", "log_dir", "flagfile")


ALL_BINARIES = sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.py")
                      if "__main__" in p.read_text())


@dataclass(frozen=True)
class Command:
  where: str          # "docs/api.md:217"
  binary: str | None  # None: flags alone, of one of `section_binaries`
  args: tuple[str, ...]
  section_binaries: tuple[str, ...] = ()


def _args(text: str) -> tuple[str, ...]:
  """The flags of a shown command: `\\`-newlines joined, `[...]` optional parts kept,
  `...` (elided arguments) and anything after a shell operator dropped."""
  text = text.replace("\\\n", " ").replace("\n", " ")
  text = re.split(r"\s(?:&&|\||;|>)\s", text)[0]
  try:
    tokens = shlex.split(text)
  except ValueError:  # prose with an apostrophe, not a command
    tokens = text.split()
  out = []
  for token in tokens:
    token = token.strip("[]")
    # XLA_FLAGS values (--xla_...) are XLA's, not the binary's.
    if re.match(r"--[A-Za-z_][\w.]*(=|$)", token) and not token.startswith("--xla_"):
      out.append(token)
  return tuple(out)


def _commands() -> list[Command]:
  out = []
  for path in _DOCS:
    text = path.read_text()
    name = path.relative_to(REPO_ROOT).as_posix()
    pieces = []  # (offset, text)
    fenced = [(m.start(1), m.group(1)) for m in _FENCE.finditer(text)]
    blanked = _FENCE.sub(lambda m: " " * len(m.group(0)), text)
    for offset, block in fenced + [(m.start(), m.group(0)) for m in re.finditer(
        r"(?m)^(?: {4}.*\n?)+", blanked)]:
      for line in re.split(r"(?<!\\)\n", block):
        pieces.append((offset + block.find(line), line))
    pieces += [(m.start(1), m.group(1)) for m in _SPAN.finditer(blanked)
               if not m.group(1).startswith("``")]
    for offset, piece in sorted(pieces):
      line = text.count("\n", 0, offset) + 1
      section_start = text.rfind("\n#", 0, offset)
      found = re.search(r"(?:python -m |^)experiments\.\w+", piece.strip())
      if found:
        m = _BINARY.search(piece.strip())
        out.append(Command(f"{name}:{line}", m.group(1), _args(m.group(2))))
      elif _args(piece) and piece.strip().startswith("--") and (name, piece.strip()) not in _DELIBERATELY_WRONG:
        section_end = text.find("\n#", offset)
        section = text[max(section_start, 0):section_end if section_end >= 0 else len(text)]
        out.append(Command(f"{name}:{line}", None, _args(piece),
                           tuple(dict.fromkeys(_MENTION.findall(section)))))
  return out


@functools.cache
def binary_flags(binary: str) -> tuple[frozenset[str], str | None]:
  """(names of the flags `python -m experiments.BINARY` accepts, its default --config).

  Imports the binary and calls its `define_flags()` (as its `__main__` block
  does), then removes what that registered, so that binaries defining the
  same flag name can be read in one process.
  """
  # What earlier imports of experiments modules left in this process (a test that imported
  # a binary) is set aside meanwhile, flags and modules, so the binary is imported afresh
  # and its flags cannot collide with another binary's of the same name; then restored.
  hidden_flags = {f.name: (module, f)
                  for module, defined in flags.FLAGS.flags_by_module_dict().items()
                  if module.startswith("experiments") for f in defined}
  hidden_modules = {name: m for name, m in sys.modules.items() if name.startswith("experiments")}
  for name in hidden_flags:
    delattr(flags.FLAGS, name)
  for name in hidden_modules:
    del sys.modules[name]
  before_flags = set(flags.FLAGS)
  try:
    module = importlib.import_module(f"experiments.{binary}")
    if hasattr(module, "define_flags"):
      module.define_flags()
    names = frozenset(flags.FLAGS)
    default_config = None
    if "config" in names:
      default_config = flags.FLAGS["config"].default_as_str.strip("'\"") or None
  finally:
    for name in set(flags.FLAGS) - before_flags:
      delattr(flags.FLAGS, name)
    for name in [n for n in sys.modules if n.startswith("experiments")]:
      del sys.modules[name]
    sys.modules.update(hidden_modules)
    for name, (module, flag) in hidden_flags.items():
      flags.FLAGS[name] = flag
      flags.FLAGS.register_flag_by_module(module, flag)
  return names, default_config


@functools.cache
def load_config(spec: str):
  """`configs/FILE.py[:VARIANT]` -> get_config(VARIANT) (None without a variant)."""
  path, _, variant = spec.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(variant) if variant else module.get_config()


def has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def problems(command: Command) -> list[str]:
  """What a shown command names that does not exist (empty: nothing)."""
  if command.binary is None:
    # A section naming no binary (`experiments.NAME`: the convention) may show any binary's flags.
    named = [b for b in command.section_binaries if b.islower()] or ALL_BINARIES
    each = [problems(Command(command.where, b, command.args)) for b in named]
    return [] if any(not p for p in each) else [
        f"{command.where}: {' '.join(command.args)} is a command of none of "
        f"{', '.join(named)}: " + "; ".join(p[0] for p in each)]
  out = []
  binary = command.binary
  if binary is not None and not (REPO_ROOT / "experiments" / f"{binary}.py").exists():
    return [f"{command.where}: no binary experiments.{binary}"]
  defined, default_config = binary_flags(binary)
  config_spec = default_config
  for arg in command.args:
    name, _, value = arg[2:].partition("=")
    if name == "config" and value not in ("", "..."):
      config_spec = value
  for arg in command.args:
    name, _, _ = arg[2:].partition("=")
    if name.startswith("config."):
      if "config" not in defined:
        out.append(f"{command.where}: experiments.{binary} has no --config ({arg})")
      elif config_spec and not has_field(load_config(config_spec), name[len("config."):]):
        out.append(f"{command.where}: {config_spec} has no field {name[len('config.'):]} ({arg})")
    elif name not in defined and name.removeprefix("no") not in defined:
      out.append(f"{command.where}: experiments.{binary} defines no flag --{name}")
  return out


def _placeholder(command: Command) -> bool:
  """`--config.x=VALUE`, `--config=configs/FILE.py...`: the convention, not a command."""
  return command.binary in ("NAME", "X") or any(
      re.search(r"(?:^--config\.x=|FILE|NAME)", a) for a in command.args)


_SHOWN = [c for c in _commands() if not _placeholder(c)]


def test_commands_are_found():
  # The parser sees the README's first command and the docs' flag spans, so an
  # empty list cannot pass silently.
  wheres = {(c.where.split(":")[0], c.binary) for c in _SHOWN}
  assert ("README.md", "reproduce_selection") in wheres
  assert ("docs/select.md", "select") in wheres
  assert len(_SHOWN) >= 40


@pytest.mark.parametrize("command", _SHOWN, ids=[c.where for c in _SHOWN])
def test_shown_command_exists(command):
  assert not problems(command)


def test_a_stale_flag_or_field_is_caught():
  assert problems(Command("x", "reproduce_selection", ("--benchmark=curves.csv",))) == [
      "x: experiments.reproduce_selection defines no flag --benchmark"]
  assert problems(Command("x", "select", ("--config=configs/select.py",
                                          "--config.target_data_num=3", "--config.d00=2")))
  assert problems(Command("x", "no_such_binary", ()))
  flags_alone = ("--benchmark=runs/finetune_tiny/curves.csv",)
  assert problems(Command("x", None, flags_alone, ("finetune_sweep", "bench_train_speed")))
  assert not problems(Command("x", None, flags_alone, ("finetune_sweep", "bench_fit_speed")))
  assert not problems(Command("x", "select", ("--config=configs/select.py:online:a,b",
                                              "--config.d0=25", "--workdir=w")))
