"""The benchmark over its training seeds: every seed's rows read together, a table of seed means with the seed
spread and an interval over seeds and studies, paired tests over both with Holm's correction, and the
claims the seeds support, in sentences computed from the run (metrics.replicates says how)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from cxpmrg_lib.bench.config import BenchConfig, bench_dir
from cxpmrg_lib.bench.run import read_results
from cxpmrg_lib.bench.systems import REFERENCE, SYSTEMS

log = logging.getLogger(__name__)

SEED_METRICS = ("ce_f1", "bleu4")
LABELS = {"ce_f1": "CE-F1", "bleu4": "BLEU-4", "distinct": "distinct reports"}
FLOOR = "most-common"
COLLAPSED = 10          # at most this many distinct test reports: the system fell back on a few reports
# The seeds' resamples: ten times the benchmark's n_boot (10,000 by default). A bootstrap p-value is at least
# 1 / (R + 1), and Holm multiplies the smallest of m tests by m: with 14 rows (91 pairs) R = 1,000 could never
# reach 0.05, R = 10,000 can (91 / 10,001 < 0.01).
RESAMPLES_PER_N_BOOT = 10


def seed_results(config: BenchConfig) -> pd.DataFrame:
    """Every training seed's results.csv as one table, with the columns `seed` and `distinct` (how many
    different reports the row wrote for the test studies). Seeds not run yet are left out."""
    from cxpmrg_lib.metrics.evaluate import read_predictions

    frames = []
    for one in config.seed_configs():
        out = bench_dir(one)
        if not (out / "results.csv").exists():
            log.warning("seed %d: no results at %s yet; left out", one.seed, out)
            continue
        table = read_results(out)
        table["seed"] = one.seed
        table["distinct"] = [read_predictions(out / "predictions" / f"{slug}.csv")["prediction"].nunique()
                             for slug in table["system"]]
        frames.append(table)
    if not frames:
        raise FileNotFoundError(f"no benchmark results for any seed of {config.training_seeds()} under "
                                f"{bench_dir(config)}: run the benchmark first")
    return pd.concat(frames, ignore_index=True)


@dataclass
class SeedScores:
    """Per system and training seed, the per-study statistics of its test reports (metrics.StudyStats), all
    on the same test studies, and the resampling settings every table of this run shares."""
    names: dict[str, str]                               # slug -> display name, in results order
    stats: dict[str, dict[int, object]]                 # slug -> {training seed: StudyStats}
    n_boot: int = 1000
    seed: int = 0
    _replicates: dict = field(default_factory=dict, repr=False)

    def seeds_of(self, slug: str) -> list[int]:
        return sorted(self.stats[slug])

    def common_seeds(self, a: str, b: str) -> list[int]:
        return sorted(set(self.stats[a]) & set(self.stats[b]))

    def values(self, slug: str, metric: str, seeds: list[int] | None = None) -> list[float]:
        return [float(self.stats[slug][s].values[metric]) for s in (seeds or self.seeds_of(slug))]

    def replicates(self, slug: str, metric: str, seeds: list[int] | None = None) -> np.ndarray:
        """Two-level replicates of the row's seed-mean (metrics.replicates), made once per seed set."""
        from cxpmrg_lib.metrics.replicates import seed_replicates

        seeds = tuple(seeds or self.seeds_of(slug))
        key = (slug, metric, seeds)
        if key not in self._replicates:
            self._replicates[key] = seed_replicates([self.stats[slug][s] for s in seeds], metric, self.n_boot,
                                                    self.seed)
        return self._replicates[key]

    def compare(self, a: str, b: str, metric: str) -> dict:
        """A against B over their common seeds and the studies (metrics.replicates.gap_test)."""
        from cxpmrg_lib.metrics.replicates import gap_test

        seeds = self.common_seeds(a, b)
        if not seeds:
            raise ValueError(f"{a} and {b} share no training seed")
        return gap_test(self.replicates(a, metric, seeds), self.replicates(b, metric, seeds),
                        self.values(a, metric, seeds), self.values(b, metric, seeds))


