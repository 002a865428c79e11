"""Published selection results of Lin et al. (ICML 2024), Tables 1 and 2.

Source: H. Lin, B. Huang, H. Ye, Q. Chen, Z. Wang, S. Li, J. Ma, X. Wan,
J. Zou, Y. Liang. "Selecting Large Language Model to Fine-tune via Rectified
Scaling Law". ICML 2024 (arXiv 2402.02314), Table 1 (AtS vs ZeroShot,
SubTuning, ModelSize; PearCorr and RelAcc) and Table 2 (AtS vs their law
"OurFit" -- called RectifiedFit here -- and VanillaFit; PearCorr only).
The values are typed from the paper's tables (x100, one decimal), one entry
per data-budget ratio D*/D_max in `RATIOS`, with D* = 1,638,400.

These are reference data for comparisons and tests; nothing in the library
computes results from them.
"""

from __future__ import annotations

RATIOS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
TARGET_DATA_NUM: int = 1_638_400
CITATION = (
    "Lin et al., Selecting Large Language Model to Fine-tune via Rectified Scaling Law, "
    "ICML 2024, Tables 1-2")


def _const(v: float) -> tuple[float, ...]:
  return (v,) * 7


# (dataset, metric, method) -> values x100 for RATIOS.
_TABLE: dict[tuple[str, str, str], tuple[float, ...]] = {
    # ---- FLAN ----
    ("flan", "PearCorr", "AtS"): (90.9, 73.1, 65.5, 61.1, 52.2, 50.5, 45.6),
    ("flan", "PearCorr", "ZeroShot"): _const(-10.7),
    ("flan", "PearCorr", "SubTuning"): (60.9, 46.5, 36.4, 29.0, 24.6, 20.9, 16.4),
    ("flan", "PearCorr", "ModelSize"): _const(-20.9),
    ("flan", "PearCorr", "RectifiedFit"): (77.9, 67.4, 54.4, 47.6, 54.9, 41.1, 36.8),
    ("flan", "PearCorr", "VanillaFit"): (34.7, 58.1, 43.1, 46.7, 41.4, 45.0, 20.7),
    ("flan", "RelAcc", "AtS"): (93.6, 93.2, 93.2, 93.2, 85.3, 93.2, 93.2),
    ("flan", "RelAcc", "ZeroShot"): _const(85.3),
    ("flan", "RelAcc", "SubTuning"): (93.2, 93.2, 93.2, 93.2, 59.6, 59.6, 59.6),
    ("flan", "RelAcc", "ModelSize"): _const(59.6),
    # ---- Gigaword ----
    ("gigaword", "PearCorr", "AtS"): (98.9, 97.6, 96.9, 92.0, 91.1, 89.1, 91.0),
    ("gigaword", "PearCorr", "ZeroShot"): _const(-49.2),
    ("gigaword", "PearCorr", "SubTuning"): (93.2, 89.3, 85.4, 80.9, 76.2, 69.9, 64.8),
    ("gigaword", "PearCorr", "ModelSize"): _const(-24.4),
    ("gigaword", "PearCorr", "RectifiedFit"): (97.0, 90.7, 88.3, 83.6, 83.6, 81.5, 78.5),
    ("gigaword", "PearCorr", "VanillaFit"): (95.1, 92.8, 91.0, 84.3, 47.3, 85.8, 79.3),
    ("gigaword", "RelAcc", "AtS"): (100.0, 91.4, 94.3, 100.0, 94.3, 94.3, 91.4),
    ("gigaword", "RelAcc", "ZeroShot"): _const(71.3),
    ("gigaword", "RelAcc", "SubTuning"): (87.6, 87.6, 87.6, 71.3, 71.3, 71.3, 71.3),
    ("gigaword", "RelAcc", "ModelSize"): _const(71.3),
    # ---- WMT19 (third file of the same release; not packaged) ----
    ("wmt19", "PearCorr", "AtS"): (98.9, 97.0, 97.7, 86.0, 78.0, 73.4, 61.5),
    ("wmt19", "PearCorr", "ZeroShot"): _const(7.1),
    ("wmt19", "PearCorr", "SubTuning"): (93.5, 87.1, 77.7, 64.5, 51.7, 41.6, 34.5),
    ("wmt19", "PearCorr", "ModelSize"): _const(36.0),
    ("wmt19", "PearCorr", "RectifiedFit"): (95.0, 93.6, 91.1, 83.9, 78.9, 72.9, 61.5),
    ("wmt19", "PearCorr", "VanillaFit"): (94.4, 83.7, 79.6, 30.9, 35.2, 41.1, 56.5),
    ("wmt19", "RelAcc", "AtS"): (99.1, 99.1, 99.6, 99.1, 99.1, 99.1, 99.1),
    ("wmt19", "RelAcc", "ZeroShot"): _const(84.4),
    ("wmt19", "RelAcc", "SubTuning"): _const(99.1),
    ("wmt19", "RelAcc", "ModelSize"): _const(22.5),
}


def published_value(dataset: str, method: str, metric: str, ratio: int) -> float | None:
  """Returns the published value as a FRACTION (paper value / 100), or None.

  Args:
    dataset: curve-set name; matched case-insensitively against "flan",
      "gigaword", "wmt19" (a file stem such as "flan" works).
    method: ZeroShot, SubTuning, ModelSize, AtS, RectifiedFit (alias OurFit)
      or VanillaFit.
    metric: "PearCorr" or "RelAcc".
    ratio: D*/D_max, one of `RATIOS`.
  """
  if method == "OurFit":
    method = "RectifiedFit"
  values = _TABLE.get((dataset.lower(), metric, method))
  if values is None or ratio not in RATIOS:
    return None
  return values[RATIOS.index(ratio)] / 100.0


def published_table() -> dict[tuple[str, str, str], tuple[float, ...]]:
  """A copy of the whole table: (dataset, metric, method) -> values x100 for RATIOS."""
  return dict(_TABLE)
