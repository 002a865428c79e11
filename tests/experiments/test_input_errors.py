"""Every kind of bad input gives one `errors.InputError` naming the place, or the clean results.

Table-driven: each curve-file case (a variant of a clean 7-model file) and
each config / output-directory case is run through every binary that reads
it, in-process (reproduce_selection, lensllm_plus, select's predict and
replay, fit_laws, ntk_dynamics); the error must be a project error type
whose one-line message matches the case, and a variant that means the same
file (a byte order mark, CRLF line ends, reordered columns, zero-padded D
headers) must load to the same curves and give byte-identical selection.csv
and cost.csv. The other inputs (config fields, model configs, checkpoints,
token files, jsonl data, tokenizers, workdir contents and the directories
themselves) go through every binary that reads them: hessian_spectrum,
ntk_spectrum, train_curve_pfn, lensllm_study, build_zoo, select online,
finetune_sweep. Each error comes before any output is written (the binaries
check before any work, so these cases take milliseconds). `run_main`
turning these errors into one line and exit 2 is checked by
tests/experiments/test_cli_errors.py.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re

import numpy as np
import pytest

from configs import lensllm_plus as plus_config
from configs import select as select_config
from configs import selection as selection_config
from experiments import common, lensllm_plus
from experiments import reproduce_selection as rs
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import errors, rundir
from lensllm_jax.curves import benchmarks

pytestmark = pytest.mark.slow  # end-to-end runs of the binaries on bad input

QUICK = dict(methods=("ZeroShot", "SubTuning", "ModelSize"), ratios=(4, 8),
             budget=dict(enabled=False), figures=False)
OUTPUT_FILES = ("selection.csv", "cost.csv")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  curves, _ = synthetic_curves(seed=5)
  path = tmp_path_factory.mktemp("clean") / "toy7.csv"
  benchmarks.write_curves(curves, path)
  other = path.parent.parent / "other" / "other7.csv"
  benchmarks.write_curves(synthetic_curves(seed=6)[0], other)
  return path, other


def _cells(text):
  return [line.split(",") for line in text.splitlines()]


def _join(rows, end="\n"):
  return end.join(",".join(r) for r in rows) + end


def _swap_columns(text):
  rows = _cells(text)
  order = [0, len(rows[0]) - 2, *range(1, len(rows[0]) - 2), len(rows[0]) - 1]  # size second
  return _join([[r[j] for j in order] for r in rows])


def _set(text, line, column, value):
  rows = _cells(text)
  rows[line][rows[0].index(column)] = value
  return _join(rows)


def _rename(text, old, new):
  rows = _cells(text)
  rows[0][rows[0].index(old)] = new
  return _join(rows)


def _add_column(text, header, source):
  rows = _cells(text)
  j = rows[0].index(source)
  return _join([r + [header if i == 0 else r[j]] for i, r in enumerate(rows)])


# (case, how the clean text becomes the case's bytes, regex of the error; None: same results)
CURVE_CASES = [
    ("bom", lambda t: ("\ufeff" + t).encode(), None),
    ("crlf", lambda t: t.replace("\n", "\r\n").encode(), None),
    ("columns_reordered", lambda t: _swap_columns(t).encode(), None),
    ("zero_padded_header", lambda t: _rename(t, "200", "0200").encode(), None),
    ("same_d_twice", lambda t: _add_column(t, "0200", "200").encode(),
     r"toy7\.csv, line 1, column '0200': duplicate data size D=200"),
    ("non_ascii_digits", lambda t: _rename(t, "200", "\u00b200").encode(),
     r"toy7\.csv, line 1, column '\u00b200': unknown column"),
    ("size_overflows_int64", lambda t: _set(t, 2, "size", "1e30").encode(),
     r"toy7\.csv, line 3 \(model 'm1'\), column 'size': .*64-bit"),
    ("size_infinite", lambda t: _set(t, 2, "size", "1e400").encode(),
     r"line 3 \(model 'm1'\), column 'size': size must be a positive integer"),
    ("loss_overflows", lambda t: _set(t, 4, "400", "1e400").encode(),
     r"line 5 \(model 'm3'\), column '400': non-finite loss"),
    ("two_models", lambda t: "".join(t.splitlines(True)[:3]).encode(),
     r"toy7\.csv: 2 model\(s\).*at least 3"),
    ("not_utf8", lambda t: t.replace("m2", "m\u00e92").encode("latin-1"),
     r"toy7\.csv: not UTF-8"),
    ("empty", lambda t: b"", r"toy7\.csv: empty file"),
    ("header_only", lambda t: t.splitlines(True)[0].encode(), r"toy7\.csv: no model rows"),
    ("short_row", lambda t: _join(_cells(t)[:3] + [_cells(t)[3][:5]] + _cells(t)[4:]).encode(),
     r"toy7\.csv, line 4 \(model 'm2'\): has 5 fields"),
]


def _variant(clean_path, tmp_path, case, make):
  path = tmp_path / case / "toy7.csv"
  path.parent.mkdir()
  path.write_bytes(make(clean_path.read_text()))
  return path


def _selection_cfg(files, **overrides):
  cfg = selection_config.get_config()
  cfg.update(benchmarks=tuple(str(f) for f in files), num_restarts=2, max_steps=50, **QUICK)
  cfg.update(overrides)
  return cfg


def _plus_cfg(files, **overrides):
  cfg = plus_config.get_config("public")
  cfg.update(benchmarks=tuple(str(f) for f in files), ratios=(4, 8), budget=dict(enabled=False))
  cfg.update(overrides)
  return cfg


def _one_line(e: BaseException) -> str:
  assert isinstance(e, errors.InputError), repr(e)
  text = str(e)
  assert "\n" not in text and text, text
  return text


BINARIES = {"reproduce_selection": (rs.run, _selection_cfg),
            "lensllm_plus": (lensllm_plus.run, _plus_cfg)}


@pytest.fixture(scope="module")
def clean_outputs(clean, tmp_path_factory):
  out = tmp_path_factory.mktemp("clean_out")
  rs.run(_selection_cfg([clean[0]]), out)
  return {f: (out / f).read_bytes() for f in OUTPUT_FILES}


@pytest.mark.parametrize("binary", sorted(BINARIES))
@pytest.mark.parametrize("case,make,expected", CURVE_CASES, ids=[c[0] for c in CURVE_CASES])
def test_curve_file_cases(clean, clean_outputs, tmp_path, binary, case, make, expected):
  run, config = BINARIES[binary]
  path = _variant(clean[0], tmp_path, case, make)
  files = [path, clean[1]]
  if expected is None:
    # The same file: the loaders give the same curves, the selection the same bytes.
    a, b = (common.load_all([p], None)[0] for p in (clean[0], path))
    assert a.models == b.models and a.families == b.families
    np.testing.assert_array_equal(a.sizes, b.sizes)
    np.testing.assert_array_equal(a.data_sizes, b.data_sizes)
    np.testing.assert_array_equal(a.losses, b.losses)
    if binary == "reproduce_selection":
      out = run(config([path]), tmp_path / "out")
      assert {f: (out / f).read_bytes() for f in OUTPUT_FILES} == clean_outputs
    return
  with pytest.raises(errors.InputError) as info:
    run(config(files), tmp_path / "out")
  assert info.type is not errors.InputError  # one of the specific kinds
  assert re.search(expected, _one_line(info.value)), str(info.value)
  assert not (tmp_path / "out").exists()  # refused before anything was written


SEL, PLUS = "reproduce_selection", "lensllm_plus"
CONFIG_CASES = [  # (case, binaries with the field, overrides, regex)
    ("off_grid_target", (SEL,), dict(target_data_num=12345), r"config\.target_data_num: D\*=12345"),
    ("ratio_past_grid", (SEL, PLUS), dict(ratios=(4096,)), r"config\.ratios: ratio 4096"),
    ("no_ratios", (SEL, PLUS), dict(ratios=()), r"config\.ratios is empty"),
    ("zero_restarts", (SEL, PLUS), dict(num_restarts=0), r"config\.num_restarts=0: must be >= 1"),
    ("negative_steps", (SEL,), dict(max_steps=-1), r"config\.max_steps=-1: must be >= 0"),
    ("negative_steps", (PLUS,), dict(num_steps=-1), r"config\.num_steps=-1: must be >= 0"),
    ("no_methods", (SEL,), dict(methods=()), r"config\.methods is empty"),
    ("method_twice", (SEL,), dict(methods=("AtS", "AtS")), r"config\.methods: \['AtS'\] given"),
    ("no_files", (SEL, PLUS), dict(benchmarks=()), r"config\.benchmarks is empty"),
    ("nan_level", (SEL, PLUS), dict(budget=dict(levels=(float("nan"),))),
     r"budget\.levels: .* finite"),
    ("negative_threads", (SEL,), dict(threads=-1), r"config\.threads=-1"),
]
CONFIG_RUNS = [(b, c, o, e) for c, bs, o, e in CONFIG_CASES for b in bs]


@pytest.mark.parametrize("binary,case,overrides,expected", CONFIG_RUNS,
                         ids=[f"{r[1]}-{r[0]}" for r in CONFIG_RUNS])
def test_config_cases(clean, tmp_path, binary, case, overrides, expected):
  run, config = BINARIES[binary]
  cfg = config(clean)
  cfg.update(overrides)
  with pytest.raises(errors.ConfigError) as info:
    run(cfg, tmp_path / "out")
  assert re.search(expected, _one_line(info.value)), str(info.value)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_file_inputs_that_are_not_files(clean, tmp_path, binary):
  run, config = BINARIES[binary]
  (tmp_path / "adir.csv").mkdir()
  for spec, expected in ((tmp_path / "adir.csv", r"adir\.csv: is a directory"),
                         (tmp_path / "nope.csv", r"curve file .*nope\.csv does not exist")):
    with pytest.raises(errors.CurveFileError) as info:
      run(config([spec, clean[1]]), tmp_path / "out")
    assert re.search(expected, _one_line(info.value))


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_output_directory_cases(clean, tmp_path, binary):
  run, config = BINARIES[binary]
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for out, expected in ((a_file, r"a_file exists and is not a directory"),
                        (a_file / "sub", r"a_file/sub: cannot create the directory")):
    with pytest.raises(errors.WorkdirError) as info:
      run(config(clean), out)
    assert re.search(expected, _one_line(info.value))
  # A second writer: refused at once, naming the holder's pid.
  out = tmp_path / "busy"
  out.mkdir()
  with rundir.directory_lock(out):
    with pytest.raises(errors.WorkdirError, match=rf"in use by another run \(pid {os.getpid()},"):
      run(config(clean), out)


def test_curve_parser_fuzz_never_raises_anything_else(clean):
  """Seeded random damage to a clean file (headers, cells, encodings, line endings, cuts):
  the parser either returns curves or raises `CurveFileError` naming the source, never
  anything else."""
  rng = random.Random(0)
  text = clean[0].read_text()
  pieces = ["", "0", "0200", "-1", "1e400", "nan", "inf", "1e30", "abc", "\u00b2", '"', "\x00",
            ",", "\r", "\n", "\ufeff", " ", "size", "family", "config name", "1.5", "2e5",
            "9" * 40, "\u00e9"]
  outcomes = {"ok": 0, "error": 0}
  for i in range(400):
    rows = _cells(text)
    for _ in range(rng.randint(1, 4)):
      r = rng.randrange(len(rows))
      if not rows[r]:
        continue
      c = rng.randrange(len(rows[r]))
      action = rng.randrange(5)
      if action == 0:
        rows[r][c] = rng.choice(pieces)
      elif action == 1:
        rows[r][c] += rng.choice(pieces)
      elif action == 2:
        del rows[r][c]
      elif action == 3:
        rows.insert(rng.randrange(len(rows) + 1), list(rows[rng.randrange(len(rows))]))
      else:
        rows[r] = rows[r][:c]
    data = _join(rows, rng.choice(["\n", "\r\n", "\r"]))
    if rng.random() < 0.2:
      data = data[:rng.randrange(len(data) + 1)]
    raw = data.encode(rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]),
                      errors="replace")
    path = clean[0].parent.parent / "fuzz" / f"f{i}.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    try:
      curves = benchmarks.load_curves(path)
    except errors.CurveFileError as e:
      assert str(path) in str(e) and "\n" not in str(e), str(e)
      outcomes["error"] += 1
    else:
      assert curves.losses.shape == (curves.num_models, curves.data_sizes.size)
      measured = curves.losses[~np.isnan(curves.losses)]  # an empty cell: not measured
      assert np.all(np.isfinite(measured)) and np.all(measured > 0)
      assert np.all(np.diff(curves.data_sizes) > 0) and curves.data_sizes[0] == 0
      outcomes["ok"] += 1
  assert outcomes["ok"] > 5 and outcomes["error"] > 100, outcomes  # both paths exercised


def test_repeated_override_is_refused():
  argv = ["bin", "--config=c.py", "--config.ratios=(8,)", "--config.seed=1",
          "--config.ratios=(16,)"]
  assert common.repeated_overrides(argv) == ["--config.ratios"]
  assert common.repeated_overrides(argv[:4]) == []


# ------------------------------------------------- finetune_sweep inputs ---


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
  """A local jsonl task and a tiny GPT-2 checkpoint (transformers, saved locally) whose
  tokenizer.json is trained here."""
  import torch
  import transformers

  from lensllm_jax.training import textdata

  root = tmp_path_factory.mktemp("sweep_inputs")
  records = textdata.synthetic_translation_records(300, seed=0)
  data = root / "train.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  tok = textdata.train_tokenizer([r["src"] + " " + r["tgt"] for r in records], vocab_size=280)
  ckpt = root / "gpt2"
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=16, n_layer=1, n_head=2,
      bos_token_id=0, eos_token_id=0)).save_pretrained(ckpt, safe_serialization=True)
  tok.save(str(ckpt / "tokenizer.json"))
  return data, ckpt


def _sweep_cfg(data, ckpt):
  from configs import finetune_tiny

  cfg = finetune_tiny.get_config("smoke")
  cfg.update(dict(task="local", num_validation=20, num_test=20))
  cfg.subsets.sizes = (50,)
  cfg.data_files.train = str(data)
  cfg.models[0].update(dict(name="tiny", hf_dir=str(ckpt), preset="", pretrain_steps=0))
  return cfg


def _damage_json_line(root, data, ckpt):
  lines = data.read_text().splitlines(True)
  lines[2] = lines[2][:-5] + "\n"
  (root / "d.jsonl").write_text("".join(lines))
  return {"data_files.train": str(root / "d.jsonl")}


def _copy_ckpt(root, ckpt, damage):
  import shutil

  new = root / "ckpt"
  shutil.copytree(ckpt, new)
  damage(new)
  return {"models.0.hf_dir": str(new)}


def _smaller_vocab(path):
  """The checkpoint's config.json says 260 tokens (its tensors too), the tokenizer has 280."""
  import safetensors.numpy

  hf = json.loads((path / "config.json").read_text())
  hf["vocab_size"] = 260
  (path / "config.json").write_text(json.dumps(hf))
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  tensors = {k: v[:260] if v.shape[0] == 280 else v for k, v in tensors.items()}
  safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


