"""`cxpmrg ...`: the command line mirrors the notebooks for scripted use.

Imports are done inside each command so that `cxpmrg --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from cxpmrg_lib.data.prepare import DEFAULT_PHANTOM_SIZE, DEFAULT_PHANTOM_STUDIES

log = logging.getLogger("cxpmrg")


# ----------------------------------------------------------------------------- data
def _cmd_data_phantom(a: argparse.Namespace) -> int:
    from cxpmrg_lib.data.phantom import write_phantom

    out = write_phantom(a.out, studies=a.studies, size=a.size, seed=a.seed,
                        overwrite=a.overwrite, workers=a.workers)
    print(f"wrote a {a.studies}-study phantom ({a.size} px, seed {a.seed}) to {out}")
    return 0


def _cmd_data_iu_phantom(a: argparse.Namespace) -> int:
    from cxpmrg_lib.data.phantom import write_iu_phantom

    out = write_iu_phantom(a.out, reports=a.reports, size=a.size, seed=a.seed,
                           overwrite=a.overwrite, workers=a.workers, limit=a.limit, split=a.split)
    mapping = Path(out) / "mesh_mapping.json"
    print(f"wrote the iu-phantom to {out}")
    split = Path(out) / "split.json"
    if split.exists():
        s = json.loads(split.read_text())
        print("R2Gen split: train/val/test " + "/".join(str(v) for v in s["studies"].values())
              + " studies (" + "/".join(str(v) for v in s["two_views"].values()) + " with two views); "
              + f"R2Gen's val/test found with findings: {s['r2gen_found']['val']}/{s['r2gen_listed']['val']}, "
              + f"{s['r2gen_found']['test']}/{s['r2gen_listed']['test']}"
              + (f"; {len(s['missing'])} missing: " + ", ".join(m["study_id"] for m in s["missing"][:10])
                 + (", ... (split.json)" if len(s["missing"]) > 10 else "") if s["missing"] else ""))
    if mapping.exists():
        m = json.loads(mapping.read_text())
        summary = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        if summary:
            print("MeSH terms: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from cxpmrg_lib.data.check import check_tree, format_check

    opts = {}
    if a.section:
        opts["section"] = a.section
    if a.split:
        opts["split"] = a.split
    report = check_tree(a.root, kind=a.kind, verify_images=a.verify_images, **opts)
    if a.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_check(report))
    return 1 if report.get("fatal") else 0


# ------------------------------------------------------------------------ evaluate
def _cmd_evaluate(a: argparse.Namespace) -> int:
    from cxpmrg_lib.metrics.evaluate import evaluate_file, format_evaluation

    result = evaluate_file(a.predictions, against=a.against, meteor=not a.no_meteor,
                           n_boot=a.n_boot, convention=a.convention, seed=a.seed, alpha=a.alpha,
                           method=a.method)
    print(format_evaluation(result))
    return 0


def _cmd_evaluate_released(a: argparse.Namespace) -> int:
    from cxpmrg_lib.metrics.evaluate import format_evaluation
    from cxpmrg_lib.stages.released_eval import ReleasedEvalConfig, evaluate_released

    decoding = {"num_beams": a.beams, "min_new_tokens": a.min_new_tokens, "max_new_tokens": a.max_new_tokens}
    out = evaluate_released(ReleasedEvalConfig(
        stage3=a.stage3, stage2=a.stage2, llm_dir=a.lm, dataset_root=a.dataset_root, out=a.out, kind=a.kind,
        split=a.split, limit=a.limit, device=a.device, profile=a.profile, decoding=decoding,
        batch_size=a.batch_size, lm_dtype=a.lm_dtype, n_boot=a.n_boot, seed=a.seed, meteor=not a.no_meteor))
    print(f"released model, {out['profile']} profile: {out['row']['decoding']}")
    print(format_evaluation(out["metrics"]))
    print(f"predictions: {out['predictions']}; row: {out['out'] / 'results.csv'}")
    return 0


# ------------------------------------------------------------------------ pretrain
def _stage_common(a: argparse.Namespace) -> dict:
    """The StageConfig fields every stage command takes; writes the phantom when no --dataset-root."""
    root = a.dataset_root
    if root is None:
        from cxpmrg_lib.data.prepare import ensure_phantom

        root = str(ensure_phantom(a.data_root, a.phantom_studies, a.phantom_size, a.seed))
    return dict(dataset_root=root, dataset_kind=a.kind, preset=a.preset, run_root=a.run_root, epochs=a.epochs,
                max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                on_bad_image=a.on_bad_image)


def _cmd_pretrain_autoregressive(a: argparse.Namespace) -> int:
    from cxpmrg_lib.stages import AutoregressiveConfig, pretrain_autoregressive, read_summary

    run_dir = pretrain_autoregressive(AutoregressiveConfig(**_stage_common(a), max_images=a.max_images))
    summary = read_summary(run_dir)
    print(f"stage 1 done: {run_dir} ({summary['steps']} steps, final loss {summary['final_loss']:.4f})")
    return 0


def _cmd_pretrain_contrastive(a: argparse.Namespace) -> int:
    from cxpmrg_lib.stages import ContrastiveConfig, pretrain_contrastive, read_summary

    run_dir = pretrain_contrastive(ContrastiveConfig(**_stage_common(a), init=a.init,
                                                     text_pretrained=a.text_pretrained))
    summary = read_summary(run_dir)
    r = summary["retrieval"]["test"]
    print(f"stage 2 done: {run_dir} ({summary['steps']} steps, final loss {summary['final_loss']:.4f})")
    print("test retrieval (%): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if isinstance(v, (int, float))))
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from cxpmrg_lib.stages import FinetuneConfig, finetune_report, read_summary

    run_dir = finetune_report(FinetuneConfig(**_stage_common(a), init=a.init, lm_pretrained=a.lm_pretrained,
                                             freeze_encoder=a.freeze_encoder, num_beams=a.beams,
                                             decoding_choice=a.decoding, test_studies=a.test_studies))
    summary = read_summary(run_dir)
    m = summary["test_metrics"]
    print(f"stage 3 done: {run_dir} ({summary['steps']} steps; {summary['test_studies']} test studies: "
          f"BLEU-4 {m['bleu4']:.3f}, ROUGE-L {m['rouge_l']:.3f}, CE-F1 {m['ce_f1']:.3f})")
    print(f"predictions: {run_dir / 'predictions_test.csv'}")
    return 0


# ------------------------------------------------------------------------ bench
def _cmd_bench(a: argparse.Namespace) -> int:
    from cxpmrg_lib.bench import DEFAULT_SYSTEMS, SYSTEMS, BenchConfig, read_results, run_bench

    if a.list:
        for s in SYSTEMS.values():
            mark = "*" if s.slug in DEFAULT_SYSTEMS else " "
            print(f"{mark} {s.slug:<30} {s.name:<46} {s.family:<16} {s.paper}")
        print("(* = in the default benchmark)")
        return 0
    if a.all and a.systems:
        raise SystemExit("cxpmrg bench: --all runs every system; give it or --systems, not both")
    from cxpmrg_lib.bench.config import ALL, system_slugs

    systems = system_slugs([ALL] if a.all else a.systems) or None
    common = _stage_common(a)
    config = BenchConfig(**common, systems=systems, test_studies=a.test_studies, num_beams=a.beams,
                         lm_epochs=a.lm_epochs, n_boot=a.n_boot, redo=a.redo, jobs=a.jobs,
                         backbone_pretraining=a.backbone_pretraining, decoding_choice=a.decoding, seeds=a.seeds,
                         seed_systems=system_slugs(a.seed_systems) or None,
                         **({"backbone_steps": a.backbone_steps} if a.backbone_steps is not None else {}))
    out = run_bench(config)
    table = read_results(out)
    cols = ["name", "bleu4", "rouge_l", "meteor", "cider", "ce_f1", "train_min", "trainable_m", "reports_per_s"]
    if a.seeds > 1:
        from cxpmrg_lib.bench import claims, pair_table, score_seeds, seed_dirs, seed_results, seed_table

        rows = seed_results(config)
        scores = score_seeds(config, rows)
        seeds = seed_table(scores, rows)
        shown = seeds[["seeds", "ce_f1", "ce_f1_sd", "ce_f1_lo", "ce_f1_hi", "bleu4", "bleu4_sd", "distinct"]]
        print(f"the {a.seeds} training seeds {config.training_seeds()}: mean, seed sd and the 95% interval over "
              "seeds and test studies")
        print(shown.to_string(float_format=lambda x: f"{x:.3f}"))
        print(claims(scores, seeds, pair_table(scores)))
        print("results: " + ", ".join(str(d / "results.csv") for d in seed_dirs(config)))
        return 0
    print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"results: {out / 'results.csv'}; predictions: {out / 'predictions'}")
    return 0


# ------------------------------------------------------------------------ generate
def _cmd_generate(a: argparse.Namespace) -> int:
    from cxpmrg_lib.stages.generate import ReportGenerator

    generator = ReportGenerator.from_pretrained(a.run)
    decoding = {"num_beams": a.beams} if a.beams else {}
    report = generator.generate(a.images, **decoding)
    if a.json:
        print(json.dumps({"run": str(a.run), "images": [str(p) for p in a.images], "report": report}))
    else:
        print(report)
    return 0


# ---------------------------------------------------------------------------- perf
def _cmd_perf_scan(a: argparse.Namespace) -> int:
    from cxpmrg_lib.perf.scan import benchmark_scan, format_scan_table

    result = benchmark_scan(lengths=tuple(a.lengths), batch=a.batch, channels=a.channels, state=a.state,
                            repeats=a.repeats, include_mambapy=not a.no_mambapy, out_json=a.out)
    print(format_scan_table(result))
    print(f"wrote {a.out}")
    return 0


def _cmd_perf_encoder(a: argparse.Namespace) -> int:
    from cxpmrg_lib.perf.encoder import benchmark_encoder, format_encoder_table

    result = benchmark_encoder(sizes=tuple(a.sizes), batch=a.batch, repeats=a.repeats, preset=a.preset,
                               out_json=a.out)
    print(format_encoder_table(result))
    print(f"wrote {a.out}")
    return 0


def _cmd_perf_report(a: argparse.Namespace) -> int:
    from cxpmrg_lib.perf.report import benchmark_report, format_report_table

    result = benchmark_report(a.dataset, run_dir=a.run, preset=a.preset, kind=a.kind, batch=a.batch,
                              train_steps=a.steps, n_reports=a.n_reports, n_greedy=a.n_greedy, out_json=a.out)
    print(format_report_table(result))
    print(f"wrote {a.out}")
    return 0


# ---------------------------------------------------------------------------- book
def _cmd_book(a: argparse.Namespace) -> int:
    from cxpmrg_lib.chapters.pipeline import run_book

    params = {}
    for key, value in a.param or []:
        params[key] = _parse_value(value)
    run_book(book_dir=a.book_dir, params=params, smoke=a.smoke, only=a.only,
             build=not a.no_build)
    return 0


def _parse_value(text: str):
    """papermill-style: numbers and booleans are typed, everything else is a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------- main
