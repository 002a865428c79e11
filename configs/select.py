r"""Which model to fine-tune on your task: `python -m experiments.select` (docs/select.md).

Predict from curves you have (seconds; empty cells = not measured):

  python -m experiments.select --config=configs/select.py \
      --config.curves=PATH --config.target_data_num=N --output_dir=DIR \
      [--config.predictor=LensLLM+|AtS|LensLLM|CurvePFN|...]

Online: fine-tune every active model at D_k = d0 * 2^k, refit, stop the
models confidently worse at D*, until one is left or a cap is reached
(`configs/finetune_tiny.py`-style task and models; minutes on CPU for the
tiny default, the fine-tuning runs dominate):

  python -m experiments.select --config=configs/select.py:online --workdir=DIR \
      [--config.target_data_num=N] [--config.models[0].hf_dir=ckpts/gpt2 ...]

Your own task, offline: `configs/select.py:online:ckpts/a,ckpts/b,ckpts/c`
(Hugging Face checkpoint directories, each with config.json,
model.safetensors, tokenizer.json; model name = directory name) with
`--config.data_files.train=my.jsonl --config.input_field=...
--config.target_field=... --config.target_data_num=N` (the fine-tuning
settings of configs/finetune_hf.py; docs/select.md walks through it).
(`:online_smoke`: three tiny models, one architecture pre-trained from two
seeds and not, seconds per run; the tests' configuration.)

Replay (evaluation): a complete curve file is the oracle, no training
(seconds per level):

  python -m experiments.select --config=configs/select.py:replay \
      --config.replay=flan --output_dir=DIR

Writes selection.md / .csv / .json / .png (first line: `fine-tune MODEL:
predicted test loss X [lo, hi] at D = N`), and for online / replay also
decisions.jsonl (one row per round) and curves.csv (empty cells for sizes not
run); replay adds tradeoff.md / .csv over config.report_levels.

Defaults stated before any replay was looked at, not tuned on flan / gigaword:
z = 1.2816 (a model is stopped once its 80 % interval, the one reported, lies
above the best model's), the size cap D*/8 (the papers' largest budget,
ratio 8), the compute cap a quarter of fine-tuning every model on D* (about
what a ratio-8 budget costs), min_points 4 (the budgeted procedure's default
in `plus.candidates.budgeted_candidate_selection`).
"""

import ml_collections
from ml_collections import config_dict

from configs import finetune_hf, finetune_tiny


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" (predict), "online" (fine-tune and select; "online:DIR,DIR,...": Hugging Face
  checkpoint directories on a local task, configs/finetune_hf.py's settings),
  "online_smoke" (tests), "replay" (evaluate on a file)."""
  arg, _, dirs = (arg or "").partition(":")
  if arg not in ("", "online", "online_smoke", "replay") or (dirs and arg != "online"):
    raise ValueError(f"configs/select.py: unknown argument {arg!r} (expected '', 'online', "
                     "'online:DIR,DIR,...', 'online_smoke', 'replay')")
  online = arg.startswith("online")
  if dirs:
    c = finetune_hf.get_config(f"local:{dirs}")
  elif online:
    c = finetune_tiny.get_config("smoke" if arg == "online_smoke" else None)
  else:
    c = ml_collections.ConfigDict()
  c.mode = "online" if online else arg or "predict"
  c.curves = ""  # predict: a curve file (path or packaged name)
  c.target_data_num = 0  # D*: your full fine-tuning set size (never run)
  c.predictor = "LensLLM+"  # or any name of lensllm_jax.plus.forecast.predictor_names()
  c.data_dir = config_dict.placeholder(str)
  c.seed = 0
  c.overwrite = False  # recompute a directory holding results of another config
  c.replay = ""  # replay: a complete curve file used as the oracle
  # The schedule D_k = d0 * 2^k (k = 0, 1, ...) up to max_data_num (0: D* / 8).
  c.d0 = 200
  c.max_data_num = 0
  c.z = 1.2815515655446004  # stopping confidence (one-sided normal quantile)
  c.max_compute_fraction = 0.25  # compute cap, a fraction of fine-tuning every model on D*
  c.min_points = 4  # rounds before the first stopping decision
  c.report_levels = (0.5, 1.0, 2.0, 4.0)  # replay: the trade-off table's levels
  if online:
    c.target_data_num = 25600 if not dirs else 0  # your data size: set it
    c.max_data_num = 1600 if not dirs else 0
    c.ntk.num_probe = 0  # no kernel snapshots: selection does not read them
    c.subsets.sizes = ()  # the schedule's D_k, set by experiments.select (subsets.seed is read)
    c.save_finetuned = False
  if arg == "online_smoke":
    # Seconds per run (tests): one tiny architecture, pre-trained from two seeds and not.
    pre = c.models[0]
    pre.name, pre.pretrain_steps = "tiny-pretrained", 60
    other = ml_collections.ConfigDict(pre.to_dict())
    other.name, other.init_seed = "tiny-pretrained-b", 2
    scratch = ml_collections.ConfigDict(pre.to_dict())
    scratch.name, scratch.pretrain_steps, scratch.init_seed = "tiny-untrained", 0, 1
    c.models = [pre, other, scratch]
    c.d0, c.max_data_num, c.min_points, c.z = 25, 200, 2, 0.5
    c.target_data_num = 3200
    c.max_compute_fraction = 0.0  # no compute cap: 12-step runs cost as much at every D
  return c