def score_seeds(config: BenchConfig, results: pd.DataFrame | None = None, metrics=SEED_METRICS,
                n_boot: int | None = None) -> SeedScores:
    """Score every row of every seed once (the references labelled once for all). `n_boot`: the resamples
    of every interval and test over the seeds (default: RESAMPLES_PER_N_BOOT x config.n_boot)."""
    from cxpmrg_lib.metrics import study_stats
    from cxpmrg_lib.metrics.evaluate import read_predictions
    from cxpmrg_lib.util.progress import tqdm

    results = seed_results(config) if results is None else results
    names = dict(zip(results["system"], results["name"]))
    stats: dict[str, dict[int, object]] = {slug: {} for slug in names}
    ref_labels, references = None, None
    rows = list(zip(results["system"], results["seed"]))
    folders = {c.seed: bench_dir(c) for c in config.seed_configs()}
    for slug, seed in tqdm(rows, desc="scoring the seeds", leave=False, disable=len(rows) < 8):
        frame = read_predictions(folders[seed] / "predictions" / f"{slug}.csv")
        if references is None:
            references = frame["reference"].tolist()
        elif frame["reference"].tolist() != references:
            raise ValueError(f"{slug}, seed {seed}: its test references differ from the other rows' "
                             "(every seed must be scored on the same test studies)")
        st = study_stats(references, frame["prediction"].tolist(), meteor=False, metrics=list(metrics),
                         ref_labels=ref_labels)
        ref_labels = st.ref_labels if ref_labels is None else ref_labels
        stats[slug][int(seed)] = st
    return SeedScores(names, stats, n_boot=n_boot or RESAMPLES_PER_N_BOOT * config.n_boot, seed=config.seed)


def seed_table(scores: SeedScores, results: pd.DataFrame, metrics=SEED_METRICS) -> pd.DataFrame:
    """One row per system: for each metric the seed mean, the seed standard deviation, each seed's value
    and the 95% interval over seeds and studies; the distinct reports' mean, sd and per-seed counts."""
    from cxpmrg_lib.metrics.stats import percentile_ci

    rows = {}
    for slug, name in scores.names.items():
        seeds = scores.seeds_of(slug)
        row: dict = {"system": slug, "family": SYSTEMS[slug].family if slug in SYSTEMS else "", "seeds": len(seeds)}
        for metric in metrics:
            values = scores.values(slug, metric)
            lo, hi = percentile_ci(scores.replicates(slug, metric))
            row.update({metric: float(np.mean(values)), f"{metric}_sd": _sd(values), f"{metric}_seeds": values,
                        f"{metric}_lo": lo, f"{metric}_hi": hi})
        distinct = [int(results[(results["system"] == slug) & (results["seed"] == s)]["distinct"].iloc[0])
                    for s in seeds]
        row.update({"distinct": float(np.mean(distinct)), "distinct_sd": _sd(distinct), "distinct_seeds": distinct})
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def pair_table(scores: SeedScores, metric: str = "ce_f1") -> pd.DataFrame:
    """Every pair of systems over seeds and studies: the gap (a - b) of the seed means, its 95% interval, the
    two-sided p-value, Holm's adjustment over all the pairs of this table, and in how many seeds each side
    was above."""
    return _family(scores, list(combinations(list(scores.names), 2)), metric)


def against(scores: SeedScores, other: str, metric: str = "ce_f1", slugs: list[str] | None = None) -> pd.DataFrame:
    """Each system (or `slugs`) against one system (the reference, the floor): the same columns as
    pair_table, a = each system, b = `other`, Holm's adjustment over this family."""
    chosen = [s for s in (slugs or list(scores.names)) if s != other and s in scores.names]
    return _family(scores, [(slug, other) for slug in chosen], metric)


def _family(scores: SeedScores, pairs: list[tuple[str, str]], metric: str) -> pd.DataFrame:
    """One family of tests (a, b): each comparison's row, and Holm's adjustment over the family."""
    from cxpmrg_lib.metrics.stats import holm

    rows = []
    for a, b in pairs:
        t = scores.compare(a, b, metric)
        rows.append({"a": scores.names[a], "b": scores.names[b], "slug_a": a, "slug_b": b, "seeds": t["seeds"],
                     "delta": t["delta"], "lo": t["ci_delta"][0], "hi": t["ci_delta"][1], "p": t["p_value"],
                     "a_above": t["a_above"], "b_above": t["b_above"]})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = holm(table["p"].to_numpy())
    return table


