"""NLG scorers without the JVM: equality with pycocoevalcap, resampling, text handling, Java errors."""
import random
import sys

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge, my_lcs

from cxpmrg_lib import metrics
from cxpmrg_lib.metrics import nlg

WORDS = ("the heart is normal in size no pleural effusion or pneumothorax mild edema left lower lobe "
         "opacity atelectasis lungs are clear . ,").split()


def corpus(n, seed):
    rnd = random.Random(seed)
    refs = [" ".join(rnd.choices(WORDS, k=rnd.randint(5, 40))) for _ in range(n)]
    hyps = []
    for i, r in enumerate(refs):
        if i % 7 == 0:
            hyps.append("")  # empty prediction
        elif i % 3 == 0:
            hyps.append(r)  # perfect
        else:
            hyps.append(" ".join(rnd.choices(WORDS, k=rnd.randint(1, 40))))
    return refs, hyps


def coco(refs, hyps):
    return {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def test_bleu_cider_rouge_equal_pycocoevalcap_on_the_full_set():
    refs, hyps = corpus(150, 0)
    gts, res = coco(refs, hyps)
    st = metrics.study_stats(refs, hyps, metrics=["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"])
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    # the point estimates
    for k, want in zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleu):
        assert st.values[k] == pytest.approx(want, abs=1e-12)
    assert st.values["cider"] == pytest.approx(cider, abs=1e-12)
    assert st.values["rouge_l"] == pytest.approx(rouge, abs=1e-12)
    # the fast recomputation (identity resample: every study once)
    again = st.resample(np.ones((1, len(refs))))
    for k, want in zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleu):
        assert again[k][0] == pytest.approx(want, abs=1e-6)
    assert again["cider"][0] == pytest.approx(cider, abs=1e-6)
    assert again["rouge_l"][0] == pytest.approx(rouge, abs=1e-6)
    assert st.info["n_empty_predictions"] == 22 and 0 < bleu[3] < 1


def test_bleu_on_a_bootstrap_resample_equals_pycocoevalcap_on_that_resample():
    refs, hyps = corpus(80, 1)
    st = metrics.study_stats(refs, hyps, metrics=["bleu4", "rouge_l"])
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 80, size=80)
    w = np.bincount(idx, minlength=80)[None, :].astype(float)
    fast = st.resample(w)
    gts, res = coco([refs[i] for i in idx], [hyps[i] for i in idx])
    want, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k, v in zip(("bleu1", "bleu2", "bleu3", "bleu4"), want):
        assert fast[k][0] == pytest.approx(v, abs=1e-9)
    assert fast["rouge_l"][0] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert fast["bleu4"][0] != pytest.approx(st.values["bleu4"], abs=1e-6)  # it did resample


def test_lcs_equals_pycocoevalcap():
    rnd = random.Random(0)
    for _ in range(500):
        a = rnd.choices("abcde", k=rnd.randint(0, 25))
        b = rnd.choices("abcdef", k=rnd.randint(0, 25))
        assert nlg.lcs_length(a, b) == my_lcs(a, b) == nlg.lcs_length(b, a)


def test_bleu_from_sums_handles_zero_counts():
    zeros = np.zeros((1, 10))
    zeros[0, 1] = 5  # a reference of 5 words, an empty hypothesis
    assert np.all(nlg.bleu_from_sums(zeros) == 0.0)


def test_normalize_text_rules():
    assert nlg.normalize_text("  The Heart\nis  NORMAL.\r\n\tNo ||| effusion ") == "the heart is normal. no effusion"
    assert nlg.normalize_text(None) == "" and nlg.normalize_text(float("nan")) == ""
    assert nlg.normalize_text(12) == "12" and nlg.normalize_text(1.5) == "1.5"
    assert nlg.normalize_text(b"Edema") == "edema"
    assert nlg.normalize_text("Edema", lowercase=False) == "Edema"


