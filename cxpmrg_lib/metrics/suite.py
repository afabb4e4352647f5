"""Report-generation metrics: NLG (pycocoevalcap) + CE (three conventions) + bootstrap CIs.

The public entry point. The pieces live beside it: `nlg` (scorers, the METEOR
JVM), `ce` (CE conventions), `stats` (resampling and p-values); `evaluate` scores a predictions file.

Every metric is computed from per-study statistics (`study_stats`), so the point
estimate, the bootstrap CIs over studies and the paired test between two systems all
use one pass of the scorers, one METEOR JVM and one labelling of each report.

Key names (`METRIC_KEYS`, stable; documented so tables and JSON files can rely on them):

* ``bleu1`` .. ``bleu4``, ``meteor``, ``rouge_l``, ``cider``: pycocoevalcap 1.2 corpus
  scores (BLEU "closest" reference length, METEOR 1.5 ``-l en -norm``, ROUGE-L beta 1.2
  mean over studies, CIDEr n=4 sigma=6 with idf from the evaluated references).
* ``ce_precision``, ``ce_recall``, ``ce_f1``: the headline CE numbers of the chosen
  convention (default ``r2gen``: micro over the 14 labels, 1.0 = positive).
* ``ce_r2gen_{micro,macro}_{precision,recall,f1}``: R2Gen convention.
* ``ce_example_{precision,recall,f1}``: PromptMRG example-based convention.
* ``ce_unc_{micro,macro,top5_micro,top5_macro}_{precision,recall,f1}``: ViLMedic/RadEval
  convention (uncertain = positive), over all 14 labels and over TOP5_LABELS.

Besides the metric keys, results carry ``n_studies``, ``n_empty_predictions``,
``meteor_computed``, ``ce_convention`` and ``notes`` (e.g. "METEOR not computed").
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cxpmrg_lib.metrics import nlg
from cxpmrg_lib.metrics.ce import (CE_HEADLINE_KEYS, CE_KEYS, CONVENTIONS, ce_from_labels, ce_from_sums,
                                   ce_per_label, ce_scores, ce_stats, label_texts, label_values)
from cxpmrg_lib.metrics.nlg import MeteorUnavailable, close_meteor, get_meteor, normalize_text
from cxpmrg_lib.metrics.stats import (bootstrap_p_value, bootstrap_weights, percentile_ci,
                                      permutation_p_value, swap_masks)

log = logging.getLogger(__name__)

__all__ = ["METRIC_KEYS", "NLG_KEYS", "CE_KEYS", "CE_HEADLINE_KEYS", "CONVENTIONS", "StudyStats",
           "study_stats", "nlg_scores", "ce_scores", "ce_from_labels", "ce_per_label", "score_reports", "report_scores",
           "bootstrap_ci", "paired_test", "compare_stats", "MeteorUnavailable", "close_meteor",
           "normalize_text"]

NLG_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
METRIC_KEYS = (*NLG_KEYS, *CE_KEYS)
# Metrics are computed in groups that share their statistics.
_GROUPS = {"bleu": NLG_KEYS[:4], "meteor": ("meteor",), "rouge": ("rouge_l",), "cider": ("cider",),
           "ce": CE_KEYS}
_GROUP_OF = {k: g for g, keys in _GROUPS.items() for k in keys}
METEOR_SKIPPED = "METEOR not computed (meteor=False); meteor is NaN"
PAIRED_METHODS = ("bootstrap", "permutation")


@dataclass
class _Component:
    """One group of metrics: per-study statistics (n x k) and the map from their sums to values."""
    keys: tuple[str, ...]
    stats: np.ndarray
    finish: Callable[[np.ndarray, int], dict[str, np.ndarray]]


@dataclass
class StudyStats:
    """Per-study statistics of one system's predictions against the references.

    `values` holds the point estimates (pycocoevalcap's own numbers for NLG);
    `resample(weights)` recomputes every metric for each row of study multiplicities.
    """
    n: int
    values: dict[str, float]
    components: list[_Component]
    references: list[str]
    info: dict = field(default_factory=dict)
    ref_labels: pd.DataFrame | None = None
    pred_labels: pd.DataFrame | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in METRIC_KEYS if k in self.values)

    def values_from_sums(self, sums: list[np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        m = len(sums[0]) if sums else 0
        for comp, s in zip(self.components, sums):
            out.update(comp.finish(s, self.n))
        for k in self.values:  # skipped metrics (METEOR off) stay NaN
            out.setdefault(k, np.full(m, np.nan))
        return out

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Metric values for each row of `weights` (m x n study multiplicities summing to n)."""
        return self.values_from_sums([weights @ c.stats for c in self.components])

    def bootstrap(self, n_boot: int = 1000, seed: int = 0, progress: bool | None = None) -> dict[str, np.ndarray]:
        """n_boot resampled values of every metric (same resamples for all metrics)."""
        from cxpmrg_lib.util.progress import tqdm

        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.values}
        blocks = bootstrap_weights(self.n, n_boot, seed)
        for w in tqdm(blocks, desc="bootstrap", total=-(-n_boot // 128), leave=False,
                      disable=not _want_progress(progress, self.n * n_boot)):
            for k, v in self.resample(w).items():
                parts[k].append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def bootstrap_ci(self, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                     metrics: Iterable[str] | None = None, progress: bool | None = None) -> dict[str, tuple[float, float]]:
        """Percentile (1 - alpha) CIs over studies, key -> (lo, hi)."""
        keys = _check_metrics(metrics, self.keys)
        boots = self.bootstrap(n_boot, seed, progress)
        return {k: percentile_ci(boots[k], alpha) for k in keys}


def _want_progress(progress: bool | None, work: int) -> bool:
    return bool(progress) if progress is not None else work >= 20_000_000


def _check_metrics(metrics: Iterable[str] | str | None, available: Sequence[str] = METRIC_KEYS) -> tuple[str, ...]:
    if metrics is None:
        return tuple(available)
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_KEYS)}")
    missing = [m for m in metrics if m not in available]
    if missing:
        raise ValueError(f"metric(s) {missing} were not computed for these statistics")
    return metrics