def pvalue_matrix(pairs: pd.DataFrame, column: str = "p_holm") -> pd.DataFrame:
    """pair_table's (Holm-adjusted) p-values as a symmetric system x system matrix (viz.pvalue_matrix)."""
    names = list(dict.fromkeys(list(pairs["a"]) + list(pairs["b"])))
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for _, r in pairs.iterrows():
        matrix.loc[r["a"], r["b"]] = matrix.loc[r["b"], r["a"]] = r[column]
    return matrix


def supported(row, alpha: float = 0.05) -> bool:
    """A claim "a above b" holds when a was above in every seed and the Holm-adjusted p is below alpha (with
    one seed no claim about training is supported: see claims())."""
    return bool(row["seeds"] > 1 and row["a_above"] == row["seeds"] and row["delta"] > 0 and row["p_holm"] < alpha)


def _gap(row, metric: str) -> str:
    return (f"{LABELS.get(metric, metric)} gap {row['delta']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}], "
            f"above in {int(row['a_above'])} of {int(row['seeds'])} seeds, Holm p {_p(row['p_holm'])}")


def _p(p: float) -> str:
    """"= 0.123", "< 0.001" or "n/a"."""
    return "n/a" if isinstance(p, float) and math.isnan(p) else (f"= {p:.3f}" if p >= 0.001 else "< 0.001")


def claims(scores: SeedScores, table: pd.DataFrame, pairs: pd.DataFrame, metric: str = "ce_f1",
           alpha: float = 0.05) -> str:
    """What this run shows, stated against the training noise (markdown). Each claim carries the seeds that
    support it and its Holm-adjusted p; a ranking the seeds do not support is said to be unsupported."""
    label = LABELS.get(metric, metric)
    seeds = int(table["seeds"].max()) if len(table) else 0
    lines = []
    if seeds < 2:
        lines.append(f"- **One training seed.** Every claim below rests on one training run per row: it says "
                     f"nothing about how far another seed would move it (the training noise). Run with "
                     f"`seeds` of 3 or more to test them against that noise.")
    best = table[metric].astype(float).idxmax()
    tied = [] if not len(pairs) else [
        (r["b"] if r["a"] == best else r["a"]) for _, r in pairs.iterrows()
        if best in (r["a"], r["b"]) and not supported(r if r["a"] == best else _flip(r), alpha)]
    lines.append(f"- Highest mean {label}: **{best}** ({table.loc[best, metric]:.3f} over "
                 f"{_seeds(table.loc[best, 'seeds'])})" + (f"; not separated from it within the noise: {', '.join(tied)}." if tied
                              else "; every other row is below it in every seed, by a Holm-corrected test."))
    if REFERENCE in scores.names:
        ablations = [s for s in scores.names if s != REFERENCE and SYSTEMS.get(s) is not None
                     and SYSTEMS[s].family == SYSTEMS[REFERENCE].family]
        if ablations:
            family = against(scores, REFERENCE, metric, ablations)
            lines.append(f"- **Ablation** ({label}, MambaXray-VL against each ablation; Holm over "
                         f"{len(family)} test{'s' if len(family) > 1 else ''}):")
            for _, r in family.iterrows():
                row = _flip(r)             # a = MambaXray-VL, b = the ablation
                verdict = "holds" if supported(row, alpha) else "not supported within the training noise"
                lines.append(f"  - MambaXray-VL > {r['a']}: **{verdict}** ({_gap(row, metric)}).")
    if FLOOR in scores.names:
        floor = against(scores, FLOOR, metric)
        above = [r["a"] for _, r in floor.iterrows() if supported(r, alpha)]
        rest = [r["a"] for _, r in floor.iterrows() if not supported(r, alpha)]
        lines.append(f"- {len(above)} of {len(floor)} rows beat the most common training report on {label} "
                     f"({table.loc[scores.names[FLOOR], metric]:.3f}) in every seed with Holm p < {alpha}: "
                     f"{', '.join(above) or 'none'}." + (f" Not shown to beat it: {', '.join(rest)}." if rest else ""))
    if len(pairs):
        separated = int(sum(supported(r, alpha) or supported(_flip(r), alpha) for _, r in pairs.iterrows()))
        lines.append(f"- Of the {len(pairs)} pairs of rows, {separated} are ordered in every seed with Holm p < "
                     f"{alpha}; the other {len(pairs) - separated} cannot be told apart within the training noise "
                     f"(the matrix below).")
        close = _close_pairs(pairs, table, metric, alpha)
        if close:
            lines.append("- Neighbours in the ranking that cannot be told apart: " + "; ".join(close) + ".")
    collapsed = table[table["distinct_seeds"].map(lambda c: min(c) <= COLLAPSED)
                      & (table["system"] != FLOOR)]
    for name, r in collapsed.iterrows():
        counts = r["distinct_seeds"]
        k = sum(c <= COLLAPSED for c in counts)
        lines.append(f"- {name} wrote at most {COLLAPSED} distinct reports in {k} of {len(counts)} seeds "
                     f"(per seed: {', '.join(str(c) for c in counts)}): "
                     + ("collapsed in every seed." if k == len(counts) else "whether it collapses depends on the seed."))
    return "\n".join(lines)


