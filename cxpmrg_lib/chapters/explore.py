"""Browse generated reports: one study at a time, every system beside the reference.

A benchmark folder (`bench.run_bench`) holds predictions/<system>.csv (study_id,
reference, prediction) for the same test studies. `load_bench` reads them with the
study table (for the images), labels every report with the labeller the CE metric
uses, and scores each study cheaply (BLEU-4, ROUGE-L, CE F1, label errors). The
pure functions below turn that into HTML: `highlight_sentences` marks the sentences of
a generated report that also occur in the reference (like the paper's Figure 3),
`render_case` shows one study, `gallery` a few selected ones (what the static book
shows); `Explorer` is the live ipywidgets browser for Jupyter. Everything respects the
dataset's publish policy (`cxpmrg_lib.chapters.publish`): on a restricted dataset without the
opt-in, only aggregates and the notice are rendered.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS
from cxpmrg_lib.chapters.publish import PublishPolicy, notice_html

log = logging.getLogger(__name__)

__all__ = ["split_sentences", "normalise_sentence", "sentence_matches", "highlight_sentences", "study_scores",
           "BenchView", "load_bench", "ensure_bench", "findings_present", "select_cases", "case_table", "render_case",
           "gallery", "summary_table",
           "Explorer", "show_explorer", "PRESETS"]

EXACT_COLOUR = "#a8e6b0"     # a sentence that also occurs in the reference
CLOSE_COLOUR = "#fbeaa0"     # most of its words occur in one reference sentence
PRESETS = {"best": "best overall", "disagree": "where systems disagree", "ce_error": "largest CE error"}
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+|$)")
_WORD = re.compile(r"[a-z0-9]+")


# ----------------------------------------------------------------------------- sentences
def split_sentences(text) -> list[str]:
    """Sentences of a report, keeping their own spelling ("a . b ." of cleaned reports works too)."""
    if not isinstance(text, str):
        return []
    return [s.strip() for s in _SENTENCE.findall(text) if _WORD.search(s.lower())]


def normalise_sentence(sentence: str) -> str:
    """Case, punctuation and whitespace do not make two sentences different."""
    return " ".join(_WORD.findall(sentence.lower()))


def sentence_matches(prediction, reference, close: float = 0.6) -> list[tuple[str, str]]:
    """(sentence, "exact" | "close" | "") for each sentence of `prediction`.

    exact: the normalised sentence is one of the reference's; close: at least `close` of
    its words (as a set) occur in a single reference sentence.
    """
    ref = [normalise_sentence(s) for s in split_sentences(reference)]
    ref_set, ref_words = set(ref), [set(r.split()) for r in ref]
    out = []
    for s in split_sentences(prediction):
        norm = normalise_sentence(s)
        if norm in ref_set:
            out.append((s, "exact"))
            continue
        words = set(norm.split())
        best = max((len(words & rw) / len(words) for rw in ref_words), default=0.0) if words else 0.0
        out.append((s, "close" if best >= close else ""))
    return out


def highlight_sentences(prediction, reference, close: float = 0.6) -> str:
    """HTML of `prediction` with the sentences found in `reference` highlighted (green: same sentence,
    yellow: most words shared with one reference sentence)."""
    parts = []
    for s, kind in sentence_matches(prediction, reference, close):
        text = html.escape(s)
        if kind == "exact":
            parts.append(f'<span class="cx-exact" style="background:{EXACT_COLOUR}">{text}</span>')
        elif kind == "close":
            parts.append(f'<span class="cx-close" style="background:{CLOSE_COLOUR}">{text}</span>')
        else:
            parts.append(text)
    return " ".join(parts) if parts else "<i>(empty report)</i>"


# ----------------------------------------------------------------------------- per-study scores
def study_scores(references: Sequence, predictions: Sequence, ref_labels: pd.DataFrame,
                 pred_labels: pd.DataFrame) -> pd.DataFrame:
    """Per study: BLEU-4 and ROUGE-L (pycocoevalcap's statistics of that study alone), CE F1 (R2Gen
    convention, micro over the 14 labels of the study; 0 when neither side has a positive) and
    label errors (positive labels on one side only)."""
    from cxpmrg_lib.metrics import nlg
    from cxpmrg_lib.metrics.ce import ce_from_sums, ce_stats, label_values

    refs, hyps = nlg.normalize_texts(references), nlg.normalize_texts(predictions)
    _, bleu = nlg.bleu_stats(hyps, refs)
    stats = ce_stats(label_values(ref_labels), label_values(pred_labels))
    n = len(CHEXPERT_LABELS)
    errors = stats[:, n:3 * n].sum(axis=1)        # r2gen fp + fn
    return pd.DataFrame({"bleu4": nlg.bleu_from_sums(bleu)[:, 3], "rouge_l": nlg.rouge_scores(hyps, refs),
                         "ce_f1": ce_from_sums(stats, 1)["ce_f1"], "ce_errors": errors.astype(int)})


# ----------------------------------------------------------------------------- the benchmark folder
@dataclass
class BenchView:
    """A benchmark folder read for browsing; frames are indexed by study_id in test order."""
    out_dir: Path
    systems: dict[str, str]                  # slug -> display name, in results order
    references: pd.Series
    predictions: pd.DataFrame                # study_id x slug
    ref_labels: pd.DataFrame                 # study_id x 14
    pred_labels: dict[str, pd.DataFrame]     # slug -> study_id x 14
    scores: dict[str, pd.DataFrame]          # slug -> study_id x (bleu4, rouge_l, ce_f1, ce_errors)
    policy: PublishPolicy
    dataset_root: Path | None = None
    image_paths: dict[str, list[str]] = field(default_factory=dict)

    @property
    def study_ids(self) -> list[str]:
        return list(self.references.index)

    def score(self, metric: str, systems: Sequence[str] | None = None) -> pd.DataFrame:
        """study_id x system of one per-study score."""
        return pd.DataFrame({s: self.scores[s][metric] for s in (systems or self.systems)})


def load_bench(out_dir: str | os.PathLike, dataset_root: str | os.PathLike | None = None, dataset_kind: str = "auto",
               loader: dict | None = None, systems: Sequence[str] | None = None,
               policy: PublishPolicy | None = None, allow_restricted: bool = False) -> BenchView:
    """Read results.csv and predictions/<system>.csv of a benchmark folder (systems: slugs, default all),
    label and score every study, and find each study's images in `dataset_root` (optional)."""
    from cxpmrg_lib.chapters import publish
    from cxpmrg_lib.bench import read_results
    from cxpmrg_lib.metrics.evaluate import read_predictions
    from cxpmrg_lib.labels.labeler import label_reports

    out_dir = Path(out_dir)
    if not (out_dir / "results.csv").is_file():
        raise FileNotFoundError(f"{out_dir}: no results.csv; run the benchmark first (notebook 04 or cxpmrg bench)")
    results = read_results(out_dir)
    names = dict(zip(results["system"].astype(str), results["name"].astype(str)))
    chosen = list(systems) if systems else list(names)
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"system(s) {unknown} are not in {out_dir / 'results.csv'}; it has {list(names)}")
    if policy is None:
        if dataset_root is None:
            raise ValueError("load_bench needs dataset_root or a publish policy to know what it may show")
        policy = publish.policy(dataset_root, dataset_kind, allow_restricted=allow_restricted)
    frames = {}
    for slug in chosen:
        path = out_dir / "predictions" / f"{slug}.csv"
        frames[slug] = read_predictions(path).set_index("study_id")
    first = frames[chosen[0]]
    for slug, f in frames.items():
        if list(f.index) != list(first.index):
            raise ValueError(f"{out_dir / 'predictions' / (slug + '.csv')}: other test studies than "
                             f"{chosen[0]}.csv; rerun the benchmark")
    references = first["reference"].fillna("")
    ref_labels = label_reports(references.tolist()).set_index(references.index)
    preds = pd.DataFrame({s: f["prediction"].fillna("") for s, f in frames.items()})
    pred_labels, scores = {}, {}
    for slug in chosen:
        pred_labels[slug] = label_reports(preds[slug].tolist()).set_index(preds.index)
        scores[slug] = study_scores(references.tolist(), preds[slug].tolist(), ref_labels.reset_index(drop=True),
                                    pred_labels[slug].reset_index(drop=True)).set_index(preds.index)
    images = {}
    if dataset_root is not None:
        from cxpmrg_lib.stages.studies import split_table

        table = split_table(dataset_root, "test", dataset_kind, None, loader)
        images = {str(s): list(p) for s, p in zip(table["study_id"], table["image_paths"])}
        missing = [s for s in references.index if s not in images]
        if missing:
            log.warning("%d of %d benchmark studies are not in the test split of %s (e.g. %s); their images "
                        "are not shown", len(missing), len(references), dataset_root, missing[:3])
    return BenchView(out_dir=out_dir, systems={s: names[s] for s in chosen}, references=references,
                     predictions=preds, ref_labels=ref_labels, pred_labels=pred_labels, scores=scores,
                     policy=policy, dataset_root=Path(dataset_root) if dataset_root is not None else None,
                     image_paths=images)


