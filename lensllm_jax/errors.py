"""The project's bad-input errors: one small hierarchy, one per kind of input.

Every check of user input in the library and the binaries raises one of
these, with a message that names the place: the file and line (and column or
field), the config field, or the checkpoint tensor. The binaries
(`experiments.common.run_main`) turn exactly these into one line
`NAME: error: ...` and exit code 2; any other exception is a bug and keeps
its traceback.

  InputError          base class (a ValueError)
    CurveFileError    a fine-tuning curve file (benchmarks.CurveFormatError)
    ConfigError       a config field or flag value (range, type, empty list)
    CheckpointError   a model checkpoint, its config.json or tokenizer.json
    DataError         a task's data files (jsonl / csv lines, fields, sizes)
    WorkdirError      an output directory / workdir: not writable, in use by
                      another process, or holding results of other inputs
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "CurveFileError", "DataError", "InputError",
           "WorkdirError"]


class InputError(ValueError):
  """Bad input to the project; the message names the file / line, field or tensor."""


class CurveFileError(InputError):
  """A curve file is missing or malformed; names file, line (model) and column."""


class ConfigError(InputError):
  """A config field or flag has a value the experiment cannot run with; names the field."""


class CheckpointError(InputError):
  """A checkpoint (config.json, weights, tokenizer) is missing, corrupt or unsupported."""


class DataError(InputError):
  """A task's data file is missing or malformed; names file and line or field."""


class WorkdirError(InputError):
  """An output directory cannot be used (not a directory, not writable, locked, other inputs)."""