SWEEP_CASES = [  # (case, how the inputs change: fn(root, data, ckpt) -> overrides, regex, kind)
    ("json_line", _damage_json_line, r"d\.jsonl, line 3: not JSON", errors.DataError),
    ("empty_jsonl", lambda r, d, c: ((r / "e.jsonl").write_text(""),
                                     {"data_files.train": str(r / "e.jsonl")})[1],
     r"e\.jsonl is empty", errors.DataError),
    ("data_is_directory", lambda r, d, c: {"data_files.train": str(r)},
     r"config\.data_files\.train: .* does not exist \(a directory\)", errors.DataError),
    ("missing_field", lambda r, d, c: {"target_field": "translation"},
     r"field 'translation' not found", errors.DataError),
    ("batch_size_zero", lambda r, d, c: {"train.batch_size": 0},
     r"config\.train\.batch_size=0: must be >= 1", errors.ConfigError),
    ("subset_zero", lambda r, d, c: {"subsets.sizes": (0, 20)},
     r"config\.subsets\.sizes: 0 must be an integer >= 1", errors.ConfigError),
    ("subset_twice", lambda r, d, c: {"subsets.sizes": (20, 20)},
     r"config\.subsets\.sizes: \['20'\] given more than once", errors.ConfigError),
    ("subset_past_pool", lambda r, d, c: {"subsets.sizes": (5000,)},
     r"config\.subsets\.sizes needs 5000 train examples", errors.ConfigError),
    ("truncated_safetensors", lambda r, d, c: _copy_ckpt(r, c, lambda p: (p / "model.safetensors")
                                                         .write_bytes((p / "model.safetensors")
                                                                      .read_bytes()[:300])),
     r"model\.safetensors: not a readable safetensors file", errors.CheckpointError),
    ("invalid_config_json", lambda r, d, c: _copy_ckpt(r, c, lambda p: (p / "config.json")
                                                       .write_text('{"model_type": "gpt2",\n')),
     r"config\.json, line 2: not valid JSON", errors.CheckpointError),
    ("corrupt_tokenizer", lambda r, d, c: _copy_ckpt(r, c, lambda p: (p / "tokenizer.json")
                                                     .write_text("{not json")),
     r"tokenizer\.json: not a readable tokenizer\.json", errors.CheckpointError),
    ("tokenizer_past_vocab", lambda r, d, c: _copy_ckpt(r, c, _smaller_vocab),
     r"the tokenizer has 280 tokens, more than the model's vocab_size 260",
     errors.CheckpointError),
]