def _seeds(n) -> str:
    return f"{int(n)} seed{'s' if int(n) != 1 else ''}"


def _flip(row) -> pd.Series:
    """The same comparison read from b's side."""
    out = row.copy()
    out["a"], out["b"] = row["b"], row["a"]
    out["slug_a"], out["slug_b"] = row["slug_b"], row["slug_a"]
    out["delta"], out["lo"], out["hi"] = -row["delta"], -row["hi"], -row["lo"]
    out["a_above"], out["b_above"] = row["b_above"], row["a_above"]
    return out


def _close_pairs(pairs: pd.DataFrame, table: pd.DataFrame, metric: str, alpha: float) -> list[str]:
    """Adjacent rows of the ranking by seed mean whose order the seeds do not support."""
    ranked = table[metric].astype(float).sort_values(ascending=False).index.tolist()
    out = []
    for upper, lower in zip(ranked, ranked[1:]):
        match = pairs[((pairs["a"] == upper) & (pairs["b"] == lower)) | ((pairs["a"] == lower) & (pairs["b"] == upper))]
        if not len(match):
            continue
        r = match.iloc[0] if match.iloc[0]["a"] == upper else _flip(match.iloc[0])
        if not supported(r, alpha):
            out.append(f"{upper} and {lower} (gap {r['delta']:+.3f}, above in {int(r['a_above'])} of "
                       f"{int(r['seeds'])} seeds, Holm p {_p(r['p_holm'])})")
    return out


def seed_cells(table: pd.DataFrame, metrics=SEED_METRICS) -> pd.DataFrame:
    """The seed table as the book shows it (compact, to fit a laptop screen): per metric "mean ± sd" over a
    second line with the interval over seeds and studies and each seed's value; the distinct reports' mean
    and per-seed counts. HTML: show with `to_html(escape=False)`."""
    out = pd.DataFrame(index=table.index)
    out["seeds"] = table["seeds"].astype(int)
    for metric in metrics:
        ranks = table[metric].astype(float).rank(ascending=False, method="min")
        cells = []
        for name, r in table.iterrows():
            sd = "" if math.isnan(r[f"{metric}_sd"]) else f" ± {r[f'{metric}_sd']:.3f}"
            head = f"{r[metric]:.3f}{sd}"
            head = f"<b>{head}</b>" if ranks[name] == 1 else head
            per = " · ".join(f"{v:.3f}" for v in r[f"{metric}_seeds"])
            cells.append(f"{head}<br><small>[{r[f'{metric}_lo']:.3f}, {r[f'{metric}_hi']:.3f}] "
                         f"seeds {per}</small>")
        out[LABELS.get(metric, metric)] = cells
    out[LABELS["distinct"]] = [f"{r['distinct']:.0f}<br><small>{' · '.join(str(c) for c in r['distinct_seeds'])}"
                               f"</small>" for _, r in table.iterrows()]
    return out


def seed_long(table: pd.DataFrame, metrics=SEED_METRICS) -> pd.DataFrame:
    """One row per system, seed and metric (the figure's data): name, metric, seed index, value."""
    rows = []
    for name, r in table.iterrows():
        for metric in (*metrics, "distinct"):
            for k, v in enumerate(r[f"{metric}_seeds"]):
                rows.append({"name": name, "metric": metric, "seed": k, "value": float(v)})
    return pd.DataFrame(rows)