def test_empty_predictions_score_zero_overlap_and_are_counted():
    refs = ["the heart is normal in size .", "no pleural effusion ."]
    st = metrics.study_stats(refs, ["the heart is normal in size .", None],
                             metrics=["bleu1", "rouge_l", "cider"])
    assert st.info["n_empty_predictions"] == 1
    rouge = st.components[1].stats[:, 0]
    assert rouge[0] == pytest.approx(1.0) and rouge[1] == 0.0
    assert st.components[2].stats[1, 0] == 0.0  # CIDEr of the empty one
    bleu = st.components[0].stats
    assert bleu[1, 0] == 0 and bleu[1, 6:].sum() == 0  # no words, no matches


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        metrics.nlg_scores(["a", "b"], ["a"], meteor=False)
    with pytest.raises(ValueError, match="no studies"):
        metrics.nlg_scores([], [], meteor=False)
    with pytest.raises(ValueError, match=r"1 reference report\(s\) are empty or missing \(positions \[1\]\)"):
        metrics.nlg_scores(["a b", "  \n", "c"], ["a", "b", "c"], meteor=False)
    with pytest.raises(TypeError, match="not one string"):
        metrics.nlg_scores("a b", "a b", meteor=False)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.study_stats(["a"], ["a"], metrics=["bleu5"])


def test_meteor_false_is_nan_with_a_note():
    out = metrics.nlg_scores(["no pleural effusion ."], ["no effusion ."], meteor=False)
    assert np.isnan(out["meteor"]) and out["meteor_computed"] is False
    assert out["notes"] == [metrics.METEOR_SKIPPED] and "METEOR not computed" in out["notes"][0]
    assert out["bleu1"] > 0
    ci = metrics.bootstrap_ci(["no pleural effusion .", "heart normal ."], ["no effusion .", "heart ."],
                              n_boot=50, metrics=["meteor", "bleu1"], meteor=False)
    assert np.isnan(ci["meteor"][0]) and ci["bleu1"][0] <= ci["bleu1"][1]


def test_missing_java_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nlg, "JAVA_EXECUTABLE", "no-such-java-for-cxpmrg")
    monkeypatch.setattr(nlg, "_JVM", None)
    with pytest.raises(nlg.MeteorUnavailable, match="apt-get install default-jre-headless") as e:
        metrics.nlg_scores(["no effusion ."], ["no effusion ."], meteor=True)
    assert "not found on PATH" in str(e.value) and "openjdk" in str(e.value) and "--no-meteor" in str(e.value)


def test_a_jar_that_fails_to_start_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nlg, "METEOR_ARGS", ["-jar", "no-such-meteor.jar"])
    with pytest.raises(nlg.MeteorUnavailable, match="did not start.*no-such-meteor.jar"):
        nlg.MeteorJVM()


# A stand-in for the jar that speaks the same stdio protocol: lets the restart logic be
# tested without a 10 s JVM start.
FAKE_JAR = r"""
import sys
for line in sys.stdin:
    parts = line.rstrip("\n").split(" ||| ")
    if parts[0] == "SCORE":
        print(" ".join(["1.0"] * 23), flush=True)
    elif parts[0] == "EVAL":
        for _ in parts[1:]:
            print("0.5", flush=True)
        print("0.25", flush=True)
"""


def test_the_shared_jvm_is_reused_and_restarted_when_it_died(monkeypatch):
    monkeypatch.setattr(nlg, "JAVA_EXECUTABLE", sys.executable)
    monkeypatch.setattr(nlg, "METEOR_ARGS", ["-c", FAKE_JAR])
    monkeypatch.setattr(nlg, "_JVM", None)
    first = nlg.get_meteor()
    try:
        assert nlg.get_meteor() is first  # one per process
        assert first.eval_stats(np.ones((2, 23)))[1] == 0.25
        first._proc.kill()
        first._proc.wait()
        # a request on the dead process restarts it and still answers
        assert first.segment_stats(["a"], ["a"]).shape == (1, 23)
        assert first.alive()
        first._proc.kill()
        first._proc.wait()
        second = nlg.get_meteor()  # a dead singleton is replaced
        assert second is not first and second.alive()
        second.close()
    finally:
        first.close()
