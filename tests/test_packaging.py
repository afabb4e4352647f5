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


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_deps():
    """The dependencies and the dev extra: what `make venv` installs (besides the --no-deps extras)."""
    meta = _pyproject()
    return list(meta["dependencies"]) + list(meta["optional-dependencies"]["dev"])


def _constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = PIN.match(line)
            assert m, f"constraints.txt line {line!r} is not name==version"
            out[_norm(m.group(1))] = m.group(2)
    return out


def _conda_pip_deps():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d][0]["pip"]
    out = {}
    for spec in pip:
        m = PIN.match(spec.split("#")[0])
        assert m, f"environment.yml pip entry {spec!r} is not pinned with =="
        out[_norm(m.group(1))] = m.group(2)
    return out


def test_every_dependency_is_a_range_with_an_upper_bound():
    from packaging.requirements import Requirement

    meta = _pyproject()
    specs = list(meta["dependencies"]) + [s for extra in meta["optional-dependencies"].values() for s in extra]
    for spec in specs:
        ops = {s.operator for s in Requirement(spec).specifier}
        assert ops & {"<", "<=", "==", "~="}, f"pyproject dependency {spec!r} has no upper bound"


def test_constraints_pin_every_dependency_inside_its_range():
    from packaging.requirements import Requirement

    pins = _constraints()
    meta = _pyproject()
    extras = meta["optional-dependencies"]
    for spec in _pyproject_deps() + extras["iu"] + extras["baselines"]:
        req = Requirement(spec)
        name = _norm(req.name)
        assert name in pins, f"{req.name} (pyproject) is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := constraints.txt" in makefile
    installs = [line for line in makefile.splitlines() if "$(PIP) install" in line and "--upgrade pip" not in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs), installs


def test_environment_yml_agrees_with_the_constraints():
    conda = _conda_pip_deps()
    pins = _constraints()
    from packaging.requirements import Requirement

    wanted = {_norm(Requirement(s).name) for s in _pyproject_deps()}
    assert wanted == set(conda), (f"only in pyproject: {sorted(wanted - set(conda))}; only in environment.yml: "
                                  f"{sorted(set(conda) - wanted)}")
    for name, version in conda.items():
        assert pins[name] == version, f"{name}: constraints.txt {pins[name]} vs environment.yml {version}"


def test_every_third_party_module_a_test_imports_is_declared():
    """A module the tests import at their top is a dependency (or the dev extra), not an accident of the
    environment."""
    import ast
    from packaging.requirements import Requirement

    meta = _pyproject()
    declared = {_norm(Requirement(s).name) for s in meta["dependencies"]}
    declared |= {_norm(Requirement(s).name) for extra in meta["optional-dependencies"].values() for s in extra}
    provides = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "mamba_ssm": "mamba-ssm"}
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top in ("cxpmrg_lib", "test_data_chexpert_plus", "test_data_openi",
                                            "test_data_r2gen", "test_trainer", "test_released",
                                            "test_released_report", "conftest"):
                    continue
                package = _norm(provides.get(top, top))
                assert package in declared, f"{path.name} imports {name}, which pyproject does not declare"


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


def test_every_kernel_source_ships_with_the_package():
    """The compiled kernels build from models/csrc at first use: every file there is package data."""
    from fnmatch import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cxpmrg_lib"]
    csrc = ROOT / "cxpmrg_lib" / "models" / "csrc"
    files = [p.relative_to(ROOT / "cxpmrg_lib").as_posix() for p in csrc.iterdir() if p.is_file()]
    assert {"models/csrc/selective_scan.cpp", "models/csrc/fused_ops.cpp", "models/csrc/lanes.h"} <= set(files)
    for f in files:
        assert any(fnmatch(f, g) for g in globs), f"{f} is not in pyproject's package-data"
    from cxpmrg_lib.models import ssm_build

    assert {p.name for p in ssm_build.SOURCES + ssm_build.HEADERS} == {p.name for p in csrc.iterdir() if p.is_file()}
