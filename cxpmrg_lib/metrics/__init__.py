"""Report-generation metrics: the suite (NLG + CE + bootstrap CIs, in `suite`), its pieces (`nlg`, `ce`,
`stats`) and `evaluate` (a predictions file scored and written beside it). `from cxpmrg_lib import metrics`
gives the suite's names."""
from cxpmrg_lib.metrics.suite import (CE_HEADLINE_KEYS, CE_KEYS, CONVENTIONS, METEOR_SKIPPED, METRIC_KEYS, NLG_KEYS,
                                      MeteorUnavailable, StudyStats, bootstrap_ci, ce_from_labels, ce_per_label,
                                      ce_scores, close_meteor, compare_stats, nlg_scores, normalize_text,
                                      paired_test, report_scores, score_reports, study_stats)

__all__ = ["METRIC_KEYS", "NLG_KEYS", "CE_KEYS", "CE_HEADLINE_KEYS", "CONVENTIONS", "METEOR_SKIPPED", "StudyStats",
           "study_stats", "nlg_scores", "ce_scores", "ce_from_labels", "ce_per_label", "score_reports", "report_scores",
           "bootstrap_ci", "paired_test", "compare_stats", "MeteorUnavailable", "close_meteor", "normalize_text"]
