"""Figures for the book (matplotlib/seaborn). Each function takes plain data and returns a Figure."""
from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

SYNTHETIC_NOTE = "synthetic data (phantom): not an estimate of performance on real radiographs"


def label_prevalence(tables: Mapping[str, pd.DataFrame], title: str | None = None) -> plt.Figure:
    """Fraction of studies with each observation positive (solid) and uncertain (hatched), per dataset."""
    names = list(tables)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(CHEXPERT_LABELS))
    colors = plt.get_cmap("tab10").colors
    for i, name in enumerate(names):
        df = tables[name]
        labels = df.reindex(columns=CHEXPERT_LABELS).astype(float)
        pos = (labels == 1.0).mean().to_numpy()
        unc = (labels == -1.0).mean().to_numpy()
        off = x - 0.4 + width * (i + 0.5)
        ax.bar(off, pos, width, color=colors[i % 10], label=f"{name} (n={len(df):,}) positive")
        ax.bar(off, unc, width, bottom=pos, color=colors[i % 10], alpha=0.45, hatch="//",
               label=f"{name} uncertain")
    ax.set_xticks(x)
    ax.set_xticklabels(CHEXPERT_LABELS, rotation=40, ha="right")
    ax.set_ylabel("fraction of studies")
    ax.set_title(title or "Label prevalence (14 CheXpert observations)")
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def report_lengths(tables: Mapping[str, pd.DataFrame], column: str = "report", bins: int = 40) -> plt.Figure:
    """Histogram of report length in words, one curve per dataset (medians in the legend)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    all_lengths = {n: df[column].fillna("").astype(str).str.split().str.len() for n, df in tables.items()}
    hi = max((int(v.quantile(0.99)) for v in all_lengths.values() if len(v)), default=10)
    edges = np.linspace(0, max(hi, 10), bins + 1)
    for name, lengths in all_lengths.items():
        ax.hist(lengths, bins=edges, alpha=0.55, density=True,
                label=f"{name}: median {lengths.median():.0f} words")
    ax.set_xlabel("report length (words)")
    ax.set_ylabel("density")
    ax.set_title("Report length")
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def positive_findings(row: pd.Series) -> list[str]:
    """Names of the observations a study's labels mark positive (1.0) or uncertain (-1.0, with '?')."""
    out = []
    for label in CHEXPERT_LABELS:
        v = row.get(label, np.nan)
        if v == 1.0:
            out.append(label)
        elif v == -1.0:
            out.append(label + "?")
    return out


def image_grid(table: pd.DataFrame, root: str | os.PathLike, n: int = 12, cols: int = 4, seed: int = 0,
               title: str | None = None, note: str | None = SYNTHETIC_NOTE) -> plt.Figure:
    """A grid of first images with their positive findings as captions (a seeded sample of studies)."""
    from cxpmrg_lib.data.images import load_image
    from cxpmrg_lib.data.table import safe_join

    rows = table.sample(n=min(n, len(table)), random_state=seed) if len(table) else table
    nrow = max(1, int(np.ceil(len(rows) / cols)))
    fig, axes = plt.subplots(nrow, cols, figsize=(3.0 * cols, 3.3 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), rows.iterrows()):
        img = load_image(safe_join(root, row["image_paths"][0]))
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        caption = ", ".join(positive_findings(row)) or "(no labels)"
        ax.set_title("\n".join(textwrap.wrap(caption, 34)), fontsize=8)
    if title or note:
        fig.suptitle("\n".join(t for t in (title, note and f"[{note}]") if t), fontsize=10)
    fig.tight_layout()
    return fig


