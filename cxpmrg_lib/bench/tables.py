"""The benchmark's results as the book shows them: the ranked table and the cost table, each with the paper's
Table 1 row beside the row of the same system, per-label F1, pairwise p-values, the backbone step, report
diversity, a plain summary, and the encoders' feature spread."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxpmrg_lib.bench.config import BenchConfig, bench_dir
from cxpmrg_lib.bench.run import _data_for, read_results
from cxpmrg_lib.bench.runners import _zoo_model
from cxpmrg_lib.bench.systems import SYSTEMS

log = logging.getLogger(__name__)

PAPER_RESULTS = Path(__file__).resolve().parents[2] / "data_manifests" / "paper_results"
TABLE1 = "table1_mrg_algorithms_chexpert_plus"
PAPER_LABEL = "paper, CheXpert Plus"
_METRIC_OF = {"CE-F1": "ce_f1", "BLEU-4": "bleu4"}      # bench.seeds.seed_cells' column labels -> metric keys


def paper_table1(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's Table 1 (its numbers on CheXpert Plus), indexed by algorithm; empty when the file is not
    there (an installed package without the repository's data_manifests/)."""
    path = Path(path) if path is not None else PAPER_RESULTS / f"{TABLE1}.csv"
    if not path.exists():
        log.warning("the paper's Table 1 is not at %s; its rows are left out", path)
        return pd.DataFrame()
    return pd.read_csv(path).set_index("algorithm")


def _paper_row(results_row, table1: pd.DataFrame) -> str | None:
    system = SYSTEMS.get(results_row["system"])
    return system.table1 if system is not None and system.table1 in table1.index else None


def beside_paper(shown: pd.DataFrame, results: pd.DataFrame, table1: pd.DataFrame | None = None) -> pd.DataFrame:
    """`shown` (a table indexed by our rows' names, e.g. ranked_table's) with, under each row whose system
    is in the paper's Table 1, the paper's row for it: labelled "<algorithm> (paper, CheXpert Plus)", its
    values in italics, no interval and no rank (the paper's numbers are real data, not comparable)."""
    table1 = paper_table1() if table1 is None else table1
    if table1.empty:
        return shown
    rows, index = [], []
    for name in shown.index:
        rows.append(shown.loc[name])
        index.append(name)
        match = results[results["name"] == name]
        algorithm = _paper_row(match.iloc[0], table1) if len(match) else None
        if algorithm is not None:
            paper = table1.loc[algorithm]
            keys = {k: _METRIC_OF.get(k, k) for k in shown.columns}     # the seed table's columns are labels
            rows.append(pd.Series({k: f"<i>{float(paper[m]):.3f}</i>" if m in paper.index else ""
                                   for k, m in keys.items()}))
            index.append(f"{algorithm} ({PAPER_LABEL})")
    return pd.DataFrame(rows, index=index, columns=shown.columns)


COST_COLUMNS = ("family", "wall_min", "train_min", "pretrain_min", "trainable_m", "total_m", "reports_per_s",
                "peak_mib", "threads", "p_bleu4", "p_ce_f1", "note")


def cost_table(results: pd.DataFrame, table1: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each row's cost (minutes, parameters in millions, generation speed and memory, the paired p-values
    against the reference), with the paper's training minutes and parameters (Table 1, CheXpert Plus, its
    GPUs) beside the row of the same system."""
    table1 = paper_table1() if table1 is None else table1
    out = results.set_index("name")[[c for c in COST_COLUMNS if c in results.columns]].copy()
    minutes, params = [], []
    for _, row in results.iterrows():
        algorithm = _paper_row(row, table1) if not table1.empty else None
        minutes.append(float(table1.loc[algorithm, "train_time_min"]) if algorithm else math.nan)
        params.append(float(table1.loc[algorithm, "params_m"]) if algorithm else math.nan)
    at = list(out.columns).index("total_m") + 1 if "total_m" in out.columns else len(out.columns)
    out.insert(at, f"train_min ({PAPER_LABEL})", minutes)
    out.insert(at + 1, f"params_m ({PAPER_LABEL})", params)
    return out


def ranked_table(results: pd.DataFrame, keys=("bleu4", "rouge_l", "meteor", "cider", "ce_precision", "ce_recall",
                                             "ce_f1"), ci: bool = True) -> pd.DataFrame:
    """value [lo, hi] per system and metric, best in bold and second-best underlined (as the paper marks
    them) with HTML tags: show it with `to_html(escape=False)`."""
    table = results.set_index("name")
    out = pd.DataFrame(index=table.index)
    for k in keys:
        values = table[k].astype(float)
        order = values.rank(ascending=False, method="min")
        cells = []
        for name, v in values.items():
            text = f"{v:.3f}"
            if ci and f"{k}_lo" in table and not math.isnan(float(table.loc[name, f"{k}_lo"])):
                text += f" [{table.loc[name, f'{k}_lo']:.3f}, {table.loc[name, f'{k}_hi']:.3f}]"
            if order[name] == 1:
                text = f"<b>{text}</b>"
            elif order[name] == 2:
                text = f"<u>{text}</u>"
            cells.append(text)
        out[k] = cells
    return out


# ----------------------------------------------------------------------------- analysis for the book

def per_label_f1(out_dir: str | Path, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Systems x 14 observations: the CE F1 of each label (from predictions/<system>.metrics.json)."""
    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    rows = {}
    for slug, name in zip(results["system"], results["name"]):
        path = out_dir / "predictions" / f"{slug}.metrics.json"
        if path.exists():
            per = json.loads(path.read_text()).get("per_label") or []
            rows[name] = {r["label"]: r["f1"] for r in per}
    return pd.DataFrame.from_dict(rows, orient="index")


