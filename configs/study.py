r"""The LensLLM study: zoo, sweeps, NTK, Hessians, selection (experiments.lensllm_study).

`get_config("tiny")` and `get_config("full")` are the two presets;
`experiments.build_zoo` takes the same config and runs the zoo steps alone.
Override fields with `--config.x=...` (e.g. `--config.selection.num_restarts=4`).

tiny: Tiny LensLLM study: the whole pipeline in about a minute (CI, tests/experiments/test_study.py).

  python -m experiments.lensllm_study --config=configs/study.py:tiny

Four very small models (two GPT-2, two Llama; one shape per family, pre-trained
for 12 or 0 steps) on 120 standard-library files, both tasks, D = 25 * 2^k up to
800. The numbers mean nothing; the test checks that every step runs and
writes finite values.

full: Full LensLLM study on 2 CPU cores (about an hour; results in results/study/).

  python -m experiments.lensllm_study --config=configs/study.py:full

Zoo: 8 models, GPT-2 and Llama style, width 32 / 1 layer and width 48 / 2
layers per family (four sizes, 31k-105k parameters with the 512-token
vocabulary), each pre-trained long (500-1000 steps) and short (100-150 steps)
on the docstring-free 30 % of the standard library files. Tasks: code2name and translate
(lensllm_jax.training.study_tasks), D = 200 * 2^k, k = 0..7 (200 ... 25600; D* =
25600), one epoch of batches of 16 (at least 40 steps, so small subsets are
repeated; at most 1600 steps = 25600 examples) with early stopping. NTK on 32 probe
examples; Hessians / PAC-Bayes after every fine-tuning run (all models, both
tasks). Sized for 2 heavily shared CPU cores (measured: ~0.5 s per step of a
64-wide 2-layer model at batch 32 x 64 tokens under that load).

On a GPU the same binary scales by editing this file: wider / deeper zoo
models, longer pre-training, max_len 128+, more probe examples and Hessian
models (see the README).
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg == "tiny":
    return _tiny()
  if arg == "full":
    return _full()
  raise ValueError(f"configs/study.py: unknown preset {arg!r} (expected 'tiny' or 'full')")


def _study(*, preset: str, workdir: str, output_dir: str, corpus: dict, tokenizer_vocab: int,
           pretrain_max_len: int, zoo: list, pretrain: dict, task_max_len: int,
           max_body_chars: int, num_records: int, num_validation: int, num_test: int,
           subset_sizes: list, train: dict, num_probe: int, hessian: dict,
           selection: dict) -> ml_collections.ConfigDict:
  """One preset's config; the values both presets share are set here once."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.workdir = workdir
  c.output_dir = output_dir
  c.overwrite = False  # recompute directories holding results of another config
  c.corpus = ml_collections.ConfigDict(corpus)
  c.tokenizer_vocab = tokenizer_vocab
  c.pretrain_max_len = pretrain_max_len
  c.zoo = zoo
  c.pretrain = ml_collections.ConfigDict(pretrain)
  c.tasks = ["code2name", "translate"]
  c.task_max_len = ml_collections.ConfigDict(dict(code2name=task_max_len, translate=24))
  c.max_body_chars = max_body_chars
  c.num_records = num_records  # translate records; code2name uses all functions it finds
  c.num_validation = num_validation
  c.num_test = num_test
  c.split_seed = 0
  # Nested seeded fine-tuning subsets of each size D (the sweeps' `subsets` block).
  c.subsets = ml_collections.ConfigDict(dict(sizes=subset_sizes, seed=0))
  # Fine-tuning: steps = clip(ceil(epochs * D / batch), min_steps, max_steps) rounded up to
  # eval_every; early stopping on the validation split (patience evaluations).
  c.train = ml_collections.ConfigDict(dict(**train, seed=0))
  # NTK snapshots: kernel "exact" or "sketched" (ntk.make_sketched_ntk_fn, sketch_dim directions).
  c.ntk = ml_collections.ConfigDict(dict(num_probe=num_probe, kernel="exact", sketch_dim=4096,
                                         sketch_seed=0))
  # Hessian / PAC-Bayes quantities after the sweep's runs of hessian.models on hessian.tasks,
  # on num_examples training examples: the top eigenvalue (lanczos.iters steps) and the
  # per-layer table over pac_bayes.examples of them (pac_bayes.iters Lanczos steps per
  # v^T H^+ v; pac_bayes.blocks: these layer blocks only, empty: all).
  c.hessian = ml_collections.ConfigDict(hessian)
  c.selection = ml_collections.ConfigDict(dict(**selection, seed=0))
  # Budgeted early stopping (budgeted.BudgetOptions; D_max = D* / min(selection.ratios)).
  c.selection.budget = ml_collections.ConfigDict(dict(levels=(1.0, 2.0), method="LensLLM"))
  return c