def seed_note(config: BenchConfig, results: pd.DataFrame) -> str:
    """Which rows have fewer seeds than asked for, and why, in sentences (empty when all have them all): those
    the benchmark trains at the first seed only (BenchConfig.seed_systems), and any seed not run yet."""
    asked = config.seeds
    counts = results.groupby("system")["seed"].nunique()
    names = dict(zip(results["system"], results["name"]))
    by_design = [s for s in config.single_seed() if s in counts.index]
    short = [s for s in counts.index if counts[s] < asked and s not in by_design]
    out = []
    if by_design:
        out.append(f"Trained at the first seed only, to hold the time budget (`seed_systems`): "
                   + ", ".join(names[s] for s in by_design) + ". Their rows carry one seed: no claim about them "
                   "is tested against the training noise.")
        out.append(_outranked(config, results, by_design, names))
    if short:
        out.append(f"Rows with fewer than the {asked} seeds asked for: "
                   + ", ".join(f"{names[s]} ({counts[s]})" for s in short) + ".")
    return " ".join(o for o in out if o)


BASELINE_FAMILIES = ("encoder-decoder", "frozen LM")


def _outranked(config: BenchConfig, results: pd.DataFrame, single: list[str], names: dict, metric: str = "ce_f1") -> str:
    """Whether a baseline kept at one seed scored above a baseline trained at every seed, at the first seed
    (the replicated baselines are meant to be the best ones): a sentence naming them, or where none did."""
    first = results[results["seed"] == config.seed].set_index("system")[metric].astype(float)
    baselines = [s for s in first.index if s in SYSTEMS and SYSTEMS[s].family in BASELINE_FAMILIES]
    kept = [s for s in baselines if s not in single]
    if not kept or not any(s in baselines for s in single):
        return ""
    floor = min(first[s] for s in kept)
    above = [s for s in single if s in baselines and first[s] > floor]
    label = LABELS.get(metric, metric)
    if not above:
        return (f"At the first seed every one of them scored below each trained baseline that has all seeds "
                f"({label}).")
    return (f"At the first seed, {', '.join(names[s] for s in above)} scored above a baseline that has all seeds "
            f"({label} {', '.join(f'{first[s]:.3f}' for s in above)} against {floor:.3f}): its rank among the "
            f"baselines is not tested against the training noise.")


def seed_spread_summary(table: pd.DataFrame, metric: str = "ce_f1") -> dict:
    """The yardstick of a rerun: the median and largest seed standard deviation of `metric` over the trained
    rows, and the largest spread (max - min) between seeds."""
    trained = table[table["family"] != "floor"] if "family" in table else table
    sds = trained[f"{metric}_sd"].dropna()
    spans = trained[f"{metric}_seeds"].map(lambda v: max(v) - min(v) if len(v) > 1 else math.nan).dropna()
    return {"metric": metric, "rows": int(len(sds)), "median_sd": float(sds.median()) if len(sds) else math.nan,
            "max_sd": float(sds.max()) if len(sds) else math.nan,
            "max_sd_row": sds.idxmax() if len(sds) else None,
            "max_span": float(spans.max()) if len(spans) else math.nan,
            "max_span_row": spans.idxmax() if len(spans) else None}



SEED_TABLE = "seed_table.json"


def save_seed_table(config: BenchConfig, table: pd.DataFrame) -> Path:
    """seed_table's numbers beside the first seed's results (bench/seed_table.json), for the chapters that
    read the seed spread without scoring every seed again (07_reproducibility)."""
    from cxpmrg_lib.util.fileio import write_json

    path = bench_dir(config) / SEED_TABLE
    records = {name: {k: (v if not isinstance(v, float) or not math.isnan(v) else None) for k, v in row.items()}
               for name, row in table.iterrows()}
    write_json(path, {"training_seeds": config.training_seeds(), "rows": records})
    return path


def read_seed_tables(run_root: str | Path) -> dict[str, pd.DataFrame]:
    """Every saved seed table under a run root: {"<dataset>/<preset>": table}, in folder order."""
    import json

    out = {}
    for path in sorted(Path(run_root).glob(f"*/*/bench/{SEED_TABLE}")):
        rows = json.loads(path.read_text())["rows"]
        table = pd.DataFrame.from_dict(rows, orient="index").astype({"seeds": int})
        for column in table.columns:
            if column.endswith(("_sd", "_lo", "_hi")) or column in SEED_METRICS:
                table[column] = table[column].astype(float)
        out[f"{path.parents[2].name}/{path.parents[1].name}"] = table
    return out
