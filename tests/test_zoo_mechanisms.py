"""The mechanism systems (PromptMRG-, TIMER-, M2KT-, XProNet-, WCL- and R2GenCSR-style): each test checks the
mechanism that defines its system, not only that it runs; plus cached decoding of the conditioned
Transformer and the registry's view of them (Table 1 rows, `all`)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer
from cxpmrg_lib.models.zoo.label_knowledge import M2KTStyle
from cxpmrg_lib.models.zoo.label_prompts import (LogitAdjustedClassifier, PromptMRGStyle, label_states,
                                                 state_log_prior)
from cxpmrg_lib.models.zoo.prototypes import SharedPrototypes, XProNetStyle
from cxpmrg_lib.models.zoo.transformer import TransformerConfig, TransformerReportModel
from cxpmrg_lib.models.zoo.unlikelihood import TIMERStyle, frequent_tokens, unlikelihood_loss
from cxpmrg_lib.models.zoo.weak_contrastive import WCLStyle, cluster_reports, supervised_contrastive_loss

REPORTS = ["the heart is enlarged. small left effusion.", "the heart is normal. no effusion."]
SMALL = TransformerConfig(image_size=32, d_model=32, encoder_layers=1, decoder_layers=2, heads=2, ff=64, dropout=0.0,
                          visual_widths=(8, 16))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops one after another: a second thread only adds synchronisation on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vocab() -> WordVocab:
    return WordVocab.build(REPORTS * 2, min_count=1)


def _states(*positive: int) -> torch.Tensor:
    """(1, 14) states: the given observations positive, every other one negative."""
    s = torch.full((1, 14), 2, dtype=torch.long)
    s[0, list(positive)] = 1
    return s


def _prompt_model(seed: int = 0) -> PromptMRGStyle:
    torch.manual_seed(seed)
    prior = state_log_prior(label_states(np.array([[1.0] * 14, [0.0] * 14, [np.nan] * 14, [-1.0] * 14])))
    return PromptMRGStyle(_vocab(), SMALL, max_tokens=12, typical_tokens=8, log_prior=prior)


def _force_prediction(model: PromptMRGStyle, states: torch.Tensor) -> None:
    """Make the classifier predict `states` (1, 14) whatever the image."""
    with torch.no_grad():
        model.classifier.head.weight.zero_()
        bias = torch.full((14, 4), -5.0)
        bias[torch.arange(14), states[0]] = 5.0
        model.classifier.head.bias.copy_(bias.view(-1))


# ----------------------------------------------------------------------------- PromptMRG-style

def test_label_states_follow_the_study_table_and_refuse_other_values():
    states = label_states(np.array([[1.0, 0.0, -1.0, np.nan]]))
    assert states.tolist() == [[1, 2, 3, 0]]                   # positive, negative, uncertain, blank
    with pytest.raises(ValueError, match="1, 0, -1 or NaN"):
        label_states(np.array([[2.0]]))


def test_logit_adjustment_shifts_rare_states_down_and_balances_an_uninformative_fit():
    states = torch.tensor([[0]] * 90 + [[1]] * 10)             # one label, state 1 rare (10%)
    prior = state_log_prior(states, num_states=2, smoothing=0.0)
    torch.testing.assert_close(prior.exp(), torch.tensor([[0.9, 0.1]]))
    head = LogitAdjustedClassifier(4, prior, tau=1.0)
    raw = torch.zeros(3, 1, 2)
    shift = head.adjusted(raw) - raw
    torch.testing.assert_close(shift, prior.expand(3, 1, 2))    # + tau * log prior, as specified
    assert shift[0, 0, 1] < shift[0, 0, 0]                     # the rare state is pushed down further
    torch.testing.assert_close(LogitAdjustedClassifier(4, prior, tau=0.5).adjusted(raw), 0.5 * prior.expand(3, 1, 2))
    # features that say nothing: the plain loss learns the prior, the adjusted one balanced raw logits,
    # so that the rare state is predicted as readily as the common one
    fitted = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        head = LogitAdjustedClassifier(4, prior, tau=tau)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(300):
            loss = head.loss(head(torch.zeros(100, 4)), states)
            opt.zero_grad()
            loss.backward()
            opt.step()
        fitted[tau] = head(torch.zeros(1, 4)).softmax(-1)[0, 0]
    torch.testing.assert_close(fitted[0.0], torch.tensor([0.9, 0.1]), atol=0.02, rtol=0)
    torch.testing.assert_close(fitted[1.0], torch.tensor([0.5, 0.5]), atol=0.02, rtol=0)


def test_prompt_tokens_follow_the_predicted_states_and_change_the_decoder_output():
    model = _prompt_model().eval()
    images = torch.randn(1, 1, 1, 32, 32)
    tokens = _vocab().batch(REPORTS[:1], 12)[:, :-1]
    outputs = {}
    for case, states in (("cardiomegaly", _states(1)), ("effusion", _states(9))):
        _force_prediction(model, states)
        with torch.no_grad():
            memory, prefix, _ = model.encode(images, None)
            assert model.classifier.predict(model.classifier(memory.mean(1))).tolist() == states.tolist()
            torch.testing.assert_close(prefix, model.prompt(states))          # one token per observation
            outputs[case] = (memory, prefix, model.logits((memory, prefix, None), tokens).softmax(-1))
    (m1, p1, out1), (m2, p2, out2) = outputs["cardiomegaly"], outputs["effusion"]
    torch.testing.assert_close(m1, m2)                          # the image memory is the same ...
    changed = (p1 - p2).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1, 9]      # ... only the two changed observations' prompts differ
    assert (out1 - out2).abs().amax() > 1e-3                   # and the decoder's next-word distribution follows them


def test_training_reads_the_given_prompt_and_the_report_follows_the_prediction():
    """Two studies with the same image whose reports differ only by their findings: trained on the prompts of
    their labels, the model writes whichever report the classifier's prediction says."""
    model = _prompt_model()
    images = torch.zeros(2, 1, 1, 32, 32)
    states = torch.cat([_states(1, 9), _states()])
    with pytest.raises(ValueError, match="targets"):
        model(images, None, REPORTS)                           # training needs the labels
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        out = model(images, None, REPORTS, targets=states)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["report_loss"] < 0.05 and "label_loss" in out
    for i, report in enumerate(REPORTS):
        _force_prediction(model, states[i:i + 1])
        assert model.generate(images[:1], None, num_beams=2, min_new_tokens=1, max_new_tokens=12) == [report]


