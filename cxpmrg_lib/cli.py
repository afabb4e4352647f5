"""`cxpmrg ...`: the command line mirrors the notebooks for scripted use.

Imports are done inside each command so that `cxpmrg --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
                           overwrite=a.overwrite, workers=a.workers, limit=a.limit)
    mapping = Path(out) / "mesh_mapping.json"
    print(f"wrote the iu-phantom to {out}")
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
    from cxpmrg_lib.evaluate import evaluate_file, format_evaluation

    result = evaluate_file(a.predictions, against=a.against, meteor=not a.no_meteor,
                           n_boot=a.n_boot, convention=a.convention, seed=a.seed, alpha=a.alpha,
                           method=a.method)
    print(format_evaluation(result))
    return 0


# ---------------------------------------------------------------------------- book
def _cmd_book(a: argparse.Namespace) -> int:
    from cxpmrg_lib.pipeline import run_book

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
    ph.add_argument("--studies", type=int, default=3000, help="number of studies (default 3000)")
    ph.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ph.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    ph.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ph.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    ph.set_defaults(func=_cmd_data_phantom)

    iu = dsub.add_parser("iu-phantom", help="render radiographs for the real IU X-Ray reports (R2Gen layout)")
    iu.add_argument("--out", required=True, help="output folder")
    iu.add_argument("--reports", default=None,
                    help="NLMCXR_reports.tgz (default: $CXPMRG_OPENI_TGZ, else the copy inside torchxrayvision)")
    iu.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    iu.add_argument("--seed", type=int, default=0, help="seed for rendering and the 70/10/20 split")
    iu.add_argument("--limit", type=int, default=None, help="only the first N reports (for quick looks)")
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
    from cxpmrg_lib.data.errors import DataError

    try:
        return args.func(args)
    except (DataError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
