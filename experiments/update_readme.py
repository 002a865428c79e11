"""Splices generated result files into README.md.

Every region of the form

    <!-- generated: results/selection/selection.md -->
    ...
    <!-- end generated -->

is replaced by the current contents of the named file, so the README's
tables are always what a binary wrote, never typed by hand.

    python -m experiments.update_readme            # rewrite README.md in place
    python -m experiments.update_readme --check    # exit 2 if README is stale
"""

from __future__ import annotations

import pathlib
import re

from absl import flags, logging

from experiments import common

_README = flags.DEFINE_string("readme", "README.md", "README to update.")
_CHECK = flags.DEFINE_bool("check", False, "Only report whether the README is up to date.")

_REGION = re.compile(r"(<!-- generated: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                     re.DOTALL)


def splice(text: str, root: pathlib.Path) -> str:
  """Returns `text` with every generated region refreshed from disk."""

  def replace(match: re.Match) -> str:
    path = root / match.group("path")
    if not path.exists():
      raise FileNotFoundError(f"README region names {path}, which does not exist; "
                              "run the binary that writes it first")
    body = path.read_text().rstrip("\n") + "\n"
    return match.group(1) + body + match.group(4)

  return _REGION.sub(replace, text)


def main(argv):
  del argv
  readme = pathlib.Path(_README.value)
  old = readme.read_text()
  new = splice(old, readme.resolve().parent)
  if _CHECK.value:
    if new != old:
      common.fail(f"{readme} is stale; run python -m experiments.update_readme")
    logging.info("%s is up to date", readme)
    return
  readme.write_text(new)
  logging.info("%s: %d generated regions refreshed", readme, len(_REGION.findall(old)))


if __name__ == "__main__":
  common.run_main(main)