@pytest.mark.torch  # the fixture saves a tiny GPT-2 with transformers
@pytest.mark.parametrize("case,change,expected,kind", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_finetune_sweep_input_cases(sweep_inputs, tmp_path, case, change, expected, kind):
  """finetune_sweep.run (the binary's main) on each bad input: refused before any training."""
  from experiments import finetune_sweep

  data, ckpt = sweep_inputs
  cfg = _sweep_cfg(data, ckpt)
  for key, value in change(tmp_path, data, ckpt).items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
  with pytest.raises(kind) as info:
    finetune_sweep.run(cfg, tmp_path / "work")
  assert re.search(expected, _one_line(info.value)), str(info.value)
  assert not (tmp_path / "work" / "runs.jsonl").exists()


# ------------------------------------- the other binaries that read curve files ---
# select (predict and replay), fit_laws and ntk_dynamics read curve files with the same
# loader (`benchmarks.load_curves`), so a variant that means the same file gives the same
# curves (test_curve_file_cases) and thus the same results; each must refuse every damaged
# variant with the same one line, before any work.


def _select_predict(path, tmp_path):
  from experiments import select

  cfg = select_config.get_config()
  cfg.curves, cfg.target_data_num = str(path), 819200
  select.run(cfg, str(tmp_path / "out"))
  return tmp_path / "out"


def _select_replay(path, tmp_path):
  from experiments import select

  cfg = select_config.get_config("replay")
  cfg.replay = str(path)
  select.run(cfg, str(tmp_path / "out"))
  return tmp_path / "out"


def _fit_laws(path, tmp_path):
  from configs import fit_laws as fit_laws_config
  from experiments import fit_laws

  cfg = fit_laws_config.get_config()
  cfg.benchmarks = (str(path),)
  fit_laws.run(cfg, tmp_path / "out")
  return tmp_path / "out"


def _study_cfg(curves):
  from configs import study as study_config

  cfg = study_config.get_config("tiny")
  cfg.tasks = ("x",)
  cfg.subsets.sizes = tuple(int(d) for d in curves.data_sizes[1:])
  return cfg


def _eigenpairs(out, models, task="x"):
  rows = [{"task": task, "model": m, "k": k, "eigval": 1.0 / (k + 1), "proj": 0.1, "eta": 1e-3}
          for m in models for k in range(3)]
  common.append_rows(out / "ntk_eigenpairs.csv", list(rows[0]), rows)


def _ntk_dynamics(path, tmp_path):
  """The variant as a study directory's curves_x.csv, beside eigenpairs of m0..m6."""
  from experiments import ntk_dynamics

  out = tmp_path / "study"
  out.mkdir()
  (out / "curves_x.csv").write_bytes(path.read_bytes())
  _eigenpairs(out, [f"m{i}" for i in range(7)])
  ntk_dynamics.run(_study_cfg(synthetic_curves(seed=5)[0]), out, methods=("LensLLM",))
  return out / "ntk_dynamics.csv"


OTHER_CURVE_BINARIES = {"select": _select_predict, "select_replay": _select_replay,
                        "fit_laws": _fit_laws, "ntk_dynamics": _ntk_dynamics}
# A file of two models is a valid input of the binaries that need no correlation.
FEWER_MODELS_OK = {"select", "select_replay", "fit_laws"}
OTHER_CURVE_RUNS = [(b, c, m, e) for b in sorted(OTHER_CURVE_BINARIES)
                    for c, m, e in CURVE_CASES
                    if e is not None and not (c == "two_models" and b in FEWER_MODELS_OK)]


@pytest.mark.parametrize("binary,case,make,expected", OTHER_CURVE_RUNS,
                         ids=[f"{r[0]}-{r[1]}" for r in OTHER_CURVE_RUNS])
def test_other_binaries_refuse_damaged_curve_files(clean, tmp_path, binary, case, make, expected):
  path = _variant(clean[0], tmp_path, case, make)
  with pytest.raises(errors.CurveFileError) as info:
    OTHER_CURVE_BINARIES[binary](path, tmp_path)
  if binary == "ntk_dynamics":
    expected = expected.replace("toy7", "curves_x")
  assert re.search(expected, _one_line(info.value)), str(info.value)
  assert not (tmp_path / "out").exists()  # refused before anything was written
  assert not (tmp_path / "study" / "ntk_dynamics.csv").exists()
  assert not (tmp_path / "study" / "manifest.ntk_dynamics.json").exists()


# ---------------------------- config, model, token and workdir inputs of the rest ---


def _tokens(root, name, array):
  path = root / name
  np.save(path, array)
  return str(path)


def _model_json(root, text):
  path = root / "model.json"
  path.write_text(text)
  return str(path)


def _tiny_gpt2_json():
  import dataclasses

  from lensllm_jax import models

  return json.dumps(dataclasses.asdict(models.presets["tiny-gpt2"]))


def _hessian(root, overrides):
  from configs import hessian_spectrum as hessian_config
  from experiments import hessian_spectrum

  cfg = hessian_config.get_config()
  cfg.update(overrides(root) if callable(overrides) else overrides)
  hessian_spectrum.run(cfg, str(root / "out"))


def _ntk_spectrum(root, overrides):
  from configs import ntk_spectrum as ntk_config
  from experiments import ntk_spectrum

  cfg = ntk_config.get_config()
  cfg.update(overrides(root) if callable(overrides) else overrides)
  ntk_spectrum.run(cfg, str(root / "out"))


def _train_pfn(root, overrides):
  from configs import context_pfn as context_config
  from configs import curve_pfn as curve_pfn_config
  from experiments import train_curve_pfn

  values = overrides(root) if callable(overrides) else overrides
  kind = values.pop("kind", "curve")
  cfg = (context_config if kind == "context" else curve_pfn_config).get_config("tiny")
  cfg.kind = kind
  cfg.output_dir = cfg.log_dir = str(root / "out")
  for key, value in values.items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  train_curve_pfn.run(cfg)


def _study(root, overrides, binary="lensllm_study"):
  from configs import study as study_config
  from experiments import build_zoo, lensllm_study

  cfg = study_config.get_config("tiny")
  for key, value in (overrides(root) if callable(overrides) else overrides).items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  if binary == "build_zoo":
    build_zoo.build(cfg, root / "out")
  else:
    with lensllm_study.open_study(cfg, root / "out", root / "out" / "results"):
      pytest.fail("opened")


def _select_online(root, overrides):
  from experiments import select

  cfg = select_config.get_config("online_smoke")
  for key, value in (overrides(root) if callable(overrides) else overrides).items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
  select.run(cfg, workdir=str(root / "out"))


def _corrupt_ckpt(root):
  bad = root / "ckpt"
  bad.mkdir()
  (bad / "garbage").write_text("not orbax")
  return dict(pretrained_ckpt=str(bad), finetuned_ckpt=str(bad))


def _corrupt_weights(root, cut: bool):
  """A copy of the committed CurvePFN with its weights.msgpack cut in half or made garbage."""
  import shutil

  from lensllm_jax.plus import pfn

  copy = root / "pfn"
  shutil.copytree(pfn.CURVE_PFN_WEIGHTS, copy)
  weights = copy / "weights.msgpack"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2] if cut else b"not msgpack at all\n")
  return {"kind": "context", "init_from": str(copy)}