def ensure_bench(config) -> Path:
    """The benchmark folder of `config` (bench.bench_dir): reused as it is when its results.csv has rows
    (notebook 04 writes it under its own settings), otherwise the benchmark of `config` is run first."""
    from cxpmrg_lib.bench import bench_dir, read_results, run_bench

    out = bench_dir(config)
    if (out / "results.csv").is_file() and len(read_results(out)):
        log.info("explorer: reusing the benchmark in %s", out)
        return out
    log.info("explorer: no benchmark results in %s yet; running the benchmark", out)
    return run_bench(config)


# ----------------------------------------------------------------------------- choosing studies
def select_cases(view: BenchView, preset: str, n: int = 2, systems: Sequence[str] | None = None,
                 finding: str | None = None, metric: str = "rouge_l") -> list[str]:
    """Study ids for a preset, best first; ties keep test order.

    best: highest mean `metric` over the systems; disagree: largest spread (max - min) of
    `metric` across systems; ce_error: most label errors summed over the systems;
    finding: studies whose reference labels have `finding` positive (in test order).
    """
    systems = list(systems or view.systems)
    if preset == "finding":
        if finding not in CHEXPERT_LABELS:
            raise ValueError(f"finding must be one of {CHEXPERT_LABELS}, not {finding!r}")
        hits = view.ref_labels.index[view.ref_labels[finding] == 1.0]
        return list(hits[:n])
    if preset == "best":
        key = view.score(metric, systems).mean(axis=1)
    elif preset == "disagree":
        s = view.score(metric, systems)
        key = s.max(axis=1) - s.min(axis=1)
    elif preset == "ce_error":
        key = view.score("ce_errors", systems).sum(axis=1)
    else:
        raise ValueError(f"preset must be one of {list(PRESETS) + ['finding']}, not {preset!r}")
    order = np.argsort(-key.to_numpy(dtype=float), kind="stable")
    return [view.study_ids[i] for i in order[:n]]


