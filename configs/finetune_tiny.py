r"""Tiny fine-tuning sweep: two tiny models on a synthetic translation task (offline).

Command:

  python -m experiments.finetune_sweep --config=configs/finetune_tiny.py \
      --workdir=results/finetune_tiny

Output (in --workdir): curves.csv (public benchmark format: `config name`,
`0`, `200`, `400`, `800`, `1600`, `size`, `family`; one row per model),
runs.jsonl (one JSON line per (model, D) run: zero-shot and fine-tuned test
loss, steps to early stop, tokens, FLOPs, NTK snapshot summary), ntk/*.npz,
config.json, tokenizer.json, data/*.jsonl, pretrained/.

There is no pre-trained model to download on an offline machine, so each
model is first pre-trained from a seeded random initialisation for
`pretrain_steps` steps on an unpaired monolingual corpus of both languages
(it learns the words, not the mapping), then fine-tuned on nested subsets of
the paired task. Expected (measured on the 2-core CPU machine): zero-shot
test loss ~2.5-2.6 nats per target token, falling monotonically with D to
~1.6 (tiny-gpt2) and ~1.35 (tiny-llama) at D=1600; 2.6 min of CPU time
(11 min wall while other jobs loaded the two cores ~8x), most of it XLA
compilation and the two 200-step pre-trainings. `get_config("smoke")` shrinks it to
seconds (used by tests/experiments/test_finetune_sweep.py).

For a Hugging Face checkpoint and a hub dataset (GPU + internet) see
configs/finetune_hf.py.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the sweep configuration; arg "smoke" gives a seconds-long run."""
  c = ml_collections.ConfigDict()
  c.name = "synthetic_translation"
  # Task: "synthetic" writes seeded jsonl files into workdir/data and reads them back
  # (checked like any local file, parsed with json: `sweep.load_splits`); otherwise a name from
  # lensllm_jax.training.textdata.TASKS or "local" (then data_files etc. are used).
  c.task = "synthetic"
  c.data_files = ml_collections.ConfigDict({"train": ""})
  c.input_field = "src"
  c.target_field = "tgt"
  c.prompt = "{input} =>"
  c.target_prefix = " "
  c.validation_split = ""  # "" = carve from train
  c.test_split = ""
  c.hub_config = ""  # dataset configuration for hub tasks (e.g. "de-en")
  c.num_synthetic = 4000  # synthetic pool size (train + validation + test)
  c.max_train_rows = 0  # read only this many train rows of a huge dataset (0: all)
  c.num_validation = 200
  c.num_test = 400
  c.max_len = 40
  c.split_seed = 0
  # The fine-tuning subsets: nested seeded draws of each size D of `sizes` from the train
  # pool (textdata.nested_subset; D = 0, the zero-shot point, is always run). sizes is a
  # tuple: overridable on the command line (--config.subsets.sizes="(200,400)").
  c.subsets = ml_collections.ConfigDict(dict(sizes=(200, 400, 800, 1600), seed=0))
  # Tokenizer for preset models: byte-level BPE trained on the corpora.
  c.tokenizer_vocab = 320
  c.pretrain_corpus_size = 4000
  c.models = [
      ml_collections.ConfigDict(dict(name="tiny-gpt2", family="GPT-2", preset="tiny-gpt2",
                                     hf_dir="", init_seed=0, pretrain_steps=200)),
      ml_collections.ConfigDict(dict(name="tiny-llama", family="Llama", preset="tiny-llama",
                                     hf_dir="", init_seed=0, pretrain_steps=200)),
  ]
  c.pretrain = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=20, batch_size=32, seed=0))
  c.train = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.1, weight_decay=0.0,
      grad_clip=1.0, batch_size=16, grad_accum=1, max_steps=150, eval_every=25,
      patience=2, min_delta=0.0, eval_batch_size=64, seed=0))
  # Per-D step budget clip(ceil(epochs D / batch), min_steps, train.max_steps);
  # epochs = 0: every run may use train.max_steps (early stopping decides).
  c.step_budget = ml_collections.ConfigDict(dict(epochs=0.0, min_steps=0))
  # Orbax checkpoints to resume a long run mid-way: at the first evaluation after each
  # every_seconds (0: every evaluation); a shorter run writes none and is redone if killed.
  c.checkpoint = ml_collections.ConfigDict(dict(enabled=True, every_seconds=60.0))
  c.save_finetuned = False  # keep each run's fine-tuned parameters in workdir/finetuned/
  # NTK snapshots on the first `num_probe` test examples (0 disables); kernel "exact"
  # (block pairs of block_size examples sharded over all devices; 0: one block) or
  # "sketched" (ntk.make_sketched_ntk_fn: count sketch of sketch_dim directions).
  c.ntk = ml_collections.ConfigDict(dict(num_probe=8, output="log_likelihood", kernel="exact",
                                         block_size=4, sketch_dim=1024, sketch_seed=0))
  c.data_parallel = True  # data-parallel over all devices (a 1-device mesh on CPU)
  # A rerun into an output directory whose manifest (config, input sha256s, version) differs
  # is refused; True deletes the directory's results and recomputes them (lensllm_jax/rundir.py).
  c.overwrite = False
  if arg == "smoke":
    c.num_synthetic = 700
    c.num_validation = 48
    c.num_test = 64
    c.max_len = 24
    c.subsets.sizes = (200, 400)
    c.pretrain_corpus_size = 600
    c.tokenizer_vocab = 280
    c.models[0].pretrain_steps = 20
    c.models[0].overrides = ml_collections.ConfigDict(
        dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64))
    c.models = c.models[:1]
    c.train.max_steps = 12
    c.train.eval_every = 6
    c.ntk.num_probe = 4
    c.ntk.block_size = 2
  return c
