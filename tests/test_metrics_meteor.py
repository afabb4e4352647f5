"""METEOR through the real jar (one shared JVM for the module, ~10 s to start).

These tests need Java. Where it is missing they FAIL with the install instructions:
METEOR is one of the paper's metrics and must not be skipped silently.
"""
import random
import threading

import numpy as np
import pytest

from cxpmrg_lib import metrics
from cxpmrg_lib.metrics import nlg

REFS = ["the heart is normal in size .", "no pleural effusion .",
        "there is a small left effusion and mild edema .", "lungs are clear ."]
HYPS = ["heart size is normal .", "", "small effusion on the left , edema .",
        "the lungs are clear without focal consolidation ."]
# pycocoevalcap 1.2's Meteor().compute_score on REFS/HYPS (computed once with its own class).
PYCOCO_CORPUS = 0.290279718552673
PYCOCO_SEGMENTS = [0.3691396457784059, 0.0, 0.285590232043181, 0.4022481364398531]


@pytest.fixture(scope="module")
def jvm():
    try:
        return nlg.get_meteor()
    except nlg.MeteorUnavailable as e:
        pytest.fail(f"Java is missing or METEOR does not start, so METEOR cannot be tested: {e}")


def test_meteor_equals_pycocoevalcap(jvm):
    stats = jvm.segment_stats(HYPS, REFS)
    seg, agg = jvm.eval_stats(stats)
    assert agg == pytest.approx(PYCOCO_CORPUS, abs=1e-12)
    np.testing.assert_allclose(seg, PYCOCO_SEGMENTS, atol=1e-12)
    out = metrics.nlg_scores(REFS, HYPS, meteor=True)
    assert out["meteor"] == pytest.approx(PYCOCO_CORPUS, abs=1e-12)
    assert out["meteor_computed"] is True and out["n_empty_predictions"] == 1 and out["notes"] == []
    assert nlg.get_meteor() is jvm  # the same process served both


def _corpus(n, seed):
    rnd = random.Random(seed)
    words = "the heart is normal in size no edema pleural effusion lungs are clear mild left small".split()
    variants = {"effusion": "effusions", "lungs": "lung", "small": "little", "heart": "hearts"}
    refs, hyps = [], []
    for i in range(n):
        r = rnd.choices(words, k=rnd.randint(1, 12))
        kind = i % 5
        h = (list(r) if kind == 0 else [variants.get(w, w) for w in r] if kind == 1
             else rnd.sample(r, len(r)) if kind == 2 else r[:-1] if kind == 3
             else rnd.choices(words, k=rnd.randint(0, 12)))
        refs.append(" ".join(r))
        hyps.append(" ".join(h))
    return refs, hyps


def test_summed_statistics_score_like_the_jar_aggregate(jvm):
    # Perfect segments, stem/synonym-only matches and shuffles all occur here: the sum of
    # the rows must give exactly the jar's own corpus score, on the full set and on a resample.
    refs, hyps = _corpus(300, 0)
    stats = jvm.segment_stats(hyps, refs)
    _, agg = jvm.eval_stats(stats)
    assert jvm.eval_stats(stats.sum(0))[0][0] == pytest.approx(agg, abs=1e-12)
    idx = np.random.default_rng(0).integers(0, 300, size=300)
    w = np.bincount(idx, minlength=300).astype(float)
    resampled = nlg.meteor_from_stats(jvm, (w @ stats)[None])[0]
    _, want = jvm.eval_stats(jvm.segment_stats([hyps[i] for i in idx], [refs[i] for i in idx]))
    assert resampled == pytest.approx(want, abs=1e-12)
    assert resampled != pytest.approx(agg, abs=1e-6)


def test_threads_share_the_jvm(jvm):
    refs, hyps = _corpus(120, 1)
    want = jvm.eval_stats(jvm.segment_stats(hyps, refs))[1]
    got = [None] * 4

    def work(i):
        got[i] = nlg.get_meteor().eval_stats(nlg.get_meteor().segment_stats(hyps, refs))[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 4


def test_meteor_bootstrap_and_paired_test(jvm):
    refs, hyps = _corpus(60, 2)
    ci = metrics.bootstrap_ci(refs, hyps, n_boot=200, metrics=["meteor"])
    point = metrics.nlg_scores(refs, hyps)["meteor"]
    assert ci["meteor"][0] < point < ci["meteor"][1]
    res = metrics.paired_test(refs, refs, hyps, metric="meteor", n_resamples=200)
    assert res["value_a"] == pytest.approx(1.0) and res["delta"] > 0.3 and res["a_better"] and res["p_value"] < 0.01
