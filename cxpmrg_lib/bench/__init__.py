"""The benchmark (CXPMRG-Bench here): every report generator through one protocol.

The protocol, the same for every system:

* data: the dataset's train / val / test split (the 70/10/20 patient split on CheXpert Plus
  trees; R2Gen trees keep theirs), reports as the data layer cleans them, up to two views per
  study averaged by each model;
* training budget: every trained system gets the preset's stage-3 budget (epochs, batch size,
  peak learning rate, warm-up and cosine schedule, seed) and the same checkpoint selection
  (BLEU-4 + CE-F1 of greedy reports on the first validation studies, after every epoch);
* decoding: beam size, repetition penalty and no-repeat n-gram size of stage 3, lengths 0.5x-1.5x
  the typical training report, for every system that decodes;
* scoring: the metric suite on the whole test split (NLG, CE under the R2Gen convention) with
  bootstrap CIs, and a paired bootstrap test of each system against the reference system
  (MambaXray-VL) on the same studies;
* cost: training minutes, trainable and total parameters, generation reports/s and the peak
  memory of generation, measured the same way for all.

`run_bench(BenchConfig(...))` writes `<run_root>/<dataset>/<preset>/bench/results.csv` (a row per
system, appended as each finishes; a rerun skips the finished ones) and `predictions/<system>.csv`
(study_id, reference, prediction), which `cxpmrg evaluate` reads; `run_benches([a, b])` runs two
benchmarks (04_benchmark's main dataset and iu-phantom) in one queue of workers.

Modules, from the bottom up: systems (the System records), config (the protocol, BenchConfig), training
(what every runner shares), runners (how each kind of system is run), mechanisms (the runners of the
systems that add one mechanism each: PromptMRG-, TIMER-, M2KT-, XProNet-, WCL- and R2GenCSR-style),
run (`run_bench`, `run_benches`: every training seed of each), seeds (the seeds read together: seed means,
intervals and paired tests over seeds and studies, Holm's correction, the claims the seeds support), tables (the results as the book shows them, beside the paper's Table 1).
"""
from cxpmrg_lib.bench.config import (ALL, BACKBONE_PRETRAINING, SMOKE_BUDGET, SMOKE_SECOND_SYSTEMS, SMOKE_SYSTEMS,
                                     BenchConfig, bench_dir, for_dataset, notebook_config, seed_dirs, system_slugs)
from cxpmrg_lib.bench.run import read_results, run_bench, run_benches
from cxpmrg_lib.bench.systems import BOOK_SEED_SYSTEMS, DEFAULT_SYSTEMS, FROM_SCRATCH_LR, REFERENCE, SYSTEMS, System
from cxpmrg_lib.bench.tables import (backbone_steps_table, beside_paper, cost_table, encoder_spread, pairwise_pvalues,
                                     paper_table1, per_label_f1, plain_summary, ranked_table, report_diversity)

from cxpmrg_lib.bench.seeds import (SeedScores, claims, pair_table, read_seed_tables, save_seed_table, score_seeds,
                                    seed_cells, seed_long, seed_note, seed_results, seed_spread_summary, seed_table)

__all__ = ["seed_dirs", "SeedScores", "read_seed_tables", "save_seed_table", "claims", "pair_table", "score_seeds", "seed_cells", "seed_long", "seed_note",
           "seed_results", "seed_spread_summary", "seed_table", "backbone_steps_table", "encoder_spread", "SYSTEMS", "DEFAULT_SYSTEMS", "BOOK_SEED_SYSTEMS", "SMOKE_SYSTEMS", "notebook_config",
           "for_dataset", "FROM_SCRATCH_LR", "System", "BenchConfig", "run_bench", "run_benches", "bench_dir", "read_results",
           "ranked_table", "per_label_f1", "pairwise_pvalues", "plain_summary", "report_diversity", "REFERENCE",
           "BACKBONE_PRETRAINING", "SMOKE_BUDGET", "SMOKE_SECOND_SYSTEMS", "ALL", "system_slugs", "beside_paper",
           "cost_table", "paper_table1"]