def _prepare(references: Sequence, predictions: Sequence, lowercase: bool) -> tuple[list[str], list[str], int]:
    if isinstance(references, str) or isinstance(predictions, str):
        raise TypeError("references and predictions must be sequences of reports, not one string")
    references, predictions = list(references), list(predictions)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no studies to score (empty references and predictions)")
    refs = nlg.normalize_texts(references, lowercase)
    hyps = nlg.normalize_texts(predictions, lowercase)
    empty_refs = [i for i, r in enumerate(refs) if not r]
    if empty_refs:
        raise ValueError(f"{len(empty_refs)} reference report(s) are empty or missing (positions "
                         f"{empty_refs[:5]}); a study needs a reference to be scored")
    n_empty = sum(1 for h in hyps if not h)
    if n_empty:
        log.warning("%d of %d predictions are empty or missing; they are scored as empty reports",
                    n_empty, len(hyps))
    return refs, hyps, n_empty


def study_stats(references: Sequence, predictions: Sequence, *, meteor: bool = True, convention: str = "r2gen",
                metrics: Iterable[str] | None = None, labeler=None, ref_labels: pd.DataFrame | None = None,
                pred_labels: pd.DataFrame | None = None, lowercase: bool = True) -> StudyStats:
    """Score once and keep the per-study statistics (see the module docstring).

    references/predictions: sequences of report texts, one per study, in the same order.
    Missing predictions (None/NaN/"") are scored as empty reports and counted in
    ``info["n_empty_predictions"]``; non-string cells are scored as ``str(cell)``; an empty
    reference is an error. `metrics` restricts the work to the groups those keys need.
    CE labels come from `ref_labels`/`pred_labels` (frames in study order) when given,
    else from `labeler(texts)` (default cxpmrg_lib.labels.labeler.label_reports).
    meteor=False skips METEOR (value NaN, with a note); meteor=True raises
    MeteorUnavailable with install instructions when Java is missing.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CE convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    keys = _check_metrics(metrics)
    groups = [g for g in _GROUPS if any(_GROUP_OF[k] == g for k in keys)]
    refs, hyps, n_empty = _prepare(references, predictions, lowercase)
    n = len(refs)
    info = {"n_studies": n, "n_empty_predictions": n_empty, "meteor_computed": False,
            "ce_convention": convention, "notes": []}
    use_meteor = "meteor" in groups and meteor
    values: dict[str, float] = {}
    comps: list[_Component] = []
    pool = meteor_job = None
    if use_meteor:
        nlg.require_java()  # fail before any work when Java is missing
        # The JVM starts (~10 s) and scores in a thread, mostly waiting on its pipes,
        # while this thread runs the Python scorers and the labeller.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meteor")
        meteor_job = pool.submit(lambda: get_meteor().segment_stats(hyps, refs, progress=n >= 3000))
        pool.shutdown(wait=False)

    if "bleu" in groups:
        score, stats = nlg.bleu_stats(hyps, refs)
        values.update(zip(_GROUPS["bleu"], score))
        comps.append(_Component(_GROUPS["bleu"], stats,
                                lambda s, n: dict(zip(_GROUPS["bleu"], nlg.bleu_from_sums(s).T))))
    for group, key, fn in (("rouge", "rouge_l", nlg.rouge_scores), ("cider", "cider", nlg.cider_scores)):
        if group in groups:
            per_study = fn(hyps, refs)
            values[key] = float(np.mean(per_study))
            comps.append(_Component((key,), per_study[:, None],
                                    lambda s, n, key=key: {key: s[:, 0] / n}))
    if "ce" in groups:
        if ref_labels is None:
            ref_labels = label_texts(references, labeler, "references")
        if pred_labels is None:
            pred_labels = label_texts(predictions, labeler, "predictions")
        for name, frame in (("ref_labels", ref_labels), ("pred_labels", pred_labels)):
            if len(frame) != n:
                raise ValueError(f"{name} has {len(frame)} rows for {n} studies")
        stats = ce_stats(label_values(ref_labels, "ref_labels"), label_values(pred_labels, "pred_labels"))
        values.update({k: float(v[0]) for k, v in ce_from_sums(stats.sum(0), n, convention).items()})
        comps.append(_Component(CE_KEYS, stats, lambda s, n: ce_from_sums(s, n, convention)))
    if "meteor" in groups:
        if use_meteor:
            stats = meteor_job.result()
            _, values["meteor"] = get_meteor().eval_stats(stats)
            comps.append(_Component(("meteor",), stats,
                                    lambda s, n: {"meteor": nlg.meteor_from_stats(get_meteor(), s)}))
            info["meteor_computed"] = True
        else:
            values["meteor"] = float("nan")
            info["notes"].append(METEOR_SKIPPED)
    values = {k: values[k] for k in METRIC_KEYS if k in values}
    return StudyStats(n=n, values=values, components=comps, references=refs, info=info,
                      ref_labels=ref_labels, pred_labels=pred_labels)


def _result(st: StudyStats, keys: Sequence[str]) -> dict:
    out = {k: st.values[k] for k in keys}
    out.update({k: (list(v) if isinstance(v, list) else v) for k, v in st.info.items()})
    return out


def nlg_scores(references: Sequence, predictions: Sequence, meteor: bool = True, lowercase: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap 1.2) plus n_studies,
    n_empty_predictions, meteor_computed and notes. meteor=False gives meteor=NaN."""
    st = study_stats(references, predictions, meteor=meteor, metrics=NLG_KEYS, lowercase=lowercase)
    out = _result(st, NLG_KEYS)
    out.pop("ce_convention")
    return out


