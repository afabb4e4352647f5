"""The 14 CheXpert observations from report text, offline, with rules.

Why a rule labeller of our own: the CE metrics of the study need CheXpert labels of
generated reports; the CheXpert labeler (NegBio, Java parsers) and CheXbert (weights
behind a form) do not run offline out of the box. These rules follow the CheXpert
labeler's design (mention phrases, vetoes, negation and uncertainty cues,
aggregation) but are written here; the phrase tables are in `rules`. A
CheXbert checkpoint the user has can be used instead, behind the same function
(`backend="chexbert"`, see `chexbert`).

How a report is labelled:
1. Normalise: lower case; "?" before a word becomes "questionable"; hyphens, slashes
   and underscores become spaces (so "air-space", "and/or", "x-ray" match once).
2. Sentences end at ".", "!", "?", newlines ("3.5 cm" does not end one). Inside a
   sentence a negation or hedge stops at a scope break: "but", "however", "except",
   ";", ":", and a comma or "and" that starts a new statement (", small effusion",
   "and there is"); a comma inside a list does not ("no pneumothorax, effusion, or
   consolidation" negates all three).
3. Each observation has mention phrases (synonyms, abbreviations such as ETT, NGT,
   PICC, CHF), hedged signs (costophrenic blunting -> effusion uncertain; borderline
   heart size -> cardiomegaly uncertain), normal statements ("heart size is normal",
   "normal cardiomediastinal silhouette" -> Cardiomegaly and Enlarged
   Cardiomediastinum 0) and vetoes (pericardial effusion is not a pleural effusion;
   calcified nodule/granuloma, mass effect and bone lesions are not lung lesions).
4. A mention is negative if a negation cue ("no", "without", "free of", "negative
   for", "resolved", "removal of") precedes it in its scope, or a post-cue follows
   it across at most a short list ("pneumothorax has resolved", "the tube has been
   removed", "effusion and consolidation are not seen"); else uncertain if a hedge
   precedes it, sits inside it or follows it ("may", "possible", "likely",
   "concerning for", "cannot be excluded", "versus", "X or Y"); else positive.
   Negation wins over a hedge in its scope ("no opacity to suggest pneumonia" -> 0),
   "no change in" is not a negation, and "cannot exclude"/"not excluded" hedge.
5. Several mentions of one observation aggregate as in CheXpert: positive beats
   uncertain beats negative; no mention -> NaN.
6. No Finding: 1.0 when the text is non-empty and none of the 12 pathology
   observations (all but Support Devices and No Finding) is positive or uncertain;
   else NaN (never 0.0, like CheXbert's two-class No Finding head). "No acute
   cardiopulmonary process" names no observation itself. Empty, None or NaN text
   -> every column NaN, No Finding included: an absent report says nothing.

"The lungs are clear": by default Lung Opacity 0.0 (a clear lung has no opacity; a
radiologist reads it so), and nothing else (consolidation, edema, pneumonia are left
unmentioned, as the sentence does not name them). The CheXpert/CheXbert phrase
practice, which the phantom's labels follow, leaves Lung Opacity blank for it; pass
`clear_lungs_negate=False` to get that.
"""
from __future__ import annotations

import bisect
import logging
import math
import re
from typing import Iterable

import numpy as np
import pandas as pd

from cxpmrg_lib.labels import rules as R
from cxpmrg_lib.data.text import is_blank
from cxpmrg_lib.data.observations import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

log = logging.getLogger(__name__)

__all__ = ["CHEXPERT_LABELS", "label_reports", "label_report", "normalise", "clear_cache"]

_PATHOLOGIES = CHEXPERT_LABELS[:12]          # all but Support Devices and No Finding
_OBSERVATIONS = CHEXPERT_LABELS[:13]         # the ones with phrases