def _corpus(root):
  """A workdir of this config whose corpus.json was cut."""
  from configs import study as study_config
  from lensllm_jax.training import zoo_build

  (root / "out").mkdir()
  zoo_build.bind_zoo_workdir(study_config.get_config("tiny"), root / "out")
  (root / "out" / "corpus.json").write_text('{"python": "3.11", "functions": [')
  return {}


V = 256  # tiny-gpt2's vocabulary
OTHER_CASES = [  # (binary runner, case, overrides or fn(root) -> overrides, error type, regex)
    (_hessian, "batch_size_zero", dict(batch_size=0), errors.ConfigError,
     r"config\.batch_size=0: must be >= 1"),
    (_hessian, "examples_not_multiple", dict(num_examples=10), errors.ConfigError,
     r"config\.num_examples=10 must be a multiple of config\.batch_size=8"),
    (_hessian, "one_probe", dict(hutchinson=dict(probes=1)), errors.ConfigError,
     r"config\.hutchinson\.probes=1: must be >= 2"),
    (_hessian, "k_past_lanczos", dict(lanczos=dict(k=40)), errors.ConfigError,
     r"config\.lanczos\.k=40: at most config\.lanczos\.iters=30"),
    (_hessian, "unknown_preset", dict(preset="nope"), errors.ConfigError,
     r"config\.preset='nope' unknown"),
    (_hessian, "model_json_invalid", lambda r: dict(model_config=_model_json(r, '{"arch": "gpt2",\n')),
     errors.CheckpointError, r"model\.json, line 2: not valid JSON"),
    (_hessian, "model_json_fields", lambda r: dict(model_config=_model_json(r, '{"arch": "gpt2", "x": 1}')),
     errors.CheckpointError, r"model\.json: not valid ModelConfig fields"),
    (_hessian, "model_json_directory", lambda r: dict(model_config=str(r)),
     errors.CheckpointError, r"config\.model_config: .* is a directory, not a file"),
    (_hessian, "tokens_missing", lambda r: dict(tokens_npy=str(r / "nope.npy")),
     errors.DataError, r"config\.tokens_npy: .*nope\.npy does not exist"),
    (_hessian, "tokens_not_npy", lambda r: dict(tokens_npy=_model_json(r, "[1, 2]")),
     errors.DataError, r"config\.tokens_npy=.*model\.json: not a readable \.npy file"),
    (_hessian, "tokens_float", lambda r: dict(tokens_npy=_tokens(r, "t.npy", np.zeros((16, 33)))),
     errors.DataError, r"expected integer token ids \[n, T\], got float64"),
    (_hessian, "tokens_past_vocab",
     lambda r: dict(tokens_npy=_tokens(r, "t.npy", np.full((16, 33), V, np.int64))),
     errors.DataError, r"token ids outside \[0, 256\)"),
    (_hessian, "tokens_short",
     lambda r: dict(tokens_npy=_tokens(r, "t.npy", np.zeros((16, 20), np.int64))),
     errors.DataError, r"need shape \[>= 16, 33\]"),
    (_hessian, "one_checkpoint", lambda r: dict(pretrained_ckpt=str(r)), errors.ConfigError,
     r"pass both config\.pretrained_ckpt and config\.finetuned_ckpt"),
    (_hessian, "checkpoint_missing",
     lambda r: dict(pretrained_ckpt=str(r / "no"), finetuned_ckpt=str(r / "no")),
     errors.CheckpointError, r"/no: no such checkpoint directory"),
    (_hessian, "checkpoint_corrupt", _corrupt_ckpt, errors.CheckpointError,
     r"ckpt: not a readable checkpoint of these parameters"),
    (_ntk_spectrum, "unknown_output", dict(ntk=dict(output="logits")), errors.ConfigError,
     r"config\.ntk\.output='logits': expected one of"),
    (_ntk_spectrum, "no_probes", dict(n=0), errors.ConfigError, r"config\.n=0: must be >= 1"),
    (_ntk_spectrum, "bad_t_range", dict(t_grid=dict(range=(5.0, 1.0))), errors.ConfigError,
     r"config\.t_grid\.range=\[5\.0, 1\.0\]: expected \(t_min, t_max\)"),
    (_ntk_spectrum, "unknown_preset", dict(preset="nope"), errors.ConfigError,
     r"config\.preset='nope': not one of"),
    (_ntk_spectrum, "checkpoint_missing", lambda r: dict(checkpoint=str(r / "no")),
     errors.CheckpointError, r"config\.checkpoint=.*/no: no such path"),
    (_ntk_spectrum, "probe_past_vocab",
     lambda r: dict(probe=_tokens(r, "p.npy", np.full((4, 8), V, np.int64))),
     errors.DataError, r"config\.probe=.*p\.npy: token ids outside \[0, 256\)"),
    (_ntk_spectrum, "probe_too_long",
     lambda r: dict(probe=_tokens(r, "p.npy", np.zeros((4, 200), np.int64))),
     errors.DataError, r"length 200 > max_len 128"),
    (_ntk_spectrum, "probe_not_npy", lambda r: dict(probe=_model_json(r, "x")), errors.DataError,
     r"config\.probe=.*: not a readable \.npy file"),
    (_train_pfn, "unknown_kind", {"kind": "nope"}, errors.ConfigError,
     r"config\.kind='nope'; expected 'curve' or 'context'"),
    (_train_pfn, "zero_steps", {"train.num_steps": 0}, errors.ConfigError,
     r"config\.train\.num_steps=0: must be >= 1"),
    (_train_pfn, "zero_batch", {"train.batch_size": 0}, errors.ConfigError,
     r"config\.train\.batch_size=0: must be >= 1"),
    (_train_pfn, "drop_everything", {"train.drop_prob": 1.0}, errors.ConfigError,
     r"config\.train\.drop_prob=1\.0: must be in \[0, 1\)"),
    (_train_pfn, "bars_reversed", {"bars.z_min": 2.0}, errors.ConfigError,
     r"config\.bars: z_min=2\.0 must be below z_max=1\.0"),
    (_train_pfn, "init_from_missing", lambda r: {"kind": "context", "init_from": str(r / "no")},
     errors.CheckpointError, r"config\.init_from=.*/no: no weights\.msgpack there"),
    (_train_pfn, "init_from_cut", functools.partial(_corrupt_weights, cut=True),
     errors.CheckpointError, r"pfn/weights\.msgpack: not a readable weights file \(.*incomplete"),
    (_train_pfn, "init_from_garbage", functools.partial(_corrupt_weights, cut=False),
     errors.CheckpointError, r"pfn/weights\.msgpack: not a readable weights file"),
    (_study, "no_tasks", {"tasks": []}, errors.ConfigError, r"config\.tasks is empty"),
    (_study, "unknown_task", {"tasks": ["x"]}, errors.ConfigError,
     r"config\.tasks: 'x' is not one of"),
    (_study, "subset_zero", {"subsets.sizes": [0, 25]}, errors.ConfigError,
     r"config\.subsets\.sizes: 0 must be an integer >= 1"),
    (_study, "batch_zero", {"train.batch_size": 0}, errors.ConfigError,
     r"config\.train\.batch_size=0: must be >= 1"),
    (_study, "zero_restarts", {"selection.num_restarts": 0}, errors.ConfigError,
     r"config\.selection\.num_restarts=0: must be >= 1"),
    (_study, "ratio_past_grid", {"selection.ratios": [64]}, errors.ConfigError,
     r"config\.selection\.ratios: ratio 64 gives D_max=12\.5"),
    (_study, "no_zoo", {"zoo": []}, errors.ConfigError, r"config\.zoo is empty"),
    (_study, "unknown_budget_method", {"selection.budget.method": "Nope"}, errors.ConfigError,
     r"config\.selection\.budget\.method: 'Nope'; budget methods:"),
    (_study, "hessian_model_unknown", {"hessian.models": ["nope"]}, errors.ConfigError,
     r"config\.hessian\.models: \['nope'\] are not zoo models"),
    (_study, "pac_examples_past_hessian_examples", {"hessian.pac_bayes.examples": 17},
     errors.ConfigError,
     r"config\.hessian\.pac_bayes\.examples=17: at most config\.hessian\.num_examples=16"),
    (functools.partial(_study, binary="build_zoo"), "zoo_twice",
     {"zoo": [dict(name="a", arch="gpt2", d_model=d, n_layers=1, n_heads=2, pretrain_steps=0)
              for d in (8, 16)]},
     errors.ConfigError,
     r"config\.zoo: .*duplicate model names \['a'\]"),
    (functools.partial(_study, binary="build_zoo"), "corpus_cut", _corpus, errors.WorkdirError,
     r"corpus\.json: not a corpus of build_zoo"),
    (_select_online, "batch_size_zero", {"train.batch_size": 0}, errors.ConfigError,
     r"config\.train\.batch_size=0: must be >= 1"),
    (_select_online, "one_model", lambda r: {"models": []}, errors.ConfigError,
     r"config\.models: 0 model\(s\); selection needs >= 2"),
    (_select_online, "sizes_given", {"subsets.sizes": (200, 400)}, errors.ConfigError,
     r"config\.subsets\.sizes=\(200, 400\): the online selection runs its own schedule"),
    (_select_online, "d0_past_cap", {"d0": 400}, errors.ConfigError,
     r"config\.max_data_num=200 is below config\.d0=400"),
    (_select_online, "unknown_predictor", {"predictor": "Nope"}, errors.ConfigError,
     r"config\.predictor='Nope': unknown"),
    (_select_online, "negative_min_points", {"min_points": 0}, errors.ConfigError,
     r"config\.min_points=0: must be >= 1"),
    (_select_online, "negative_z", {"z": -1.0}, errors.ConfigError, r"config\.z=-1: must be >= 0"),
]