def score_reports(references: Sequence, predictions: Sequence, meteor: bool = True, convention: str = "r2gen",
                  labeler=None, ref_labels: pd.DataFrame | None = None, pred_labels: pd.DataFrame | None = None,
                  lowercase: bool = True) -> dict:
    """Every metric in METRIC_KEYS (NLG + CE) in one dict, plus the counts and notes.

    ce_precision/ce_recall/ce_f1 are the headline numbers of `convention`; every
    convention's detailed keys are always present.
    """
    st = study_stats(references, predictions, meteor=meteor, convention=convention, labeler=labeler,
                     ref_labels=ref_labels, pred_labels=pred_labels, lowercase=lowercase)
    return _result(st, METRIC_KEYS)


def report_scores(references: Sequence, predictions: Sequence) -> dict:
    """BLEU-4, CE-F1 (no METEOR) and the share of distinct reports: what validation and the sweep record."""
    s = score_reports(list(references), list(predictions), meteor=False)
    return {"bleu4": s["bleu4"], "ce_f1": s["ce_f1"], "distinct": len(set(predictions)) / max(1, len(predictions))}


def bootstrap_ci(references: Sequence, predictions: Sequence, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, metrics: Iterable[str] | None = None, meteor: bool = True,
                 convention: str = "r2gen", labeler=None, ref_labels: pd.DataFrame | None = None,
                 pred_labels: pd.DataFrame | None = None) -> dict[str, tuple[float, float]]:
    """(1 - alpha) percentile bootstrap CIs over studies: key -> (lo, hi).

    Corpus metrics (BLEU, METEOR, micro CE) are recomputed on each resample from summed
    per-study statistics, not averaged per study. CIDEr keeps the idf of the full set.
    With meteor=False the meteor interval is (NaN, NaN).
    """
    keys = _check_metrics(metrics)
    st = study_stats(references, predictions, meteor=meteor, convention=convention, metrics=keys,
                     labeler=labeler, ref_labels=ref_labels, pred_labels=pred_labels)
    return st.bootstrap_ci(n_boot, seed, alpha, keys)


