"""NLG metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) through pycocoevalcap 1.2, kept per study.

The paper scores reports with pycocoevalcap's scorers called directly on cleaned,
lower-case text (the R2Gen way: no PTB tokenizer, which needs Java and strips
punctuation). We call the same scorer classes, and keep, besides each corpus score,
the per-study sufficient statistics that let a bootstrap recompute the corpus score on
a resample without re-running the scorers:

* BLEU: per study the hypothesis length, the (closest) reference length and, for n=1..4,
  the n-gram guesses and clipped matches. Corpus BLEU is a function of their sums, so a
  resample is a weighted sum (`bleu_from_sums`), exact to rounding.
* ROUGE-L and CIDEr: pycocoevalcap's corpus value is the mean of per-study scores
  (ROUGE-L with pycocoevalcap's formula and a bit-parallel LCS, tested equal to its own).
  CIDEr's document frequencies (idf) are computed once from the references of the whole
  evaluation set and *not* recomputed per resample: idf describes the reference corpus,
  and recomputing it on a resample with duplicated studies would inflate the DF of their
  n-grams. So a resampled CIDEr is the mean of the fixed per-study scores.
* METEOR: the jar's per-segment statistics (23 additive counts). The jar's corpus score is
  its formula applied to the summed statistics (after it zeroes the chunk count of
  perfectly matched segments, which `segment_stats` reproduces), so a resample is scored
  by sending its summed statistics back to the same JVM (`MeteorJVM.eval_stats`).

Text normalisation (`normalize_text`) is deliberately small because the data layer
already cleans reports (cxpmrg_lib.data.text): missing cells become "", other non-string
cells their `str()`, newlines/tabs/runs of blanks one space, "|||" (METEOR's field
separator) a space, and lower case. Empty strings are scored as they are: in
pycocoevalcap 1.2 an empty hypothesis gives zero BLEU/ROUGE-L/CIDEr/METEOR overlap
without error (tested), so no placeholder token is needed and lengths stay true.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["as_text", "normalize_text", "normalize_texts", "bleu_stats", "bleu_from_sums", "rouge_scores", "lcs_length",
           "cider_scores", "MeteorJVM", "MeteorUnavailable", "get_meteor", "prestart_meteor",
           "close_meteor", "require_java", "meteor_from_stats", "BLEU_STAT_COLUMNS", "JAVA_EXECUTABLE"]

# Which `java` to run; a module attribute so tests can point it at a missing program.
JAVA_EXECUTABLE = "java"
# pycocoevalcap's command line (`java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`) plus two
# JVM options that change only speed: a heap committed up front and the serial collector
# halve the scoring time on a small, busy machine (no heap resizing, no GC threads
# competing for the cores). The scores are the jar's (tests compare with pycocoevalcap's).
METEOR_ARGS = ["-Xmx2G", "-Xms1G", "-XX:+UseSerialGC", "-jar", "meteor-1.5.jar",
               "-", "-", "-stdio", "-l", "en", "-norm"]
JAVA_HELP = ("Install a Java runtime (8 or newer): `sudo apt-get install default-jre-headless` "
             "(Debian/Ubuntu) or `conda install -c conda-forge openjdk`; or skip METEOR with "
             "meteor=False (CLI: --no-meteor), which reports meteor as NaN.")

BLEU_STAT_COLUMNS = ("testlen", "reflen", "guess1", "guess2", "guess3", "guess4",
                     "correct1", "correct2", "correct3", "correct4")


# ---------------------------------------------------------------------------- text
def as_text(x) -> str:
    """A cell as a string: None/NaN/pandas NA -> "", bytes decoded as UTF-8, anything else str(x)."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    try:
        missing = bool(x != x)  # NaN is unequal to itself; pandas NA refuses bool()
    except (TypeError, ValueError):
        missing = True
    return "" if missing else str(x)


def normalize_text(x, lowercase: bool = True) -> str:
    """One cell to the string the scorers see (see the module docstring for the rules)."""
    s = " ".join(as_text(x).replace("|||", " ").split())
    return s.lower() if lowercase else s


def normalize_texts(texts: Sequence, lowercase: bool = True) -> list[str]:
    return [normalize_text(t, lowercase) for t in texts]


