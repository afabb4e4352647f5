"""What of a dataset may go into the published book: what the chapters show or leave out, and say so.

The decision itself, per dataset tree (manifests, phantom markers, R2Gen guesses), is made by
cxpmrg_lib.data.licence (`policy`); this module turns it into the book's notices and guards.
"""
from __future__ import annotations

import logging

from cxpmrg_lib.data.licence import MANIFEST_DIR, OPT_IN, PublishPolicy, identify, manifest, policy

log = logging.getLogger(__name__)

__all__ = ["PublishPolicy", "policy", "identify", "notice", "notice_html", "guard", "redact_check",
           "show_report_examples", "manifest", "OPT_IN", "MANIFEST_DIR"]


def notice(policy: PublishPolicy, what: str = "examples (radiographs and report text)") -> str:
    """Markdown: what was left out of the book, why, and how to see it in a private copy."""
    if policy.allowed:
        return ""
    return (f"**Not shown: {what}.** The dataset ({policy.name}; recognised by {policy.reason}) may not be "
            f"redistributed under its licence ({policy.licence}), so this book shows only aggregate results "
            f"computed on it: metrics, counts, curves and label frequencies. To see the {what} in a **private** "
            f"copy that you will not publish or share, rerun with `{OPT_IN}` "
            f"(e.g. `papermill notebooks/NN.ipynb out.ipynb {OPT_IN}`).")


def notice_html(policy: PublishPolicy, what: str = "examples (radiographs and report text)") -> str:
    """notice() as an HTML block (for HTML galleries)."""
    import html
    import re

    text = notice(policy, what)
    if not text:
        return ""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return ('<div class="cx-notice" style="border-left:4px solid #c0392b;background:#fdf2f2;padding:8px 12px;'
            f'margin:8px 0">{text}</div>')


def guard(policy: PublishPolicy, what: str = "examples (radiographs and report text)") -> bool:
    """True when `what` may be shown; otherwise display the notice (in a notebook) and return False.

    Notebook use: `if publish.guard(policy, "sample radiographs"): viz.image_grid(...)`.
    """
    if policy.allowed:
        return True
    try:
        from IPython.display import Markdown, display

        display(Markdown(notice(policy, what)))
    except ImportError:
        log.warning("%s", notice(policy, what))
    return False


def redact_check(report: dict, policy: PublishPolicy) -> dict:
    """A check_tree() summary without its problem examples (they can quote report text) unless allowed."""
    if policy.allowed:
        return report
    out = dict(report)
    out["problems"] = [{**p, "examples": []} for p in report.get("problems", [])]
    return out


def show_report_examples(policy: PublishPolicy, examples, root, n: int = 10,
                         columns=("study_id", "reference findings", "generated findings")):
    """Stage 3's example figure and table (viz.report_examples) when allowed, else the notice."""
    if not guard(policy, "example test studies (radiographs, reference and generated reports)"):
        return None
    from IPython.display import display

    from cxpmrg_lib.chapters import viz

    fig = viz.report_examples(examples, root, n=n)
    display(examples[list(columns)])
    return fig