def iu_examples(reports: pd.DataFrame, root: str | os.PathLike, study_ids: Sequence[str],
                table: pd.DataFrame) -> plt.Figure:
    """Real IU X-Ray reports with their human MeSH terms beside the radiograph rendered from those terms.

    `reports` is the Open-i table (uid, findings, impression, mesh_major); `table` the
    iu-phantom study table, whose image_paths locate the rendered views.
    """
    from cxpmrg_lib.data.images import load_image
    from cxpmrg_lib.data.table import safe_join

    by_uid = reports.set_index("uid")
    by_study = table.set_index("study_id")
    fig, axes = plt.subplots(len(study_ids), 2, figsize=(12, 3.4 * len(study_ids)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.4]})
    for (ax_img, ax_txt), uid in zip(axes, study_ids):
        rep = by_uid.loc[uid]
        paths = by_study.loc[uid, "image_paths"]
        ax_img.imshow(load_image(safe_join(root, paths[0])), cmap="gray", vmin=0, vmax=1)
        ax_img.set_title(f"{uid}: rendered from MeSH", fontsize=9)
        ax_img.axis("off")
        text = (f"MeSH (human): {'; '.join(rep['mesh_major'])}\n\n"
                f"FINDINGS: {rep['findings'] or '(none)'}\n\nIMPRESSION: {rep['impression'] or '(none)'}")
        wrapped = "\n".join("\n".join(textwrap.wrap(par, 95)) if par else "" for par in text.split("\n"))
        ax_txt.text(0, 1, wrapped, va="top", ha="left", fontsize=8.5, family="monospace",
                    transform=ax_txt.transAxes)
        ax_txt.axis("off")
    fig.suptitle("Real IU X-Ray reports (Open-i, CC BY-NC-ND 4.0) and the synthetic radiographs rendered "
                 "from their MeSH terms", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a figure atomically (PNG/SVG by suffix)."""
    from cxpmrg_lib.util.fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def table_preview(table: pd.DataFrame, n: int = 8, width: int = 110) -> pd.DataFrame:
    """A readable head of a study table: id, split, images, positive findings, start of the report."""
    head = table.head(n)
    return pd.DataFrame({
        "study_id": head["study_id"],
        "split": head["split"],
        "images": head["image_paths"].map(len),
        "findings (labels)": head.apply(lambda r: ", ".join(positive_findings(r)) or "-", axis=1),
        "report": head["report"].map(lambda t: textwrap.shorten(str(t), width=width, placeholder=" ...")),
    }).reset_index(drop=True)


def choose_iu_examples(reports: pd.DataFrame, table: pd.DataFrame, n: int = 4, seed: int = 0) -> list[str]:
    """Pick IU studies worth showing: one normal, the rest with several MeSH findings, seeded."""
    have = reports[reports["uid"].isin(set(table["study_id"])) & (reports["findings"].str.len() > 0)]
    rng = np.random.default_rng(seed)
    is_normal = have["mesh_major"].map(lambda terms: list(terms) == ["normal"])
    rich = have[have["mesh_major"].map(len) >= 2]
    picks = []
    if is_normal.any():
        picks.append(have[is_normal]["uid"].iloc[int(rng.integers(is_normal.sum()))])
    pool = list(rich["uid"]) or list(have["uid"])
    rng.shuffle(pool)
    picks += [u for u in pool if u not in picks][: max(0, n - len(picks))]
    return picks


def mesh_mapping_table(iu_root: str | os.PathLike, top: int = 12) -> pd.DataFrame:
    """The iu-phantom's MeSH terms: the most frequent drawn and not-drawn ones, side by side, with totals."""
    import json

    m = json.loads((Path(iu_root) / "mesh_mapping.json").read_text())
    drawn = list(m["mapped"].items())[:top]
    not_drawn = list(m["unmapped"].items())[:top]
    n = max(len(drawn), len(not_drawn))
    pad = lambda xs: xs + [("", None)] * (n - len(xs))  # noqa: E731
    rows = [
        {"drawn term": d[0], "studies (drawn)": d[1], "not drawn": u[0], "studies (not drawn)": u[1]}
        for d, u in zip(pad(drawn), pad(not_drawn))
    ]
    rows.append({"drawn term": f"total: {m['mapped_terms']:,} terms", "studies (drawn)": None,
                 "not drawn": f"total: {m['unmapped_terms']:,} terms", "studies (not drawn)": None})
    out = pd.DataFrame(rows).astype({"studies (drawn)": "Int64", "studies (not drawn)": "Int64"})
    out.attrs["studies"] = m["studies"]
    return out


def loss_curve(history: Sequence[Mapping], title: str = "Training loss", key: str = "loss",
               smooth: int = 5, note: str | None = None) -> plt.Figure:
    """Loss per optimizer step (thin) and its running mean over `smooth` log lines (thick)."""
    rows = [r for r in history if key in r and "step" in r]
    if not rows:
        raise ValueError(f"no {key!r} values in the training history")
    steps = np.array([r["step"] for r in rows])
    values = np.array([r[key] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(steps, values, lw=0.8, alpha=0.45, color="tab:blue", label=key)
    if len(values) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(values, kernel, mode="valid"), lw=2, color="tab:blue",
                label=f"running mean ({smooth} points)")
    lrs = [r.get("lr") for r in rows]
    if all(v is not None for v in lrs):
        ax2 = ax.twinx()
        ax2.plot(steps, lrs, color="tab:gray", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="gray")
    fig.tight_layout()
    return fig


def reconstruction_grid(recon: Mapping[str, "np.ndarray"], n: int = 4,
                        title: str = "Autoregressive prediction of clusters 2..K") -> plt.Figure:
    """Rows of input / target clusters / predicted clusters (cluster 1 is context, never predicted)."""
    columns = [("input", "input"), ("target", "target clusters"), ("prediction", "predicted clusters")]
    n = min(n, len(recon["input"]))
    fig, axes = plt.subplots(n, 3, figsize=(7.2, 2.4 * n), squeeze=False)
    for i in range(n):
        lo, hi = np.nanpercentile(np.asarray(recon["input"][i, 0]), [1, 99])
        for j, (key, label) in enumerate(columns):
            img = np.asarray(recon[key][i, 0], dtype=float)
            ax = axes[i, j]
            ax.imshow(np.ma.masked_invalid(img), cmap="gray", vmin=lo, vmax=hi)
            ax.set_facecolor("#203040")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def probe_comparison(tables: Mapping[str, pd.DataFrame], title: str = "Linear probe AUROC per label") -> plt.Figure:
    """Per-label AUROC bars for several encoders (tables from probe.probe_auroc(...).per_label)."""
    names = list(tables)
    labels = list(next(iter(tables.values()))["label"])
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, name in enumerate(names):
        t = tables[name].set_index("label").reindex(labels)
        mean = t["auroc"].mean()
        ax.bar(x - 0.4 + width * (i + 0.5), t["auroc"].fillna(0), width, label=f"{name} (mean {mean:.3f})")
    ax.axhline(0.5, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=40, ha="right")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("test AUROC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def retrieval_table(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Recall@k rows per model from stage-2 summaries (summary["retrieval"][split])."""
    cols = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    rows = {name: {c: round(float(r[c]), 1) for c in cols} for name, r in results.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")[cols]
    table.columns = [c.replace("i2t_", "image->report ").replace("t2i_", "report->image ") for c in cols]
    return table


def similarity_heatmap(image_emb, text_emb, n: int = 16, title: str = "Image/report cosine similarity") -> plt.Figure:
    """The similarity matrix of the first n pairs: a good model puts its maxima on the diagonal."""
    sim = np.asarray(image_emb[:n], dtype=float) @ np.asarray(text_emb[:n], dtype=float).T
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xlabel("report")
    ax.set_ylabel("image")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def primary_finding(table: pd.DataFrame) -> pd.Series:
    """One label per study for colouring: its first positive observation (CheXbert order), else No Finding."""
    labels = table.reindex(columns=CHEXPERT_LABELS).astype(float)
    findings = [c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]

    def first(row):
        for c in findings:
            if row[c] == 1.0:
                return c
        return "No Finding"

    return labels.apply(first, axis=1)


def embedding_map(embeddings, table: pd.DataFrame, method: str = "pca", seed: int = 0,
                  title: str | None = None) -> plt.Figure:
    """2-D map (PCA or t-SNE) of study embeddings, coloured by each study's primary finding."""
    x = np.asarray(embeddings, dtype=float)
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, random_state=seed, init="pca",
                  perplexity=min(30, max(2, len(x) // 4))).fit_transform(x)
    elif method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', not {method!r}")
    groups = primary_finding(table).to_numpy()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, g in enumerate(pd.unique(groups)):
        sel = groups == g
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, color=colors[i % 20], label=f"{g} ({sel.sum()})")
    ax.set_title(title or f"Image embeddings ({method.upper()}), coloured by primary finding")
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


METRIC_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rouge_l": "ROUGE-L", "cider": "CIDEr", "ce_precision": "CE precision", "ce_recall": "CE recall",
                 "ce_f1": "CE F1"}
REPORT_METRICS = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "ce_precision", "ce_recall",
                  "ce_f1"]


def metrics_table(results: Mapping[str, Mapping], keys: Sequence[str] = REPORT_METRICS) -> pd.DataFrame:
    """'value [lo, hi]' per model and metric from stage-3 summaries (test_metrics + test_ci)."""
    rows = {}
    for name, summary in results.items():
        metrics, ci = summary["test_metrics"], summary.get("test_ci") or {}
        row = {}
        for k in keys:
            v = metrics.get(k)
            lo, hi = (ci.get(k) or (None, None))[:2]
            if v is None:
                row[k] = ""
            elif lo is None or lo != lo:
                row[k] = f"{v:.3f}"
            else:
                row[k] = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")[list(keys)]


def ablation_bars(results: Mapping[str, Mapping], keys: Sequence[str] = ("bleu4", "ce_f1"),
                  title: str = "Stage-3 test metrics by encoder initialisation", note: str | None = None) -> plt.Figure:
    """One panel per metric: a bar per model (stage-3 summaries: test_metrics + test_ci) with its 95% CI."""
    names = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, k in zip(axes[0], keys):
        vals = np.array([results[n]["test_metrics"][k] for n in names], dtype=float)
        cis = [(results[n].get("test_ci") or {}).get(k) or (v, v) for n, v in zip(names, vals)]
        err = np.array([[v - lo for (lo, _), v in zip(cis, vals)], [hi - v for (_, hi), v in zip(cis, vals)]])
        ax.bar(range(len(names)), vals, yerr=np.clip(err, 0, None), capsize=4,
               color=[colors[i % 10] for i in range(len(names))])
        ax.set_xticks(range(len(names)), [textwrap.fill(n, 14) for n in names], fontsize=8)
        ax.set_title(METRIC_LABELS.get(k, k))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    if note:
        fig.text(0.5, -0.02, note, ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    return fig


PAPER_RESULTS = Path(__file__).resolve().parents[2] / "data_manifests" / "paper_results"


def paper_rows(paper_csv: str | os.PathLike, algorithms: Sequence[str],
               keys: Sequence[str] = ("bleu4", "rouge_l", "meteor", "cider", "ce_precision", "ce_recall", "ce_f1")
               ) -> pd.DataFrame:
    """The paper's published numbers for some algorithms, labelled as the paper's.

    `paper_csv`: a path, or the name of a table in data_manifests/paper_results/ (e.g.
    "table1_mrg_algorithms_chexpert_plus"). An empty frame when the table is not there
    (an installed package without the repository's data_manifests/)."""
    path = Path(paper_csv)
    if not path.exists() and not path.suffix:
        path = PAPER_RESULTS / f"{paper_csv}.csv"
    if not path.exists():
        log.warning("the paper's table %s is not here; its rows are left out", paper_csv)
        return pd.DataFrame(columns=list(keys))
    table = pd.read_csv(path)
    table = table[table["algorithm"].isin(algorithms)].set_index("algorithm")[list(keys)]
    table.index = [f"{a} (paper, CheXpert Plus, real data)" for a in table.index]
    return table


def report_examples(examples: pd.DataFrame, root: str | os.PathLike, n: int = 10, width: int = 70) -> plt.Figure:
    """Image, reference and generated report side by side for `n` studies (columns image_path, reference, prediction)."""
    from cxpmrg_lib.data.images import load_image

    n = min(n, len(examples))
    fig, axes = plt.subplots(n, 2, figsize=(12, 2.6 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for i, (_, row) in enumerate(examples.head(n).iterrows()):
        axes[i, 0].imshow(load_image(Path(root) / row["image_path"], 256), cmap="gray")
        axes[i, 0].set_axis_off()
        ref = textwrap.fill("REFERENCE: " + str(row["reference"]), width)
        gen = textwrap.fill("GENERATED: " + str(row["prediction"]), width)
        axes[i, 1].text(0, 1, ref + "\n\n" + gen, va="top", ha="left", fontsize=8, family="monospace")
        axes[i, 1].set_axis_off()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the benchmark

FAMILY_COLORS = {"floor": "#999999", "encoder-decoder": "#1f77b4", "frozen LM": "#2ca02c",
                 "MambaXray-VL": "#d62728", "LM swap": "#9467bd"}


def bench_bubbles(results: pd.DataFrame, x: str = "ce_f1", y: str = "bleu4", size: str = "total_m",
                  note: str | None = None) -> plt.Figure:
    """The paper's Figure 1 for our rows: BLEU-4 against CE-F1, bubble area by parameters, colour by family."""
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    sizes = results[size].astype(float).fillna(0.0)
    scale = 1500.0 / max(float(sizes.max()), 1e-9)
    for _, r in results.iterrows():
        color = FAMILY_COLORS.get(r["family"], "#333333")
        ax.scatter(r[x], r[y], s=max(30.0, float(r[size] or 0.0) * scale), color=color, alpha=0.45,
                   edgecolor="black", linewidth=0.6)
        ax.annotate(r["name"], (r[x], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for fam, color in FAMILY_COLORS.items():
        if fam in set(results["family"]):
            ax.scatter([], [], color=color, alpha=0.6, label=fam)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(METRIC_LABELS.get(x, x))
    ax.set_ylabel(METRIC_LABELS.get(y, y))
    ax.set_title(f"{METRIC_LABELS.get(y, y)} against {METRIC_LABELS.get(x, x)} (bubble area: parameters, M)")
    ax.grid(alpha=0.3)
    if note:
        fig.text(0.5, -0.01, note, ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    return fig


def label_heatmap(table: pd.DataFrame, title: str = "CE F1 per observation") -> plt.Figure:
    """Systems x observations heatmap of per-label F1 (NaN: the label never occurs)."""
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(table) + 2.2))
    values = table.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if values[i, j] == values[i, j]:
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.025)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def pvalue_matrix(table: pd.DataFrame, metric: str = "ce_f1", alpha: float = 0.05,
                  title: str | None = None) -> plt.Figure:
    """Pairwise paired-test p-values; cells below `alpha` are marked with a star."""
    fig, ax = plt.subplots(figsize=(0.55 * len(table) + 3, 0.5 * len(table) + 2))
    values = table.to_numpy(dtype=float)
    im = ax.imshow(np.log10(np.clip(values, 1e-4, 1)), cmap="magma", vmin=-4, vmax=0)
    ax.set_xticks(range(len(table)), table.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(table)), table.index, fontsize=7)
    for i in range(len(table)):
        for j in range(len(table)):
            if values[i, j] == values[i, j]:
                ax.text(j, i, f"{values[i, j]:.2f}" + ("*" if values[i, j] < alpha else ""), ha="center",
                        va="center", fontsize=5.5, color="white" if values[i, j] < 0.1 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, label="log10 p")
    ax.set_title(title or f"Paired bootstrap p-values, {METRIC_LABELS.get(metric, metric)} (* p < {alpha})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def seed_spread(table: pd.DataFrame, keys: Sequence[str] = ("ce_f1", "bleu4", "distinct"),
                note: str | None = None) -> plt.Figure:
    """Each row's training seeds as points beside its seed mean, with the 95% interval over seeds and test
    studies as a bar (bench.seeds.seed_table's columns): the spread a rerun of training can bring, to be seen
    rather than read. Rows in the order of the first metric's mean; the distinct reports have no interval."""
    import seaborn as sns

    from cxpmrg_lib.bench.seeds import seed_long

    order = table[keys[0]].astype(float).sort_values(ascending=False).index.tolist()
    long = seed_long(table, [k for k in keys if k != "distinct"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.42 * len(order) + 1.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        data = long[long["metric"] == key]
        sns.stripplot(data=data, x="value", y="name", order=order, hue="seed", palette="crest", size=5, jitter=0.12,
                      ax=ax, legend=key == keys[-1], alpha=0.85)
        means = table.loc[order, key].astype(float).to_numpy()
        rows = np.arange(len(order))
        if f"{key}_lo" in table:
            lo, hi = (table.loc[order, f"{key}_{e}"].astype(float).to_numpy() for e in ("lo", "hi"))
            ax.hlines(rows, lo, hi, color="black", linewidth=1.2, alpha=0.7)
        ax.scatter(means, rows, marker="|", s=260, color="black", linewidth=2.2, zorder=3)
        ax.set_xlabel(METRIC_LABELS.get(key, "distinct test reports" if key == "distinct" else key))
        ax.set_ylabel("")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    if axes[-1].get_legend() is not None:     # the last panel's lower right: the floors sit at its left
        axes[-1].legend(title="training seed", fontsize=7, title_fontsize=7, loc="lower right")
    fig.suptitle("Each training seed (points), the seed mean (black tick) and the 95% interval over seeds and "
                 "test studies (line)", fontsize=9)
    if note:
        fig.text(0.5, -0.01, note, ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    return fig


def results_bars(results: pd.DataFrame, keys: Sequence[str] = ("bleu4", "ce_f1"), title: str = "",
                 note: str | None = None) -> plt.Figure:
    """Bars with 95% CIs for some rows of results.csv (value, value_lo, value_hi columns)."""
    summaries = {r["name"]: {"test_metrics": {k: r[k] for k in keys},
                             "test_ci": {k: (r.get(f"{k}_lo"), r.get(f"{k}_hi")) for k in keys}}
                 for _, r in results.iterrows()}
    return ablation_bars(summaries, keys, title=title, note=note)


def paper_table(name: str, index: str | Sequence[str], where: Mapping[str, str] | None = None):
    """A whole published table of the paper (data_manifests/paper_results/<name>.csv), indexed by
    `index`, optionally filtered (`where` column -> value), under a caption that says whose numbers
    they are. Empty when the table is not there."""
    path = PAPER_RESULTS / f"{name}.csv"
    if not path.exists():
        log.warning("the paper's table %s is not here", path)
        return pd.DataFrame()
    table = pd.read_csv(path)
    for col, value in (where or {}).items():
        table = table[table[col] == value]
    table = table.drop(columns=[c for c in ("index",) if c in table]).set_index(index)
    return table.style.set_caption(f"The paper's published numbers ({name}; real data, the paper's GPUs): "
                                   "not comparable with the phantom rows, shown for scale").format(precision=3, na_rep="-")


def validation_curves(curves: pd.DataFrame, keys: Sequence[str] = ("ce_f1", "bleu4", "distinct"),
                      floor: Mapping[str, float] | None = None, title: str = "Validation along training",
                      note: str | None = None) -> plt.Figure:
    """One panel per key (validation CE-F1, BLEU-4, share of distinct reports), a line per system
    against the optimizer step; `floor` draws the most-common report's value of a key as a dashed line."""
    if curves.empty:
        raise ValueError("no validation records to plot (the runs wrote no eval lines)")
    labels = {"ce_f1": "CE-F1", "bleu4": "BLEU-4", "distinct": "distinct reports (share)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for system, group in curves.groupby("system", sort=False):
            group = group.sort_values("step")
            ax.plot(group["step"], group[key], marker="o", ms=3, lw=1.4, label=system)
        if floor and key in floor:
            ax.axhline(floor[key], color="black", ls="--", lw=1, label="most common report")
        ax.set_xlabel("optimizer step")
        ax.set_title(labels.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(names) - 1) // 4), 1, 1))
    return fig


def label_rates(rates: pd.DataFrame, title: str = "Predicted-positive rate against the references' rate "
                "(validation, last step)") -> plt.Figure:
    """Heatmap, systems x observations, of predicted minus reference positive rate (blue: the
    generator names a finding less often than the radiologist; red: more often), each cell
    annotated with the predicted rate; the references' rates head the columns."""
    if rates.empty:
        raise ValueError("no label rates to plot")
    pred = rates.pivot(index="system", columns="observation", values="predicted")
    ref = rates.drop_duplicates("observation").set_index("observation")["reference"]
    cols = [c for c in CHEXPERT_LABELS if c in pred.columns]
    pred = pred.loc[list(dict.fromkeys(rates["system"]))][cols]
    diff = pred - ref[cols]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(pred) + 2.2))
    im = ax.imshow(diff.to_numpy(dtype=float), cmap="coolwarm", vmin=-0.6, vmax=0.6, aspect="auto")
    for i in range(diff.shape[0]):
        for j in range(diff.shape[1]):
            ax.text(j, i, f"{pred.iat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c}\n(ref {ref[c]:.2f})" for c in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(pred)))
    ax.set_yticklabels(pred.index, fontsize=8)
    fig.colorbar(im, ax=ax, label="predicted - reference rate", shrink=0.8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def decoding_sweep(sweeps: Mapping[str, pd.DataFrame], title: str = "Validation decoding sweep") -> plt.Figure:
    """CE-F1 (bars) and the share of distinct reports (dots) per decoding setting, one panel per system."""
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.2 * len(sweeps), 3.6), squeeze=False)
    for ax, (system, sweep) in zip(axes[0], sweeps.items()):
        labels = [f"{'greedy' if r.num_beams == 1 else f'beam {r.num_beams}'}\nrp {r.repetition_penalty:g}"
                  f"{' nr' + str(r.no_repeat_ngram_size) if r.no_repeat_ngram_size else ''}"
                  f"{chr(10) + 'guid. ' + format(getattr(r, 'guidance', 1.0), 'g') if getattr(r, 'guidance', 1.0) != 1.0 else ''}"
                  for r in sweep.itertuples()]
        x = np.arange(len(sweep))
        ax.bar(x, sweep["ce_f1"], color="tab:blue", alpha=0.7, label="CE-F1")
        ax2 = ax.twinx()
        ax2.plot(x, sweep["distinct"], "o", color="tab:red", label="distinct share")
        ax2.set_ylim(0, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=70, fontsize=6)
        ax.set_title(system, fontsize=10)
        ax.set_ylabel("CE-F1")
        ax2.set_ylabel("distinct reports (share)", color="tab:red")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