# ---------------------------------------------------------------------------- BLEU
def bleu_stats(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[float], np.ndarray]:
    """pycocoevalcap's corpus BLEU-1..4 and the per-study statistics (n x 10, BLEU_STAT_COLUMNS)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for h, r in zip(hyps, refs):
        scorer += (h, [r])
    # Bleu(4).compute_score uses option="closest"; with one reference it is that reference's length.
    score, _ = scorer.compute_score(option="closest", verbose=0)
    stats = np.array([[c["testlen"], min(c["reflen"]), *c["guess"], *c["correct"]]
                      for c in scorer.ctest], dtype=np.float64).reshape(-1, 10)
    return [float(s) for s in score], stats


def bleu_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 (m x 4) from summed per-study statistics (m x 10), as BleuScorer does it."""
    sums = np.atleast_2d(np.asarray(sums, dtype=np.float64))
    tiny, small = 1e-15, 1e-9  # BleuScorer's guards against zero counts
    testlen, reflen = sums[:, 0], sums[:, 1]
    guess, correct = sums[:, 2:6], sums[:, 6:10]
    prod = np.cumprod((correct + tiny) / (guess + small), axis=1)
    bleus = prod ** (1.0 / np.arange(1, 5))
    ratio = (testlen + tiny) / (reflen + small)
    with np.errstate(over="ignore", divide="ignore"):
        brevity = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return bleus * brevity[:, None]