# ----------------------------------------------------------------------------- TIMER-style

def test_frequent_tokens_and_the_unlikelihood_penalty_by_hand():
    vocab = WordVocab(["a", "b", "c"])                         # ids 4, 5, 6
    assert frequent_tokens(vocab, ["a a a b", "a c"], share=0.3).tolist() == [4]           # a: 4 of 6
    assert frequent_tokens(vocab, ["a a a b", "a c"], share=0.1).tolist() == [4, 5, 6]
    logits = torch.log(torch.tensor([[[0.1, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1],
                                      [0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.1]]]))
    targets = torch.tensor([[4, 6]])                            # position 0 writes "a" itself: not penalised
    loss = unlikelihood_loss(logits, targets, torch.tensor([4, 5]), ignore_index=0)
    expected = (-math.log(1 - 0.1) + (-math.log(1 - 0.2) - math.log(1 - 0.3))) / 2
    assert abs(loss.item() - expected) < 1e-5
    assert unlikelihood_loss(logits, torch.tensor([[0, 0]]), torch.tensor([4]), ignore_index=0) == 0


def test_unlikelihood_lowers_the_probability_of_the_penalised_tokens():
    """The same network, the same steps from the same start: with the penalty the frequent words get less
    probability where they are not the word to write than with cross-entropy alone."""
    vocab = _vocab()
    penalised = frequent_tokens(vocab, REPORTS, share=0.1)
    assert {vocab.itos[i] for i in penalised.tolist()} == {".", "the", "heart", "is", "effusion"}
    images = torch.randn(2, 1, 1, 32, 32)
    ids = vocab.batch(REPORTS, 12)
    targets = ids[:, 1:]
    elsewhere = (targets != vocab.pad) & ~torch.isin(targets, penalised)
    mass = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = TIMERStyle(vocab, SMALL, 12, 8, penalised, weight=weight)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(15):
            out = model(images, None, REPORTS)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        assert bool(out["unlikelihood"] > 0) == (weight > 0)
        with torch.no_grad():
            probs = model.eval().logits(model.encode(images, None), ids[:, :-1]).softmax(-1)
        mass[weight] = probs[..., penalised].sum(-1)[elsewhere].mean().item()
    assert mass[1.0] < 0.8 * mass[0.0], mass