def _pair(names: tuple[str, str], pretrain_steps: tuple[int, int], **shape) -> list[dict]:
  """Two zoo models of one shape: names[0] from init seed 0, names[1] from seed 1, each
  pre-trained for its pretrain_steps."""
  return [dict(name=names[0], **shape, pretrain_steps=pretrain_steps[0]),
          dict(name=names[1], **shape, pretrain_steps=pretrain_steps[1], init_seed=1)]


def _tiny() -> ml_collections.ConfigDict:
  # One shape per family; "-b" models are not pre-trained (0 steps). Pre-training
  # uses the fine-tuning TrainConfig and sequence length, so it shares the
  # compiled train step: compilation is most of the tiny run's time.
  zoo = (_pair(("gpt2-a", "gpt2-b"), (12, 0), arch="gpt2", d_model=24, n_layers=1, n_heads=2)
         + _pair(("llama-a", "llama-b"), (12, 0), arch="llama", d_model=24, n_layers=1,
                 n_heads=2))
  return _study(
      preset="tiny", workdir="runs/study_tiny", output_dir="runs/study_tiny/results",
      corpus=dict(max_files=120, pretrain_fraction=0.5, chunk_chars=200), tokenizer_vocab=300,
      pretrain_max_len=24, zoo=zoo,
      pretrain=dict(learning_rate=2e-3, warmup_steps=2, end_lr_fraction=1.0, batch_size=16,
                    eval_every=4, patience=2, eval_batch_size=48, seed=0),
      task_max_len=24, max_body_chars=100, num_records=1200, num_validation=32, num_test=48,
      subset_sizes=[25, 50, 100, 200, 400, 800],
      train=dict(learning_rate=2e-3, warmup_steps=2, batch_size=16, eval_every=4, patience=2,
                 eval_batch_size=48, epochs=1.0, min_steps=4, max_steps=12),
      num_probe=8,
      # The first model on the first task only.
      hessian=dict(models=["gpt2-a"], tasks=["code2name"], num_examples=16,
                   lanczos=dict(iters=6), pac_bayes=dict(examples=2, iters=4, blocks=["h_0"])),
      selection=dict(ratios=[2, 4], num_restarts=2, max_steps=100))


def _full() -> ml_collections.ConfigDict:
  # Four shapes (two per family, 31k-105k parameters), each pre-trained long and short.
  small, medium = dict(d_model=32, n_layers=1, n_heads=2), dict(d_model=48, n_layers=2, n_heads=4)
  zoo = (_pair(("gpt2-s-long", "gpt2-s-short"), (1000, 100), arch="gpt2", **small)
         + _pair(("gpt2-m-long", "gpt2-m-short"), (600, 150), arch="gpt2", **medium)
         + _pair(("llama-s-long", "llama-s-short"), (800, 120), arch="llama", **small)
         + _pair(("llama-m-long", "llama-m-short"), (500, 100), arch="llama", **medium))
  return _study(
      preset="full", workdir="runs/study_full", output_dir="results/study",
      corpus=dict(max_files=None, pretrain_fraction=0.3, chunk_chars=400), tokenizer_vocab=512,
      pretrain_max_len=48, zoo=zoo,
      pretrain=dict(learning_rate=3e-3, warmup_steps=20, batch_size=16, seed=0),
      task_max_len=48, max_body_chars=120, num_records=28000, num_validation=256, num_test=512,
      subset_sizes=[200 * 2 ** k for k in range(8)],
      train=dict(learning_rate=1e-3, warmup_steps=10, batch_size=16, eval_every=40, patience=2,
                 eval_batch_size=128, epochs=1.0, min_steps=40, max_steps=1600),
      num_probe=32,
      # After every fine-tuning run of every model and task.
      hessian=dict(models=[m["name"] for m in zoo], tasks=["code2name", "translate"],
                   num_examples=32, lanczos=dict(iters=12),
                   pac_bayes=dict(examples=8, iters=6, blocks=[])),
      selection=dict(ratios=[4, 8, 16, 32], num_restarts=8, max_steps=500))
