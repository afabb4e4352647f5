"""The project's own packaging: pinned dependencies agree between pyproject and conda, manifests are complete."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([A-Za-z0-9_.\-]+)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_deps():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(meta["dependencies"]) + list(meta["optional-dependencies"]["dev"])
    return deps


def _conda_pip_deps():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d][0]["pip"]
    out = {}
    for spec in pip:
        m = PIN.match(spec.split("#")[0])
        assert m, f"environment.yml pip entry {spec!r} is not pinned with =="
        out[_norm(m.group(1))] = m.group(2)
    return out


def test_every_pyproject_dependency_is_pinned_except_torch_range():
    for spec in _pyproject_deps():
        if spec.startswith("torch"):
            continue
        assert PIN.match(spec), f"pyproject dependency {spec!r} is not pinned with =="


def test_environment_yml_agrees_with_pyproject():
    conda = _conda_pip_deps()
    py = {}
    for spec in _pyproject_deps():
        m = PIN.match(spec)
        if m:
            py[_norm(m.group(1))] = m.group(2)
    torch_specs = [s for s in _pyproject_deps() if s.startswith("torch")]
    assert len(torch_specs) == 1
    assert set(py) | {"torch"} == set(conda), (
        f"only in pyproject: {sorted(set(py) - set(conda))}; only in environment.yml: "
        f"{sorted(set(conda) - set(py) - {'torch'})}")
    for name, version in py.items():
        assert conda[name] == version, f"{name}: pyproject {version} vs environment.yml {conda[name]}"
    # The conda torch pin must satisfy pyproject's range, and the Makefile must install the same one.
    lo, hi = re.search(r"torch>=([\d.]+),<=([\d.]+)", torch_specs[0]).groups()
    vt = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert vt(lo) <= vt(conda["torch"]) <= vt(hi)
    assert f"torch=={conda['torch']}" in (ROOT / "Makefile").read_text()


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cxpmrg_lib.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("data", "evaluate", "book"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "cxpmrg_lib.cli", "data", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("phantom", "iu-phantom", "check"):
        assert cmd in out


@pytest.mark.parametrize("name", ["chexpert_plus", "mimic_cxr", "iu_xray", "phantom", "iu_phantom"])
def test_manifest_is_complete(name):
    m = yaml.safe_load((ROOT / "data_manifests" / f"{name}.yaml").read_text())
    for key in ("name", "kind", "source", "licence", "redistributable", "layout"):
        assert key in m, f"{name}.yaml lacks {key}"
    assert isinstance(m["redistributable"], bool)
    assert "how_to_obtain" in m or "generator" in m
    if name in ("chexpert_plus", "mimic_cxr"):
        assert m["redistributable"] is False


def test_openi_checksum_in_manifest_matches_installed_copy():
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.fail("torchxrayvision is not installed (make test installs it with --no-deps)")
    tgz = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"
    m = yaml.safe_load((ROOT / "data_manifests" / "iu_xray.yaml").read_text())
    want = m["checksums"]["NLMCXR_reports.tgz"]
    assert hashlib.sha256(tgz.read_bytes()).hexdigest() == want["sha256"]
    assert tgz.stat().st_size == want["bytes"]


def test_paper_results_are_the_papers_tables():
    d = ROOT / "data_manifests" / "paper_results"
    t1 = pd.read_csv(d / "table1_mrg_algorithms_chexpert_plus.csv")
    t2 = pd.read_csv(d / "table2_llms_on_r2gengpt_chexpert_plus.csv")
    t3 = pd.read_csv(d / "table3_iu_xray_mimic_cxr.csv")
    assert len(t1) == 21 and len(t2) == 16 and len(t3) == 26
    row = t1.set_index("algorithm").loc["MambaXray-VL-L"]
    assert (row["bleu4"], row["ce_f1"]) == (0.112, 0.335)
    assert "paper" in (d / "README.md").read_text().lower()
    shared = ROOT.parent / "shared" / "paper"
    if shared.exists():  # the transcription beside the repository, when present
        for f in shared.glob("*.csv"):
            assert (d / f.name).read_bytes() == f.read_bytes(), f"{f.name} differs from shared/paper"