# --------------------------------------------------------------------- ROUGE, CIDEr
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison & Dix 1986): one big-integer update per token of `b`, which
    makes ROUGE-L ~20x faster than pycocoevalcap's O(len(a) * len(b)) Python table; the
    result is the same integer (tested against pycocoevalcap's my_lcs).
    """
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


ROUGE_BETA = 1.2  # pycocoevalcap's Rouge().beta


def rouge_scores(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """Per-study ROUGE-L as pycocoevalcap's Rouge.calc_score computes it (tokens split on " ",
    beta 1.2, same float expressions), with a faster LCS; the corpus value is the mean."""
    beta2 = ROUGE_BETA ** 2
    out = np.zeros(len(hyps), dtype=np.float64)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        token_c, token_r = h.split(" "), r.split(" ")
        lcs = lcs_length(token_r, token_c)
        prec, rec = lcs / float(len(token_c)), lcs / float(len(token_r))
        if prec != 0 and rec != 0:
            out[i] = ((1 + beta2) * prec * rec) / float(rec + beta2 * prec)
    return out


def cider_scores(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """Per-study CIDEr (pycocoevalcap's Cider: n=4, sigma=6, idf from these references)."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for h, r in zip(hyps, refs):
        scorer += (h, [r])
    _, scores = scorer.compute_score()
    return np.asarray(scores, dtype=np.float64)


# ---------------------------------------------------------------------------- METEOR
class MeteorUnavailable(RuntimeError):
    """Java is missing or the METEOR jar does not start; the message says how to fix it."""


def require_java() -> str:
    """The path of `java`, or MeteorUnavailable saying how to install it."""
    java = shutil.which(JAVA_EXECUTABLE)
    if java is None:
        raise MeteorUnavailable(f"METEOR needs Java, and `{JAVA_EXECUTABLE}` was not found on PATH. {JAVA_HELP}")
    return java


def _meteor_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MeteorUnavailable("pycocoevalcap is not installed, so meteor-1.5.jar is missing")
    return Path(list(spec.submodule_search_locations)[0]) / "meteor"


class MeteorJVM:
    """One `java -jar meteor-1.5.jar -stdio` process (pycocoevalcap's command line).

    Starting it costs ~10 s (the paraphrase table), so the module keeps one per process
    (`get_meteor`). Every request holds the instance lock, so threads may share it.
    """

    # SCORE lines are sent in batches so that neither pipe fills up while the other waits.
    BATCH = 128

    def __init__(self):
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._start()

    # -- process
    def _start(self) -> None:
        java = require_java()
        folder = _meteor_dir()
        if not (folder / "meteor-1.5.jar").exists():
            raise MeteorUnavailable(f"{folder / 'meteor-1.5.jar'} is missing (reinstall pycocoevalcap==1.2)")
        self._stderr = tempfile.TemporaryFile()
        log.info("starting the METEOR JVM (%s, about 10 s)", java)
        self._proc = subprocess.Popen([java, *METEOR_ARGS], cwd=folder, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            reply = self._roundtrip(["SCORE ||| a ||| a"])
        except (OSError, EOFError) as e:
            detail = self._stderr_tail()
            self.close()
            raise MeteorUnavailable(f"the METEOR jar did not start ({java} {' '.join(METEOR_ARGS)}): "
                                    f"{e}. Java said: {detail or '(nothing)'}. {JAVA_HELP}") from e
        if len(reply[0].split()) != 23:
            self.close()
            raise MeteorUnavailable(f"unexpected answer from the METEOR jar: {reply[0]!r}")

    def _stderr_tail(self) -> str:
        try:
            if self._proc is not None:
                self._proc.wait(timeout=5)
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace").strip()[-800:]
        except Exception:  # noqa: BLE001 - best effort for an error message
            return ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
                proc.kill()
                proc.wait()
                proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def _roundtrip(self, lines: list[str], n_out: int | None = None) -> list[str]:
        """Write lines, read `n_out` answer lines (default one per line)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EOFError("the METEOR process is not running")
        proc.stdin.write(("\n".join(lines) + "\n").encode("utf-8"))
        proc.stdin.flush()
        out = []
        for _ in range(len(lines) if n_out is None else n_out):
            line = proc.stdout.readline()
            if not line:
                raise EOFError("the METEOR process ended unexpectedly")
            out.append(line.decode("utf-8").strip())
        return out

    def _request(self, lines: list[str], n_out: int | None = None) -> list[str]:
        """A round trip; if the JVM died since the last call, restart it once and retry."""
        with self._lock:
            try:
                return self._roundtrip(lines, n_out)
            except (OSError, EOFError):
                log.warning("the METEOR JVM had stopped; restarting it")
                self.close()
                self._start()
                return self._roundtrip(lines, n_out)

    # -- scoring
    def segment_stats(self, hyps: Sequence[str], refs: Sequence[str], progress: bool = False) -> np.ndarray:
        """Per-segment METEOR statistics (n x 23) for normalised texts (no newlines, no '|||').

        Columns: test/ref length, test/ref function words, 4 match stages x (test content,
        ref content, test function, ref function), chunks, test/ref word matches. All are
        additive, so the statistics of a set of segments are the sum of their rows.
        """
        from cxpmrg_lib.util.progress import tqdm

        lines = [f"SCORE ||| {r} ||| {h}" for h, r in zip(hyps, refs)]
        rows: list[list[float]] = []
        starts = range(0, len(lines), self.BATCH)
        for i in tqdm(starts, desc="METEOR", unit="batch", leave=False, disable=not progress):
            rows.extend([float(v) for v in ans.split()] for ans in self._request(lines[i:i + self.BATCH]))
        stats = np.array(rows, dtype=np.float64).reshape(-1, 23)
        # When the jar scores a segment whose words all match in one chunk, it zeroes that
        # segment's chunk count before adding it to the corpus totals (so such a segment
        # adds no fragmentation penalty). Doing the same here makes the sum of the rows
        # score exactly like the jar's corpus aggregate, and a single row still scores the same.
        perfect = (stats[:, 21] == stats[:, 0]) & (stats[:, 22] == stats[:, 1]) & (stats[:, 20] == 1)
        stats[perfect, 20] = 0.0
        return stats

    def eval_stats(self, stats: np.ndarray) -> tuple[np.ndarray, float]:
        """The jar's score of each row of statistics, and its aggregate over all rows."""
        stats = np.atleast_2d(np.asarray(stats, dtype=np.float64))
        if len(stats) == 0:
            raise ValueError("no METEOR statistics to score")
        fields = " ||| ".join(" ".join(repr(float(v)) for v in row) for row in stats)
        out = self._request([f"EVAL ||| {fields}"], n_out=len(stats) + 1)
        vals = np.array([float(v) for v in out], dtype=np.float64)
        return vals[:-1], float(vals[-1])


_JVM: MeteorJVM | None = None
_JVM_LOCK = threading.Lock()
_ATEXIT = False


def get_meteor() -> MeteorJVM:
    """The process-wide METEOR JVM, started on first use and restarted if it died."""
    global _JVM, _ATEXIT
    with _JVM_LOCK:
        if _JVM is None or not _JVM.alive():
            if _JVM is not None:
                _JVM.close()
                _JVM = None
            _JVM = MeteorJVM()
            if not _ATEXIT:
                atexit.register(close_meteor)
                _ATEXIT = True
        return _JVM


def prestart_meteor() -> None:
    """Start the JVM in a background thread, so its ~10 s overlap the Python scorers.

    Errors are not raised here; the next `get_meteor()` call retries and raises them.
    """
    if (_JVM is not None and _JVM.alive()) or shutil.which(JAVA_EXECUTABLE) is None:
        return  # running already, or no Java: get_meteor() will say so

    def _start():
        try:
            get_meteor()
        except Exception as e:  # noqa: BLE001 - reported again by the caller's get_meteor()
            log.debug("background METEOR start failed: %s", e)

    threading.Thread(target=_start, name="meteor-prestart", daemon=True).start()


def close_meteor() -> None:
    """Stop the shared JVM (registered atexit)."""
    global _JVM
    with _JVM_LOCK:
        if _JVM is not None:
            _JVM.close()
            _JVM = None


def meteor_from_stats(jvm: MeteorJVM, sums: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """METEOR of each row of summed statistics (one resample per row)."""
    sums = np.atleast_2d(sums)
    out = [jvm.eval_stats(sums[i:i + chunk])[0] for i in range(0, len(sums), chunk)]
    return np.concatenate(out) if out else np.zeros(0)