def _alt(patterns: list[str]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


# One combined regex per observation: named groups tell the kind of phrase found.
def _observation_regex(obs: str) -> re.Pattern:
    parts = []
    for kind, table in (("normal", R.NORMAL), ("hedged", R.HEDGED), ("mention", R.MENTIONS)):
        pats = table.get(obs, [])
        if pats:
            parts.append(f"(?P<{kind}>" + "|".join(f"(?:{p})" for p in pats) + ")")
    return re.compile("|".join(parts))


_OBS_RE = {o: _observation_regex(o) for o in _OBSERVATIONS}
_VETO_RE = {o: _alt(R.VETOES.get(o, [])) for o in _OBSERVATIONS}
_NEG_PRE = _alt(R.NEG_PRE)
_NEG_POST = _alt(R.NEG_POST)
_UNC_PRE = _alt(R.UNC_PRE)
_UNC_POST = _alt(R.UNC_POST)
_PSEUDO = _alt(R.PSEUDO_NEG)
_BREAK = _alt(R.SCOPE_BREAK)
_COMMA_BREAK = _alt(R.COMMA_BREAK)
# Descriptors that also start items of a negated list: a comma before them breaks the
# scope only if no "or"/"nor" follows in the sentence.
_LIST_WORDS = frozenset("small mild moderate large severe minimal trace tiny new focal patchy left right "
                        "bilateral linear streaky subtle increased increasing".split())
_OR_NOR = re.compile(r"\b(?:or|nor)\b")
_NEXT_WORD = re.compile(r" ?([a-z]+)")
_SENT_END = re.compile(r"\.(?!\d)|[!?\n]")
_OR_BEFORE = re.compile(r"\bor (?:\w+ )?$")
_OR_AFTER = re.compile(r"^,? (?:\w+ )?or\b(?! less)")
_WORD = re.compile(r"[a-z]+")
# Words that end a list between a mention and a post-cue: a new clause has started.
_CLAUSE_WORDS = frozenset("is are was were there with which has have had but seen noted no not without "
                          "new small mild moderate large".split())

_Q_MARK = re.compile(r"(^|[\s(,])\?\s*(?=[a-z])")
_SEPARATORS = re.compile(r"[-_/]+")
_SPACES = re.compile(r"[ \t\r\f\v]+")


def normalise(text: str) -> str:
    """Lower case, '?word' -> 'questionable word', hyphens/slashes -> spaces, single spaces."""
    t = text.lower()
    t = _Q_MARK.sub(r"\1questionable ", t)
    t = _SEPARATORS.sub(" ", t)
    return _SPACES.sub(" ", t)


def _spans(rx: re.Pattern, t: str) -> list[tuple[int, int]]:
    return [m.span() for m in rx.finditer(t)]


def _drop_overlapping(spans, blockers):
    if not blockers:
        return spans
    return [s for s in spans if not any(s[0] < b[1] and b[0] < s[1] for b in blockers)]


class _Cues:
    """Cue positions of one normalised report, found once and queried per mention."""

    __slots__ = ("t", "ends", "breaks", "break_starts", "break_ends", "neg_pre", "neg_post", "unc_pre", "unc_post")

    def __init__(self, t: str):
        self.t = t
        self.ends = [m.start() for m in _SENT_END.finditer(t)]
        self.breaks = _spans(_BREAK, t)
        for m in _COMMA_BREAK.finditer(t):
            w = _NEXT_WORD.match(t, m.end())
            if w and w.group(1) in _LIST_WORDS:
                k = bisect.bisect_left(self.ends, m.end())
                end = self.ends[k] if k < len(self.ends) else len(t)
                if _OR_NOR.search(t, m.end(), end):
                    continue
            self.breaks.append(m.span())
        self.break_ends = sorted(b[1] for b in self.breaks)
        self.break_starts = sorted(b[0] for b in self.breaks)
        unc_pre, unc_post = _spans(_UNC_PRE, t), _spans(_UNC_POST, t)
        blockers = _spans(_PSEUDO, t) + unc_pre + unc_post
        self.neg_pre = _drop_overlapping(_spans(_NEG_PRE, t), blockers)
        self.neg_post = _drop_overlapping(_spans(_NEG_POST, t), blockers)
        self.unc_pre, self.unc_post = unc_pre, unc_post

    def window(self, ms: int, me: int) -> tuple[int, int]:
        """[left, right) of the scope a mention at [ms, me) lives in."""
        i = bisect.bisect_left(self.ends, ms)
        left = self.ends[i - 1] + 1 if i > 0 else 0
        j = bisect.bisect_left(self.ends, me)
        right = self.ends[j] if j < len(self.ends) else len(self.t)
        k = bisect.bisect_right(self.break_ends, ms)
        if k > 0:
            left = max(left, self.break_ends[k - 1])
        k = bisect.bisect_left(self.break_starts, me)
        if k < len(self.break_starts):
            right = min(right, self.break_starts[k])
        return left, right

    def _post_cue(self, spans, me: int, right: int, max_words: int = 8, commas: bool = True) -> bool:
        """A post-cue governs the mention if only a short list lies between them."""
        for s, e in spans:
            if s >= me and e <= right:
                between = self.t[me:s]
                if not commas and "," in between:
                    return False
                words = _WORD.findall(between)
                return len(words) <= max_words and not any(w in _CLAUSE_WORDS for w in words)
        return False

    def classify(self, ms: int, me: int, kind: str) -> float:
        if kind == "normal":
            return NEGATIVE
        left, right = self.window(ms, me)
        if any(s >= left and e <= ms for s, e in self.neg_pre) or self._post_cue(self.neg_post, me, right):
            return NEGATIVE
        if (kind == "hedged"
                or any(s >= left and e <= me for s, e in self.unc_pre)      # before it or inside it
                or self._post_cue(self.unc_post, me, right, max_words=5, commas=False)
                or _OR_BEFORE.search(self.t, left, ms) is not None
                or _OR_AFTER.match(self.t[me:right]) is not None):
            return UNCERTAIN
        return POSITIVE


_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
_FROM_RANK = {r: v for v, r in _RANK.items()}


def _label_sentence(t: str, clear_lungs_negate: bool, use_triggers: bool) -> tuple:
    """Values of the 13 observations (NaN = not mentioned) in one normalised sentence."""
    out = [math.nan] * len(_OBSERVATIONS)
    cues = None
    for j, obs in enumerate(_OBSERVATIONS):
        if use_triggers and not any(w in t for w in R.TRIGGERS[obs]):
            continue
        found = [(m.start(), m.end(), m.lastgroup) for m in _OBS_RE[obs].finditer(t)]
        if not found:
            continue
        veto = _VETO_RE[obs]
        vetoed = _spans(veto, t) if veto is not None else []
        best = None
        for ms, me, kind in found:
            if vetoed and any(ms < ve and vs < me for vs, ve in vetoed):
                continue
            if kind == "normal" and obs == "Lung Opacity" and not clear_lungs_negate:
                continue
            if cues is None:
                cues = _Cues(t)
            v = cues.classify(ms, me, kind)
            if best is None or _RANK[v] > _RANK[best]:
                best = v
                if v == POSITIVE:
                    break
        if best is not None:
            out[j] = best
    return tuple(out)


# Reports repeat sentences a lot ("No pneumothorax.", "Heart size is normal."); every
# rule is local to a sentence, so labels are cached per sentence.
_SENTENCE_CACHE: dict = {}
_SENTENCE_CACHE_MAX = 200_000


def clear_cache() -> None:
    """Forget cached sentence labels (for timing; labels do not depend on the cache)."""
    _SENTENCE_CACHE.clear()


def label_report(text, clear_lungs_negate: bool = True, use_triggers: bool = True) -> dict[str, float]:
    """Labels of one report: {observation: 1.0 | 0.0 | -1.0 | nan} for the 14 CHEXPERT_LABELS.

    `use_triggers=False` scans every observation's regex even when none of its trigger
    substrings occurs (same labels, slower; for testing the shortcut)."""
    out = {k: math.nan for k in CHEXPERT_LABELS}
    if is_blank(text):
        return out
    best = [0] * len(_OBSERVATIONS)
    for sent in _SENT_END.split(normalise(str(text))):
        sent = sent.strip()
        if not sent:
            continue
        key = (sent, clear_lungs_negate, use_triggers)
        vals = _SENTENCE_CACHE.get(key)
        if vals is None:
            vals = _label_sentence(sent, clear_lungs_negate, use_triggers)
            if len(_SENTENCE_CACHE) >= _SENTENCE_CACHE_MAX:
                _SENTENCE_CACHE.clear()
            _SENTENCE_CACHE[key] = vals
        for j, v in enumerate(vals):
            if v == v and _RANK[v] > best[j]:
                best[j] = _RANK[v]
    for j, obs in enumerate(_OBSERVATIONS):
        if best[j]:
            out[obs] = _FROM_RANK[best[j]]
    if not any(out[k] in (POSITIVE, UNCERTAIN) for k in _PATHOLOGIES):
        out["No Finding"] = POSITIVE
    return out


def label_reports(texts: Iterable, backend: str = "rules", checkpoint=None, tokenizer=None,
                  clear_lungs_negate: bool = True, **backend_kwargs) -> pd.DataFrame:
    """Label reports with the 14 CheXpert observations.

    Returns a DataFrame with the columns CHEXPERT_LABELS (CheXbert order), row i for
    texts[i] (index 0..n-1), values 1.0 positive, 0.0 negative, -1.0 uncertain, NaN not
    mentioned. backend="rules" (default) needs nothing; backend="chexbert" needs a local
    CheXbert checkpoint (`checkpoint`, a .pth file) and a local bert-base-uncased
    tokenizer folder (`tokenizer`), see `chexbert.label_reports_chexbert`.
    `clear_lungs_negate` (rules only): whether "the lungs are clear" makes Lung Opacity 0.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("label_reports takes a sequence of reports, not one string; wrap it in a list")
    texts = list(texts)
    if backend == "rules":
        if checkpoint is not None:
            raise ValueError("checkpoint is only used with backend='chexbert'")
        rows = [label_report(t, clear_lungs_negate=clear_lungs_negate) for t in texts]
        arr = np.array([[r[k] for k in CHEXPERT_LABELS] for r in rows], dtype=float).reshape(len(rows), len(CHEXPERT_LABELS))
        return pd.DataFrame(arr, columns=list(CHEXPERT_LABELS))
    if backend == "chexbert":
        from cxpmrg_lib.labels.chexbert import label_reports_chexbert
        return label_reports_chexbert(texts, checkpoint=checkpoint, tokenizer=tokenizer, **backend_kwargs)
    raise ValueError(f"unknown labeller backend {backend!r}; use 'rules' or 'chexbert'")


def fill_labels(table: pd.DataFrame, column: str = "report", **kwargs) -> pd.DataFrame:
    """A copy of a study table whose unknown labels are filled by `label_reports(table[column])`.

    Sources without labels (R2Gen annotation trees, Open-i) get the 14 columns from the
    report text; labels a source already has (CheXbert files) are kept as they are.
    """
    out = table.copy()
    labels = label_reports(out[column].tolist(), **kwargs)
    labels.index = out.index
    for name in CHEXPERT_LABELS:
        if name in out.columns:
            out[name] = out[name].astype(float).where(out[name].notna(), labels[name])
        else:
            out[name] = labels[name]
    return out