# ----------------------------------------------------------------------------- M2KT-style

def test_the_decoder_memory_carries_the_predicted_label_knowledge():
    torch.manual_seed(0)
    model = M2KTStyle(_vocab(), SMALL, 12, 8).eval()
    images = torch.randn(1, 1, 1, 32, 32)
    tokens = _vocab().batch(REPORTS[:1], 12)[:, :-1]
    results = []
    for bias in (-4.0, 4.0):
        with torch.no_grad():
            model.classifier.bias.fill_(bias)
            state = model.encode(images, None)
            results.append((state[0], model.logits(state, tokens).softmax(-1)))
    (low, out_low), (high, out_high) = results
    assert low.shape == (1, 16 + 14, 32)                        # 4x4 image tokens + 14 knowledge tokens
    torch.testing.assert_close(low[:, :16], high[:, :16])       # the image part does not move
    probs = torch.sigmoid(model.classifier(model.features(images, None).mean(1)))
    torch.testing.assert_close(high[0, 16:], probs[0, :, None] * model.knowledge.embeddings)
    assert (high[:, 16:] - low[:, 16:]).abs().amax() > 0.5
    assert (out_high - out_low).abs().amax() > 1e-4             # what the decoder writes depends on them
    model.train()
    out = model(images, None, REPORTS[:1], targets=torch.ones(1, 14))
    assert out["label_loss"] > 0 and torch.isclose(out["loss"], out["report_loss"] + out["label_loss"])


# ----------------------------------------------------------------------------- XProNet-style

def test_one_prototype_matrix_gets_gradient_from_the_image_and_from_the_text():
    torch.manual_seed(0)
    model = XProNetStyle(_vocab(), SMALL, 12, 8, per_group=2)
    protos = [p for n, p in model.named_parameters() if "prototype" in n and p.ndim == 2 and p.shape[0] == 28]
    assert len(protos) == 1 and protos[0] is model.prototypes.prototypes   # one matrix for both modalities
    images = torch.randn(2, 1, 1, 32, 32)
    memory, _, probs = model.encode(images, None)
    memory.square().sum().backward()                            # the image path alone
    image_grad = model.prototypes.prototypes.grad.clone()
    model.zero_grad()
    tokens = _vocab().batch(REPORTS, 12)[:, :-1]
    model.embed_words(tokens, (None, None, probs.detach())).square().sum().backward()   # the text path alone
    text_grad = model.prototypes.prototypes.grad.clone()
    assert image_grad.abs().sum() > 0 and text_grad.abs().sum() > 0
    assert not torch.allclose(image_grad, text_grad)


def test_prototype_groups_answer_by_the_predicted_findings():
    torch.manual_seed(0)
    memory = SharedPrototypes(groups=3, per_group=2, dim=8)
    x = torch.randn(1, 5, 8)
    only_first = memory(x, torch.tensor([[1.0, 0.0, 0.0]]))    # the other groups at min_prob
    with torch.no_grad():
        keys, values = memory.key(memory.prototypes[:2]), memory.value(memory.prototypes[:2])
        weights = torch.softmax(memory.query(x) @ keys.T / math.sqrt(8), dim=-1)
        by_hand = memory.out(weights @ values)
    torch.testing.assert_close(only_first, by_hand, atol=5e-3, rtol=0)
    assert (memory(x, torch.tensor([[0.0, 0.0, 1.0]])) - only_first).abs().amax() > 1e-2


# ----------------------------------------------------------------------------- WCL-style