def _add_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-root", default=None, help="dataset tree (default: the embedded phantom)")
    p.add_argument("--kind", default="auto", help="auto | chexpert_plus | r2gen")
    p.add_argument("--data-root", default="data", help="where the phantom is written when no --dataset-root")
    p.add_argument("--phantom-studies", type=int, default=DEFAULT_PHANTOM_STUDIES)
    p.add_argument("--phantom-size", type=int, default=DEFAULT_PHANTOM_SIZE)
    p.add_argument("--preset", default="tiny", help="tiny | base | large")
    p.add_argument("--run-root", default="runs")
    p.add_argument("--epochs", type=float, default=None, help="default: the preset's")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--on-bad-image", default="skip", choices=["skip", "error"],
                   help="an unreadable image: leave it out and count it (default), or stop naming it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxpmrg",
        description="Reproducible chest X-ray report generation study (CXPMRG-Bench / MambaXray-VL).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    # data ...
    d = sub.add_parser("data", help="prepare and check datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)

    ph = dsub.add_parser("phantom", help="write a synthetic CheXpert Plus tree (the embedded default data)")
    ph.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    ph.add_argument("--studies", type=int, default=DEFAULT_PHANTOM_STUDIES, help="number of studies (default %(default)s)")
    ph.add_argument("--size", type=int, default=DEFAULT_PHANTOM_SIZE, help="image side in pixels (default %(default)s)")
    ph.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    ph.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ph.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    ph.set_defaults(func=_cmd_data_phantom)

    iu = dsub.add_parser("iu-phantom", help="render radiographs for the real IU X-Ray reports (R2Gen layout)")
    iu.add_argument("--out", required=True, help="output folder")
    iu.add_argument("--reports", default=None,
                    help="NLMCXR_reports.tgz (default: $CXPMRG_OPENI_TGZ, else the copy inside torchxrayvision)")
    iu.add_argument("--size", type=int, default=DEFAULT_PHANTOM_SIZE, help="image side in pixels (default %(default)s)")
    iu.add_argument("--seed", type=int, default=0, help="seed for rendering (and the random split)")
    iu.add_argument("--split", choices=("random", "r2gen"), default="random",
                    help="random: reports with findings or impression, 70/10/20 at random (default); r2gen: every "
                         "report with findings, R2Gen's 296 val and 590 test studies, the rest train")
    iu.add_argument("--limit", type=int, default=None,
                    help="only the first N reports (r2gen: the first of each split, in proportion; for quick looks)")
    iu.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    iu.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    iu.set_defaults(func=_cmd_data_iu_phantom)

    ck = dsub.add_parser("check", help="validate a dataset tree; print counts, label prevalence and problems")
    ck.add_argument("root", help="dataset root (CheXpert Plus layout, R2Gen annotation tree, or NLMCXR_reports.tgz)")
    ck.add_argument("--kind", default="auto", choices=["auto", "chexpert_plus", "r2gen", "openi"])
    ck.add_argument("--section", choices=["findings", "impression", "both"], default=None,
                    help="CheXpert Plus: which section is the target report")
    ck.add_argument("--split", choices=["official", "patient"], default=None,
                    help="CheXpert Plus: official train/valid or patient-level 70/10/20")
    ck.add_argument("--verify-images", type=int, default=100, metavar="N",
                    help="decode a seeded sample of N images (-1: every image; default 100)")
    ck.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ck.set_defaults(func=_cmd_data_check)

    # evaluate
    ev = sub.add_parser("evaluate", help="score generated reports (NLG + CE, bootstrap CIs, paired test)")
    ev.add_argument("--predictions", required=True, help="CSV with columns study_id, reference, prediction")
    ev.add_argument("--against", default=None, help="a second predictions CSV for a paired test")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    ev.add_argument("--convention", default="r2gen", choices=["r2gen", "example", "uncertain_positive"],
                    help="CE convention for the headline ce_* numbers (all are reported)")
    ev.add_argument("--method", default="bootstrap", choices=["bootstrap", "permutation"],
                    help="paired test with --against: paired bootstrap or approximate randomisation")
    ev.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the CIs (default 0.05)")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_cmd_evaluate)

    # evaluate-released
    er = sub.add_parser("evaluate-released",
                        help="score the paper's released MambaXray-VL checkpoints on a dataset split (CPU or GPU, "
                             "no mamba-ssm build)")
    er.add_argument("--stage3", required=True, help="the released stage-3 (fine-tuned) checkpoint, e.g. "
                    "Mimic-Finetune-B .pth")
    er.add_argument("--stage2", default=None, help="the released stage-2 (MambaXrayCLIP) checkpoint it started from "
                    "(default: the stage-3 file's own encoder, which holds all of it)")
    er.add_argument("--lm", required=True, help="a local transformers causal-LM folder: Llama-2-7b-chat-hf "
                    "(MIMIC, CheXpert Plus) or Qwen1.5-1.8B-Chat (IU X-Ray)")
    er.add_argument("--dataset-root", required=True, help="dataset tree (CheXpert Plus layout or R2Gen annotation tree)")
    er.add_argument("--kind", default="auto", help="auto | chexpert_plus | r2gen")
    er.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    er.add_argument("--limit", type=int, default=None, help="only the first N studies of the split")
    er.add_argument("--out", type=Path, default=Path("runs/released"),
                    help="folder of predictions/<system>.csv, its .metrics.json and results.csv (default %(default)s)")
    er.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    er.add_argument("--profile", default="auto", choices=["auto", "default", "iu"],
                    help="the released decoding: default = beam 3, 80-120 new tokens; iu = beam 5, 40-100; both "
                         "repetition and length penalty 2.0; auto (default): iu for an IU X-Ray tree")
    er.add_argument("--beams", type=int, default=None, help="override the profile's beam size")
    er.add_argument("--min-new-tokens", type=int, default=None, help="override the profile's minimum")
    er.add_argument("--max-new-tokens", type=int, default=None, help="override the profile's maximum")
    er.add_argument("--batch-size", type=int, default=4, help="studies generated together (default 4)")
    er.add_argument("--lm-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="the LLM's dtype; auto: float16 on a GPU (as released), float32 on the CPU")
    er.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    er.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    er.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    er.set_defaults(func=_cmd_evaluate_released)

    # pretrain
    pt = sub.add_parser("pretrain", help="run a pre-training stage (cached by config hash in the run folder)")
    ptsub = pt.add_subparsers(dest="stage", required=True)
    ar = ptsub.add_parser("autoregressive", help="stage 1: autoregressive pixel pre-training of the encoder")
    _add_stage_args(ar)
    ar.add_argument("--max-images", type=int, default=None, help="use only the first N training images")
    ar.set_defaults(func=_cmd_pretrain_autoregressive)
    co = ptsub.add_parser("contrastive", help="stage 2: X-ray/report contrastive pre-training (4-way encoder)")
    _add_stage_args(co)
    co.add_argument("--init", default="stage1", choices=["stage1", "random"],
                    help="encoder start: the stage-1 run (trained first if needed) or random (the ablation)")
    co.add_argument("--text-pretrained", default=None, help="a local BERT-family folder (e.g. Bio_ClinicalBERT)")
    co.set_defaults(func=_cmd_pretrain_contrastive)

    # bench
    bn = sub.add_parser("bench", help="the benchmark: every report generator through one protocol")
    _add_stage_args(bn)
    bn.add_argument("--systems", nargs="+", default=None,
                    help="system slugs (see --list), or 'all'; default: the default set")
    bn.add_argument("--all", action="store_true", help="every system of the registry (the whole zoo)")
    bn.add_argument("--list", action="store_true", help="list the systems and exit")
    bn.add_argument("--redo", nargs="+", default=[], help="systems to train and score again (cached run deleted)")
    bn.add_argument("--test-studies", type=int, default=None, help="first N test studies (default: all)")
    bn.add_argument("--beams", type=int, default=3, help="beam size of the fixed decoding (--decoding fixed)")
    bn.add_argument("--decoding", default="validation", choices=["validation", "fixed"],
                    help="each trained system's test decoding: chosen on its validation studies from greedy / beam 3 x "
                         "repetition penalty 1.0 / 1.3 / 2.0 (default), or fixed at --beams with penalty 2.0 (the old "
                         "protocol)")
    bn.add_argument("--lm-epochs", type=float, default=0,
                    help="epochs of each fresh LM of the LM swap; 0 (default): as long as MambaXray-VL's LM")
    bn.add_argument("--backbone-pretraining", default="labels", choices=["labels", "contrastive", "none"],
                    help="what the from-scratch systems' image backbones learn first (the stand-in for the ImageNet "
                         "weights their papers start from): the training findings (default), stage 2's "
                         "image-report contrast, or nothing (the old protocol)")
    bn.add_argument("--backbone-steps", type=int, default=None,
                    help="steps of that backbone pre-training (default: the protocol's, 600; 300 the old setting)")
    bn.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs and paired tests")
    bn.add_argument("--seeds", type=int, default=1,
                    help="training seeds per row (--seed, --seed + 1, ...; the data stay the same): each trained row "
                         "is trained this often, and the intervals and tests cover the seeds and the test studies "
                         "(the book uses 3; default 1)")
    bn.add_argument("--seed-systems", default="",
                    help="comma-separated slugs trained at every seed (the reference, mambaxray-vl, among them); the "
                         "others train at the first seed only. Default: every system at every seed")
    bn.add_argument("--jobs", type=int, default=0,
                    help="systems trained side by side in worker processes; 0: one per CPU core (1 on cuda)")
    bn.set_defaults(func=_cmd_bench)

    # finetune
    ft = sub.add_parser("finetune", help="stage 3: report generation with a frozen LM; writes test predictions")
    _add_stage_args(ft)
    ft.add_argument("--init", default="stage2", choices=["stage2", "stage1", "random"],
                    help="encoder start: stage 2 (the full model), stage 1, or random (the ablation rows)")
    ft.add_argument("--lm-pretrained", default=None, help="a local causal-LM folder (Llama-2, Qwen, ...); "
                    "default: the preset's small LM, trained on the reports first")
    ft.add_argument("--freeze-encoder", action="store_true", help="train only the projection (paper: trained)")
    ft.add_argument("--beams", type=int, default=3, help="beam size of the fixed decoding (--decoding fixed)")
    ft.add_argument("--decoding", default="validation", choices=["validation", "fixed"],
                    help="the test decoding: chosen on the validation studies (default), or fixed at --beams with "
                         "repetition penalty 2.0 (the old setting)")
    ft.add_argument("--test-studies", type=int, default=None, help="first N test studies (default: all)")
    ft.set_defaults(func=_cmd_finetune)

    # generate
    gn = sub.add_parser("generate", help="write the report for one study's images with a trained stage-3 run")
    gn.add_argument("--run", required=True, type=Path,
                    help="a stage-3 run directory (runs/.../finetune/<hash>) or its shareable export/ folder, copied anywhere")
    gn.add_argument("images", nargs="+", type=Path, help="the study's image files (PNG/JPEG, any size)")
    gn.add_argument("--beams", type=int, default=None, help="beam size (default: the run's, 3 as in the paper)")
    gn.add_argument("--json", action="store_true", help="print a JSON object instead of the bare report")
    gn.set_defaults(func=_cmd_generate)

    # perf
    pf = sub.add_parser("perf", help="speed and memory benchmarks (print a table, write JSON)")
    pfsub = pf.add_subparsers(dest="bench", required=True)
    sc = pfsub.add_parser("scan", help="selective scan forward+backward: ours vs the sequential reference and mambapy")
    sc.add_argument("--lengths", type=int, nargs="+", default=[64, 196, 784])
    sc.add_argument("--batch", type=int, default=8)
    sc.add_argument("--channels", type=int, default=192)
    sc.add_argument("--state", type=int, default=16)
    sc.add_argument("--repeats", type=int, default=5)
    sc.add_argument("--no-mambapy", action="store_true", help="skip mambapy (when it is not installed)")
    sc.add_argument("--out", type=Path, default=Path("runs/perf/scan.json"))
    sc.set_defaults(func=_cmd_perf_scan)
    en = pfsub.add_parser("encoder", help="training images/s of the Vision Mamba encoder vs a same-sized ViT")
    en.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384, 512])
    en.add_argument("--batch", type=int, default=8)
    en.add_argument("--repeats", type=int, default=5,
                    help="least rounds per size (one interleaved step of each encoder; more fill 2 s)")
    en.add_argument("--preset", default="tiny")
    en.add_argument("--out", type=Path, default=Path("runs/perf/encoder.json"))
    en.set_defaults(func=_cmd_perf_encoder)
    rp = pfsub.add_parser("report", help="stage-3 training studies/s and report generation reports/s, peak memory")
    rp.add_argument("--dataset", required=True, help="dataset root (studies are taken from its train/test splits)")
    rp.add_argument("--kind", default="auto", help="dataset kind: auto | chexpert_plus | r2gen")
    rp.add_argument("--run", default=None, help="a finished stage-3 run to measure; default: an untrained model "
                    "of the preset (reports run to the maximum length: an upper bound)")
    rp.add_argument("--preset", default="tiny")
    rp.add_argument("--batch", type=int, default=16, help="training batch (studies)")
    rp.add_argument("--steps", type=int, default=6, help="timed training steps per setting")
    rp.add_argument("--n-reports", type=int, default=500, help="test reports generated with the default decoding")
    rp.add_argument("--n-greedy", type=int, default=100, help="test reports generated greedily (the baseline)")
    rp.add_argument("--out", type=Path, default=Path("runs/perf/report.json"))
    rp.set_defaults(func=_cmd_perf_report)

    # book
    bk = sub.add_parser("book", help="run the notebooks through papermill and build the Jupyter Book")
    bk.add_argument("--book-dir", default="book", help="the book folder (default: book)")
    bk.add_argument("--smoke", action="store_true", help="tiny data and budgets: checks the pipeline in minutes")
    bk.add_argument("--only", nargs="+", default=None, help="run only these notebooks (e.g. 00_data)")
    bk.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                    help="notebook parameter passed to every notebook that has it")
    bk.add_argument("--no-build", action="store_true", help="run the notebooks but do not build the HTML")
    bk.set_defaults(func=_cmd_book)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from cxpmrg_lib.util.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