def pairwise_pvalues(out_dir: str | Path, metric: str = "ce_f1", n_boot: int = 1000, seed: int = 0,
                     results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Two-sided paired bootstrap p-values of `metric` between every pair of systems (same test studies)."""
    from cxpmrg_lib.metrics.evaluate import read_predictions
    from cxpmrg_lib.metrics import compare_stats, study_stats

    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    stats, ref_labels, names = {}, None, []
    for slug, name in zip(results["system"], results["name"]):
        frame = read_predictions(out_dir / "predictions" / f"{slug}.csv")
        st = study_stats(frame["reference"].tolist(), frame["prediction"].tolist(), meteor=False, metrics=[metric],
                         ref_labels=ref_labels)
        ref_labels = st.ref_labels if ref_labels is None else ref_labels
        stats[name] = st
        names.append(name)
    table = pd.DataFrame(np.nan, index=names, columns=names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = compare_stats(stats[a], stats[b], [metric], n_boot, "bootstrap", seed)[metric]["p_value"]
            table.loc[a, b] = table.loc[b, a] = p
    return table


def backbone_steps_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per row whose image network took the backbone step (from its run folder): the objective, steps,
    seconds and the loss at the first and the last step. For the label objective also the loss of
    predicting each label's training rate whatever the image (the prior): a last loss near it means the
    network learned little of the findings in its steps."""
    rows = {}
    for name, run_dir in zip(results["name"], results["run_dir"]):
        if not isinstance(run_dir, str) or not run_dir:
            continue
        for file in ("backbone_pretraining.json", "encoder_pretraining.json"):
            path = Path(run_dir) / file
            if path.exists():
                r = json.loads(path.read_text())
                rates = np.clip(np.asarray(r.get("positive_rate") or [np.nan], dtype=float), 1e-6, 1 - 1e-6)
                prior = float(np.mean(-(rates * np.log(rates) + (1 - rates) * np.log(1 - rates))))
                rows[name] = {"objective": r["objective"], "steps": r["steps"], "seconds": r["seconds"],
                              "first loss": r["first_loss"], "last loss": r["last_loss"],
                              "prior loss": prior if r["objective"] == "labels" else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


def report_diversity(out_dir: str | Path, results: pd.DataFrame | None = None,
                     finding_sets: bool = False) -> pd.DataFrame:
    """Per system: distinct test reports and the share of the most frequent one. A system that writes a
    handful of reports for hundreds of studies has collapsed onto the report prior, whatever its BLEU.

    `finding_sets=True` adds a first row for the references and a column "distinct finding sets": how
    many different sets of positive observations the rule labeller reads in a system's reports. A
    system that decodes deterministically writes about one wording per finding set, and the phantom's
    wording is drawn at random apart from the findings, so the references' count of finding sets
    bounds how many distinct reports even a system that gets every finding right would write."""
    from cxpmrg_lib.metrics.evaluate import read_predictions

    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    rows = {}

    def add(name: str, reports: pd.Series) -> None:
        counts = reports.value_counts()
        rows[name] = {"distinct reports": int(len(counts)), "test studies": int(len(reports)),
                      "most frequent share": float(counts.iloc[0] / len(reports)) if len(reports) else math.nan}
        if finding_sets:
            rows[name]["distinct finding sets"] = _finding_sets(list(reports))

    for slug, name in zip(results["system"], results["name"]):
        preds = read_predictions(out_dir / "predictions" / f"{slug}.csv")
        if finding_sets and not rows:
            add("References", preds["reference"])
        add(name, preds["prediction"])
    return pd.DataFrame.from_dict(rows, orient="index")


def _finding_sets(reports: list[str]) -> int:
    from cxpmrg_lib.labels.labeler import label_reports

    labels = label_reports(reports)
    return int(len({tuple(labels.columns[row == 1]) for row in labels.to_numpy()}))


def plain_summary(results: pd.DataFrame, pvalues: pd.DataFrame, diversity: pd.DataFrame,
                  metric: str = "ce_f1", floor: str = "Most common report", alpha: float = 0.05) -> str:
    """What this run shows, in sentences computed from its own numbers (markdown): which systems beat the
    most-common floor on `metric` by a paired test, which collapsed onto a few reports, and the best row."""
    label = {"ce_f1": "CE-F1", "bleu4": "BLEU-4"}.get(metric, metric)
    table = results.set_index("name")
    lines = []
    best = table[metric].astype(float).idxmax()
    lines.append(f"- Best {label}: **{best}** ({table.loc[best, metric]:.3f}).")
    if floor in table.index and floor in pvalues.index:
        base = float(table.loc[floor, metric])
        above = [n for n in table.index if n != floor and float(table.loc[n, metric]) > base
                 and float(pvalues.loc[n, floor]) < alpha]
        same = [n for n in table.index if n != floor and n not in above]
        lines.append(f"- {len(above)} of {len(table) - 1} systems beat the most common training report on {label} "
                     f"({base:.3f}) by a paired test at p < {alpha}: {', '.join(above) or 'none'}.")
        if same:
            lines.append(f"- Not distinguishable from it, or below it: {', '.join(same)}.")
    collapsed = diversity[(diversity["distinct reports"] <= 10) & (diversity.index != floor)
                          & (diversity.index != "References")]
    if len(collapsed):
        lines.append(f"- {len(collapsed)} systems wrote at most 10 distinct reports for "
                     f"{int(diversity['test studies'].max())} test studies (they fell back on the most likely "
                     f"report whatever the image): " + ", ".join(f"{n} ({int(r['distinct reports'])})"
                                                            for n, r in collapsed.iterrows()) + ".")
    if "References" in diversity.index and "distinct finding sets" in diversity.columns:
        ref = diversity.loc["References"]
        systems = diversity.drop(index=["References", floor], errors="ignore")
        best = systems["distinct finding sets"].idxmax() if len(systems) else None
        lines.append(f"- The {int(ref['test studies'])} references state {int(ref['distinct finding sets'])} distinct "
                     f"sets of findings ({ref['distinct finding sets'] / ref['test studies']:.0%} of the studies): a "
                     "system that decodes deterministically writes about one wording per set, so that share bounds "
                     "its distinct reports even when every finding is right."
                     + (f" The most sets a system wrote: {best} ({int(systems.loc[best, 'distinct finding sets'])})."
                        if best is not None else ""))
    return "\n".join(lines)


def encoder_spread(config: BenchConfig, slugs=("transformer", "r2gen", "r2gencmn")) -> pd.DataFrame:
    """Do the word-level systems' encoders give different studies different features? Per system, the
    between-study spread and mean cosine of its pooled image memory on the validation studies, trained
    (the row's kept weights) and at its initialisation: a collapse with features that do differ is the
    decoder ignoring them, not an encoder (or mask) bug that hands it one input for every image."""
    from cxpmrg_lib.stages.probe import feature_spread
    from cxpmrg_lib.models.zoo.common import WordVocab
    from cxpmrg_lib.trainer import load_weights

    results = read_results(bench_dir(config) / "results.csv")
    data = _data_for(config)
    rows = []
    for slug in slugs:
        row = results[results["system"] == slug]
        if row.empty or SYSTEMS[slug].kind != "zoo":
            continue
        run_dir = Path(row.iloc[0]["run_dir"])
        vocab = WordVocab.load(run_dir / "vocab.json")
        torch.manual_seed(config.seed)
        model = _zoo_model(dict(SYSTEMS[slug].options)["model"], vocab, config, 1, data.image_size).eval()
        initial = feature_spread(model.encode, data.val)
        load_weights(model, run_dir / "best" if (run_dir / "best" / "model.safetensors").exists() else run_dir)
        trained = feature_spread(model.encode, data.val)
        rows.append({"system": SYSTEMS[slug].name, "studies": trained["studies"],
                     "spread (trained)": trained["between_study_spread"],
                     "cosine (trained)": trained["mean_cosine_between_studies"],
                     "spread (init)": initial["between_study_spread"],
                     "cosine (init)": initial["mean_cosine_between_studies"]})
    return pd.DataFrame(rows).set_index("system") if rows else pd.DataFrame()