def test_supervised_contrastive_loss_is_lower_when_clusters_are_tight():
    torch.manual_seed(0)
    clusters = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = F.normalize(torch.randn(3, 16), dim=-1)
    noise = torch.randn(6, 16)
    tight = F.normalize(centres[clusters] + 0.1 * noise, dim=-1)
    loose = F.normalize(centres[clusters] + 2.0 * noise, dim=-1)
    assert supervised_contrastive_loss(tight, clusters) < supervised_contrastive_loss(loose, clusters) - 0.5
    assert supervised_contrastive_loss(tight, torch.arange(6)) == 0     # no anchor has a positive: nothing to pull
    # the same embeddings under other cluster ids: the loss rises when "positives" are far apart
    assert supervised_contrastive_loss(tight, torch.tensor([0, 1, 2, 0, 1, 2])) > supervised_contrastive_loss(tight, clusters)


def test_reports_cluster_by_their_words_and_the_loss_trains_the_image_side():
    reports = ["no effusion . heart normal ."] * 3 + ["large left effusion . heart enlarged ."] * 3
    ids = cluster_reports(reports, 2, seed=0)
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    torch.manual_seed(0)
    model = WCLStyle(_vocab(), SMALL, 12, 8)
    out = model(torch.randn(6, 1, 1, 32, 32), None, REPORTS * 3, targets=torch.from_numpy(ids))
    assert out["contrastive"] > 0
    out["loss"].backward()
    assert model.visual.proj.weight.grad.abs().sum() > 0 and model.projection[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- R2GenCSR-style

@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, build_report_lm, train_bpe_tokenizer

    tok = train_bpe_tokenizer(REPORTS * 4, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    lm = build_report_lm(ReportLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                        max_position=128), tok)
    return VisualPrefixLM(lm, tok, 24, prompt="<Img><ImageHere></Img>", typical_report_tokens=8)


def test_the_lm_reads_residuals_against_the_retrieved_contexts_and_stays_frozen(tiny_head):
    from cxpmrg_lib.models.zoo.context_residual import ContextResidualLM

    torch.manual_seed(0)
    bank = torch.randn(10, 3, 8)
    normal = torch.tensor([True] * 5 + [False] * 5)
    model = ContextResidualLM(tiny_head, bank, normal, contexts=2)
    query = bank[:1] + 0.01 * torch.randn(1, 3, 8)             # nearly bank study 0 (normal)
    sims = F.normalize(query.mean(1), dim=-1) @ F.normalize(bank.mean(1), dim=-1).T
    near_normal = sims[0, :5].topk(2).indices
    near_abnormal = sims[0, 5:].topk(2).indices + 5
    seen = model.visual_tokens(query)
    assert seen.shape == (1, 3, 24)                             # as many positions as the study has tokens
    torch.testing.assert_close(seen[..., :8], query)
    torch.testing.assert_close(seen[..., 8:16], query - bank[near_normal].mean(0, keepdim=True))
    torch.testing.assert_close(seen[..., 16:], query - bank[near_abnormal].mean(0, keepdim=True))
    # a study is never its own context in training
    excluded = model.context(query, exclude=torch.tensor([0]))[0]
    assert 0 in near_normal.tolist() and not torch.allclose(excluded, bank[near_normal].mean(0, keepdim=True))
    # other context samples: the same study's tokens, other residuals
    other = ContextResidualLM(tiny_head, bank + torch.randn_like(bank), normal, contexts=2)
    moved = other.visual_tokens(query)
    torch.testing.assert_close(moved[..., :8], seen[..., :8])
    assert (moved[..., 8:] - seen[..., 8:]).abs().amax() > 0.1
    # the LM is frozen: training reaches the projection only
    model.train()
    loss = model(query, None, REPORTS[:1])["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.head.lm.parameters())
    assert model.head.proj.weight.grad.abs().sum() > 0
    assert not any(k.startswith("head.lm.") or k.startswith("bank") for k in model.state_dict())
    assert len(model.generate(query, None, num_beams=1, max_new_tokens=4)) == 1
    with pytest.raises(ValueError, match="normal studies"):
        ContextResidualLM(tiny_head, bank, torch.tensor([True] * 2 + [False] * 8), contexts=2)
    with pytest.raises(ValueError, match="12-wide tokens .* not 24"):
        ContextResidualLM(tiny_head, bank[..., :4], normal, contexts=2)


# ----------------------------------------------------------------------------- shared

@pytest.mark.parametrize("make", [
    lambda v: _prompt_model(),
    lambda v: M2KTStyle(v, SMALL, 12, 8),
    lambda v: XProNetStyle(v, SMALL, 12, 8, per_group=2),
    lambda v: TIMERStyle(v, SMALL, 12, 8, torch.tensor([4, 5])),
    lambda v: WCLStyle(v, SMALL, 12, 8),
], ids=["promptmrg", "m2kt", "xpronet", "timer", "wcl"])
def test_cached_decoding_equals_full_recompute(make, monkeypatch):
    torch.manual_seed(0)
    model = make(_vocab()).eval()
    images = torch.randn(2, 1, 1, 32, 32)
    tokens = torch.randint(4, len(_vocab()), (2, 9))
    tokens[:, 0] = WordVocab.bos
    with torch.no_grad():
        state = model.encode(images, None)
        full = model.logits(state, tokens)
        cache = None
        for t in range(1, tokens.shape[1] + 1):
            step, cache = model.decode_step(state, tokens[:, :t], cache)
            torch.testing.assert_close(step, full[:, t - 1], rtol=0, atol=1e-5, msg=f"position {t - 1}")
        prefix = 0 if state[1] is None else state[1].shape[1]
        assert cache[0].shape[1] == prefix + tokens.shape[1]   # the prefix's layer inputs are cached too
    kwargs = dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=3, max_new_tokens=8)
    cached = model.generate(images, None, **kwargs)
    monkeypatch.delattr(ConditionedTransformer, "decode_step")
    monkeypatch.delattr(TransformerReportModel, "decode_step")
    assert not hasattr(model, "decode_step")
    assert model.generate(images, None, **kwargs) == cached


def test_the_registry_names_twelve_systems_each_table1_row_and_all():
    from cxpmrg_lib.bench import (ALL, DEFAULT_SYSTEMS, SYSTEMS, beside_paper, cost_table, notebook_config,
                                  paper_table1)
    from cxpmrg_lib.bench.run import RUNNERS

    beyond = [s for s in SYSTEMS.values() if s.family not in ("floor",) and "w/o" not in s.name
              and "label step" not in s.name]
    assert len(beyond) >= 12
    assert {"promptmrg", "timer", "m2kt", "xpronet", "wcl", "r2gencsr"} <= set(SYSTEMS)
    assert all(s.kind in RUNNERS for s in SYSTEMS.values())
    table1 = paper_table1()
    assert all(s.table1 in table1.index for s in SYSTEMS.values() if s.table1)
    assert {"promptmrg", "timer"} <= set(DEFAULT_SYSTEMS) and not {"m2kt", "xpronet", "wcl", "r2gencsr"} & set(DEFAULT_SYSTEMS)
    assert notebook_config("x", systems=ALL).systems == list(SYSTEMS)
    with pytest.raises(ValueError, match="goes alone"):
        notebook_config("x", systems="all,r2gen")
    # the paper's row beside ours, labelled as the paper's
    results = pd.DataFrame({"system": ["promptmrg", "transformer"], "name": [SYSTEMS["promptmrg"].name,
                                                                            SYSTEMS["transformer"].name],
                            "family": "encoder-decoder", "ce_f1": [0.5, 0.4], "total_m": [3.0, 2.9],
                            "train_min": [2.0, 1.8]})
    shown = beside_paper(pd.DataFrame({"ce_f1": ["0.500", "0.400"]}, index=results["name"]), results)
    assert list(shown.index) == [SYSTEMS["promptmrg"].name, "PromptMRG (paper, CheXpert Plus)",
                                 SYSTEMS["transformer"].name]
    assert shown.iloc[1]["ce_f1"] == "<i>0.281</i>"
    cost = cost_table(results)
    assert cost.loc[SYSTEMS["promptmrg"].name, "train_min (paper, CheXpert Plus)"] == 108.45
    assert cost.loc[SYSTEMS["promptmrg"].name, "params_m (paper, CheXpert Plus)"] == 219.92
    assert math.isnan(cost.loc[SYSTEMS["transformer"].name, "params_m (paper, CheXpert Plus)"])