def findings_present(view: BenchView) -> dict[str, int]:
    """Observations positive in at least one reference, with their study counts."""
    counts = (view.ref_labels == 1.0).sum()
    return {k: int(v) for k, v in counts.items() if v > 0}


# ----------------------------------------------------------------------------- HTML
def _mark(v) -> str:
    if v == 1.0:
        return "+"
    if v == -1.0:
        return "?"
    if v == 0.0:
        return "&minus;"
    return ""


def case_table(view: BenchView, study_id: str, systems: Sequence[str] | None = None) -> pd.DataFrame:
    """The 14 labels of the reference and each system for one study (1 / 0 / -1 / NaN)."""
    systems = list(systems or view.systems)
    cols = {"reference": view.ref_labels.loc[study_id]}
    cols.update({view.systems[s]: view.pred_labels[s].loc[study_id] for s in systems})
    return pd.DataFrame(cols).reindex(CHEXPERT_LABELS)


def _labels_html(view: BenchView, study_id: str, systems: Sequence[str]) -> str:
    table = case_table(view, study_id, systems)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for label, row in table.iterrows():
        ref_pos = row["reference"] == 1.0
        cells = [f"<td>{_mark(row['reference'])}</td>"]
        for c in table.columns[1:]:
            wrong = (row[c] == 1.0) != ref_pos
            style = ' style="background:#f6c6c6"' if wrong else ""
            cells.append(f'<td class="{"cx-wrong" if wrong else ""}"{style}>{_mark(row[c])}</td>')
        rows.append(f"<tr><td style='text-align:left'>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return ('<table class="cx-labels" style="border-collapse:collapse;font-size:85%;text-align:center">'
            f"<tr><th>observation</th>{head}</tr>{''.join(rows)}</table>"
            '<div style="font-size:80%">+ positive, ? uncertain, &minus; negative, blank not mentioned; '
            'red: the system and the reference disagree on a positive (what CE counts).</div>')