def compare_stats(a: StudyStats, b: StudyStats, metrics: Iterable[str] | str | None = None,
                  n_resamples: int = 1000, method: str = "bootstrap", seed: int = 0, alpha: float = 0.05,
                  alternative: str = "two-sided", progress: bool | None = None) -> dict[str, dict]:
    """Paired test of A against B for each metric on the same studies: key -> result dict.

    method="bootstrap": studies are resampled together for both systems; the p-value
    compares the resampled deltas, centred on the observed one, with the observed delta;
    ``ci_delta`` is the percentile CI of A - B. method="permutation" (approximate
    randomisation): each study's two predictions are swapped with probability 1/2.
    alternative="greater" tests "A beats B"; "two-sided" (default) "A differs from B".
    ``a_better`` is True when delta > 0 and p_value < alpha.
    """
    from cxpmrg_lib.util.progress import tqdm

    if method not in PAIRED_METHODS:
        raise ValueError(f"method must be one of {PAIRED_METHODS}, got {method!r}")
    if a.n != b.n or a.references != b.references:
        raise ValueError("a paired test needs both systems scored on the same references in the same order")
    keys = _check_metrics(metrics, [k for k in a.keys if k in b.keys])
    if [c.keys for c in a.components] != [c.keys for c in b.components]:
        raise ValueError("A and B were scored with different metric groups")
    blocks = (bootstrap_weights(a.n, n_resamples, seed) if method == "bootstrap"
              else swap_masks(a.n, n_resamples, seed))
    tot_a = [c.stats.sum(0) for c in a.components]
    tot_b = [c.stats.sum(0) for c in b.components]
    diffs = [cb.stats - ca.stats for ca, cb in zip(a.components, b.components)]
    deltas: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for w in tqdm(blocks, desc=f"paired {method}", total=-(-n_resamples // 128), leave=False,
                  disable=not _want_progress(progress, a.n * n_resamples * 2)):
        if method == "bootstrap":
            va, vb = a.resample(w), b.resample(w)
        else:  # A's side gets B's statistics where w == 1, and vice versa
            moved = [w @ d for d in diffs]
            va = a.values_from_sums([t + m for t, m in zip(tot_a, moved)])
            vb = b.values_from_sums([t - m for t, m in zip(tot_b, moved)])
        for k in keys:
            deltas[k].append(va[k] - vb[k])
    out = {}
    for k in keys:
        d = np.concatenate(deltas[k])
        delta = a.values[k] - b.values[k]
        if np.isnan(delta):
            p = float("nan")
        elif method == "bootstrap":
            p = bootstrap_p_value(d, delta, alternative)
        else:
            p = permutation_p_value(d, delta, alternative)
        out[k] = {"metric": k, "method": method, "alternative": alternative, "n_resamples": n_resamples,
                  "value_a": a.values[k], "value_b": b.values[k], "delta": delta, "p_value": p,
                  "ci_delta": percentile_ci(d, alpha) if method == "bootstrap" else None,
                  "a_better": bool(delta > 0 and p < alpha)}
    return out


def paired_test(references: Sequence, pred_a: Sequence, pred_b: Sequence, metric: str = "bleu4",
                n_resamples: int = 1000, method: str = "bootstrap", seed: int = 0, alpha: float = 0.05,
                alternative: str = "two-sided", meteor: bool = True, convention: str = "r2gen",
                labeler=None) -> dict:
    """Does system A beat system B on `metric`? dict(delta = A - B, p_value, value_a, value_b,
    ci_delta, a_better, ...); see `compare_stats` for the two methods. The references are
    labelled once for CE metrics."""
    (key,) = _check_metrics([metric])
    if key == "meteor" and not meteor:
        raise ValueError("paired_test on meteor needs meteor=True")
    a = study_stats(references, pred_a, meteor=meteor, convention=convention, metrics=[key], labeler=labeler)
    b = study_stats(references, pred_b, meteor=meteor, convention=convention, metrics=[key], labeler=labeler,
                    ref_labels=a.ref_labels)
    return compare_stats(a, b, key, n_resamples, method, seed, alpha, alternative)[key]