def _name(runner):
  return getattr(runner, "func", runner).__name__.strip("_") + (
      "_build_zoo" if getattr(runner, "keywords", None) else "")


@pytest.mark.parametrize("runner,case,overrides,kind,expected", OTHER_CASES,
                         ids=[f"{_name(c[0])}-{c[1]}" for c in OTHER_CASES])
def test_config_model_token_and_workdir_inputs(tmp_path, runner, case, overrides, kind,
                                               expected):
  """Each binary on a bad config field, model config, checkpoint, token file or workdir
  content: the specific error, one line naming the place, before any output directory."""
  with pytest.raises(kind) as info:
    runner(tmp_path, dict(overrides) if isinstance(overrides, dict) else overrides)
  assert re.search(expected, _one_line(info.value)), str(info.value)
  out = tmp_path / "out"
  assert not out.exists() or {p.name for p in out.iterdir()} <= {
      "corpus.json", ".lock", "manifest.zoo.json"}


@pytest.mark.parametrize("damage,expected", [
    (lambda data: data[:len(data) // 2], r"not a readable cache of these parameters \(ValueError"),
    (None, r"cached parameters of other shapes than the model's")],
    ids=["cut", "other_shapes"])
def test_hessian_spectrum_refuses_a_corrupt_cached_params_file(tmp_path, damage, expected):
  """A workdir of this config whose cached params_finetuned.msgpack was cut or holds other
  shapes: one line naming the file, no traceback."""
  import dataclasses

  import flax.serialization
  import jax

  from configs import hessian_spectrum as hessian_config
  from experiments import hessian_spectrum
  from lensllm_jax.models import init_params, presets

  cfg = hessian_config.get_config()
  out = tmp_path / "out"
  with hessian_spectrum.open_workdir(cfg, str(out)):
    pass  # the workdir's manifest, as a run that trained and was cut would leave it
  def zeros(config):  # a parameter file of `config`'s shapes
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return flax.serialization.to_bytes(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))

  config = presets[cfg.preset]
  good = zeros(config)
  other = zeros(dataclasses.replace(config, vocab_size=2 * config.vocab_size))
  (out / "params_pretrained.msgpack").write_bytes(good)
  (out / "params_finetuned.msgpack").write_bytes(other if damage is None else damage(good))
  with pytest.raises(errors.CheckpointError) as info:
    hessian_spectrum.run(cfg, str(out))
  line = _one_line(info.value)
  assert re.search(r"out/params_finetuned\.msgpack: " + expected, line), line


def test_same_inputs_in_another_form_are_read_the_same(tmp_path):
  """A model config with a byte order mark, and token ids as int32 instead of int64, are
  the same inputs (read into equal values, hence the same results)."""
  from configs import hessian_spectrum as hessian_config
  from experiments import hessian_spectrum

  cfg = hessian_config.get_config()
  text = _tiny_gpt2_json()
  a = tmp_path / "a.json"
  a.write_text(text)
  b = tmp_path / "b.json"
  b.write_bytes(("\ufeff" + text).encode())
  configs = []
  for path in (a, b):
    cfg.model_config = str(path)
    configs.append(hessian_spectrum.model_config(cfg))
  assert configs[0] == configs[1]
  ids = np.random.default_rng(0).integers(0, V, (16, 33))
  data = []
  for dtype in (np.int64, np.int32):
    cfg.tokens_npy = _tokens(tmp_path, f"{dtype.__name__}.npy", ids.astype(dtype))
    data.append(hessian_spectrum.load_task_data(cfg, configs[0]))
  for k in data[0]:
    np.testing.assert_array_equal(data[0][k], data[1][k])
    assert data[0][k].dtype == data[1][k].dtype


WORKDIR_BINARIES = {  # binary -> fn(directory) running it on its output directory / workdir
    "hessian_spectrum": lambda d: _hessian(d.parent, {}),
    "ntk_spectrum": lambda d: _ntk_spectrum(d.parent, {}),
    "train_curve_pfn": lambda d: _train_pfn(d.parent, {}),
    "lensllm_study": lambda d: _study(d.parent, {}),
    "build_zoo": lambda d: _study(d.parent, {}, binary="build_zoo"),
    "select_online": lambda d: _select_online(d.parent, {}),
}


@pytest.mark.parametrize("binary", sorted(WORKDIR_BINARIES))
def test_output_directory_that_is_a_file_or_in_use(tmp_path, binary):
  """The directory of each binary: a file there, or another run holding its lock, is
  refused at once with one line (the heavy work never starts)."""
  run = WORKDIR_BINARIES[binary]
  (tmp_path / "out").write_text("x")
  with pytest.raises(errors.WorkdirError) as info:
    run(tmp_path / "out")
  assert re.search(r"out exists and is not a directory", _one_line(info.value))
  (tmp_path / "out").unlink()
  (tmp_path / "out").mkdir()
  with rundir.directory_lock(tmp_path / "out"):
    with pytest.raises(errors.WorkdirError, match=rf"in use by another run \(pid {os.getpid()},"):
      run(tmp_path / "out")