def _thumbnail(path: Path, size: int) -> str:
    from PIL import Image

    from cxpmrg_lib.data.images import load_image

    arr = (np.clip(load_image(path, size), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return (f'<img class="cx-image" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" '
            f'width="{size}" height="{size}" alt="radiograph" style="margin-right:6px"/>')


def _scores_line(view: BenchView, slug: str, study_id: str) -> str:
    s = view.scores[slug].loc[study_id]
    return (f"BLEU-4 {s['bleu4']:.3f} &middot; ROUGE-L {s['rouge_l']:.3f} &middot; CE F1 {s['ce_f1']:.3f} "
            f"&middot; label errors {int(s['ce_errors'])}")


def render_case(view: BenchView, study_id: str, systems: Sequence[str] | None = None, thumb: int = 160,
                title: str | None = None) -> str:
    """One study as HTML: images, reference, each system's highlighted report with its scores, labels.

    On a dataset the policy does not allow, only the notice (no text, no image).
    """
    if not view.policy.allowed:
        return notice_html(view.policy, "individual studies (radiographs, reference and generated reports)")
    systems = list(systems or view.systems)
    if study_id not in view.references.index:
        raise KeyError(f"study {study_id!r} is not among the {len(view.references)} benchmark test studies")
    parts = ['<div class="cx-case" style="border:1px solid #ccc;padding:8px;margin:8px 0">',
             f"<h4>{html.escape(title or 'Study')} {html.escape(study_id)}</h4>"]
    paths = view.image_paths.get(study_id, [])
    if paths and view.dataset_root is not None:
        from cxpmrg_lib.data.table import safe_join

        parts.append("<div>" + "".join(_thumbnail(safe_join(view.dataset_root, p), thumb) for p in paths) + "</div>")
    parts.append(f'<p><b>Reference.</b> {html.escape(view.references[study_id])}</p>')
    rows = []
    for slug in systems:
        rows.append(f"<tr><td style='vertical-align:top;white-space:nowrap'><b>{html.escape(view.systems[slug])}"
                    f"</b><br/><span style='font-size:80%'>{_scores_line(view, slug, study_id)}</span></td>"
                    f"<td style='text-align:left'>"
                    f"{highlight_sentences(view.predictions.loc[study_id, slug], view.references[study_id])}</td></tr>")
    parts.append(f'<table class="cx-reports">{"".join(rows)}</table>')
    parts.append(f'<div style="font-size:80%"><span style="background:{EXACT_COLOUR}">green</span>: a sentence '
                 f'of the reference; <span style="background:{CLOSE_COLOUR}">yellow</span>: most of its words '
                 f'are in one sentence of the reference.</div>')
    parts.append("<details open><summary>labels (the study labeller, as CE uses them)</summary>"
                 f"{_labels_html(view, study_id, systems)}</details></div>")
    return "\n".join(parts)


def summary_table(view: BenchView, systems: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean per-study scores per system: an aggregate, shown whatever the policy."""
    systems = list(systems or view.systems)
    rows = {view.systems[s]: view.scores[s].mean() for s in systems}
    out = pd.DataFrame(rows).T
    out["exact sentences (%)"] = [100 * _exact_share(view, s) for s in systems]
    return out.rename(columns={"ce_errors": "label errors / study"}).round(3)


def _exact_share(view: BenchView, slug: str) -> float:
    kinds = [k for sid in view.study_ids
             for _, k in sentence_matches(view.predictions.loc[sid, slug], view.references[sid])]
    return float(np.mean([k == "exact" for k in kinds])) if kinds else 0.0


def gallery(view: BenchView, n: int = 2, systems: Sequence[str] | None = None, thumb: int = 160,
            summary: bool = True) -> str:
    """The static book's view: `n` best, `n` most disputed and `n` worst-labelled studies, as HTML
    (after the table of averaged per-study scores when `summary`).

    Restricted dataset without the opt-in: the aggregate table and the notice only.
    """
    systems = list(systems or view.systems)
    parts = ["<h3>Per-study scores, averaged</h3>", summary_table(view, systems).to_html(classes="cx-summary")] \
        if summary else []
    if not view.policy.allowed:
        return "\n".join(parts + [notice_html(view.policy, "individual studies (radiographs, reference and "
                                                           "generated reports)")])
    shown = set()
    for preset, heading in PRESETS.items():
        picks = [s for s in select_cases(view, preset, n + len(shown), systems) if s not in shown][:n]
        shown.update(picks)
        parts.append(f"<h3>{html.escape(heading.capitalize())}</h3>")
        parts += [render_case(view, s, systems, thumb, title=heading.capitalize() + ": study") for s in picks]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the live browser
class Explorer:
    """The ipywidgets browser: bench folder + dataset, systems, a study (by id, by finding, or a preset)."""

    def __init__(self, view: BenchView, dataset_kind: str = "auto", loader: dict | None = None):
        import ipywidgets as w

        self.view, self._kind, self._loader = view, dataset_kind, loader
        self.bench = w.Text(value=str(view.out_dir), description="bench folder", layout=w.Layout(width="60%"))
        self.dataset = w.Text(value=str(view.dataset_root or ""), description="dataset", layout=w.Layout(width="60%"))
        self.load_button = w.Button(description="load")
        self.systems = w.SelectMultiple(description="systems", rows=min(8, len(view.systems)))
        self.mode = w.Dropdown(description="choose by",
                               options=[("study id", "id"), ("finding", "finding")]
                               + [(v, k) for k, v in PRESETS.items()], value="disagree")
        self.finding = w.Dropdown(description="finding", options=CHEXPERT_LABELS)
        self.study = w.Dropdown(description="study")
        self.output = w.HTML()
        self.status = w.HTML()
        self._fill()
        self.load_button.on_click(lambda _: self.reload())
        for widget in (self.systems, self.mode, self.finding):
            widget.observe(lambda _: self._update_studies(), names="value")
        self.study.observe(lambda _: self._render(), names="value")
        self.widget = w.VBox([w.HBox([self.bench, self.load_button]), self.dataset, self.status,
                              w.HBox([self.systems, w.VBox([self.mode, self.finding, self.study])]), self.output])

    def _fill(self) -> None:
        v = self.view
        self.systems.options = [(name, slug) for slug, name in v.systems.items()]
        self.systems.value = tuple(v.systems)
        present = findings_present(v)
        self.finding.options = [(f"{k} ({n})", k) for k, n in present.items()] or [(k, k) for k in CHEXPERT_LABELS]
        self.status.value = ("" if v.policy.allowed else
                             notice_html(v.policy, "individual studies (radiographs, reference and generated reports)"))
        self._update_studies()

    def chosen_systems(self) -> list[str]:
        return list(self.systems.value) or list(self.view.systems)

    def _update_studies(self) -> None:
        mode = self.mode.value
        self.finding.disabled = mode != "finding"
        if mode == "id":
            ids = self.view.study_ids
        else:
            ids = select_cases(self.view, mode, n=len(self.view.study_ids), systems=self.chosen_systems(),
                               finding=self.finding.value if mode == "finding" else None)
        keep = self.study.value
        self.study.options = ids
        if ids:
            self.study.value = keep if keep in ids and mode == "id" else ids[0]
        self._render()

    def _render(self) -> None:
        if self.study.value is None:
            self.output.value = "<i>no study matches</i>"
            return
        self.output.value = render_case(self.view, self.study.value, self.chosen_systems())

    def reload(self) -> None:
        """Read the bench folder and dataset typed into the text boxes."""
        root = self.dataset.value.strip() or None
        try:
            self.view = load_bench(self.bench.value.strip(), root, self._kind, self._loader,
                                   allow_restricted=self.view.policy.restricted_but_shown,
                                   policy=None if root else self.view.policy)
        except (OSError, ValueError) as e:
            self.status.value = f"<b>could not load:</b> {html.escape(str(e))}"
            return
        self._fill()

    def show(self):
        from IPython.display import display

        display(self.widget)
        return self


def show_explorer(view: BenchView, live: bool, **kwargs):
    """The live browser when `live` (Jupyter with a running kernel); otherwise a line saying how to get it.

    A static book cannot run widgets (they would show as dead boxes), so the book shows the gallery.
    """
    from IPython.display import Markdown, display

    if live:
        return Explorer(view, **kwargs).show()
    display(Markdown("*The interactive browser runs in Jupyter: open this notebook, set `live = True` in its "
                     "parameters cell and run it. The static gallery above shows the same view for selected "
                     "studies.*"))
    return None
