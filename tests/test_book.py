"""The main job end to end on tiny data: papermill runs the notebooks, Jupyter Book 1.x builds the HTML."""
import json
import re

import nbformat
import pytest

from cxpmrg_lib.chapters.pipeline import NOTEBOOKS, NotebookFailed, run_book


@pytest.mark.slow
def test_smoke_book_builds_with_data_chapter(smoke_book):
    # built once per session by the smoke_book fixture (tests/conftest.py), shared with the browser check
    book, data_root, steps = smoke_book.book, smoke_book.data_root, smoke_book.steps
    assert [s.notebook for s in steps] == NOTEBOOKS + ["jupyter-book build"]

    # the executed notebook has outputs and no error outputs
    nb = nbformat.read(book / "notebooks" / "00_data.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    n_png = sum("image/png" in o.get("data", {}) for o in outputs)
    assert n_png >= 4, f"expected the 4 data figures, found {n_png} images"

    html = book / "_build" / "html"
    index = (html / "intro.html").read_text()
    assert "What here is real and what is synthetic" in index
    page = (html / "notebooks" / "00_data.html").read_text()
    for heading in ("The study table", "Labels and report length", "Phantom radiographs",
                    "Real IU X-Ray reports"):
        assert heading in page
    imgs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(imgs) >= 4
    for src in imgs:
        if not src.startswith("data:"):
            assert (html / "notebooks" / src).resolve().exists(), f"broken image {src}"
    # stage 1 chapter: loss curve, reconstructions, probe figure, from a stage-1 run in the smoke run root
    page = (html / "notebooks" / "01_autoregressive.html").read_text()
    for heading in ("Loss curve", "What the decoder predicts", "linear probe"):
        assert heading in page
    assert len(re.findall(r'<img[^>]+src="([^"]+)"', page)) >= 3
    assert "mean AUROC" in page
    # stage 2: loss curves, retrieval table with the ablation, similarity heatmap, embedding map
    page = (html / "notebooks" / "02_contrastive.html").read_text()
    for heading in ("Loss curves", "Retrieval", "similarity matrix", "stage 2 only (random init)"):
        assert heading in page
    assert len(re.findall(r'<img[^>]+src="([^"]+)"', page)) >= 4
    # stage 3: loss curves, metrics with CIs, the paper's rows, the ablation test, ten examples
    page = (html / "notebooks" / "03_finetune.html").read_text()
    for heading in ("Test metrics with 95% confidence intervals", "paper, CheXpert Plus, real data",
                    "The ablation", "(a) random init", "(b) stage 1", "Ten test studies", "95% CI"):
        assert heading in page, heading
    assert len(re.findall(r'<img[^>]+src="([^"]+)"', page)) >= 5
    # benchmark: the ranked table, the paper's tables, bubble chart, label heatmap, ablation, p-values
    page = (html / "notebooks" / "04_benchmark.html").read_text()
    for text in ("MambaXray-VL", "R2Gen", "LM swap: GPT-2", "Most common report", "<b>", "published numbers",
                 "What the phantom can and cannot tell", "Paired tests between every pair"):
        assert text in page, text
    assert len(re.findall(r'<img[^>]+src="([^"]+)"', page)) >= 5
    assert "The iu-phantom: real IU X-Ray reports" in page and "iu-phantom: 2 systems" in page
    # efficiency: scan table, encoder curves, stage times, benchmark costs (no profiler noise)
    page = (html / "notebooks" / "05_efficiency.html").read_text()
    for text in ("The selective scan: ours (compiled, pure PyTorch), mambapy and the sequential reference",
                 "Encoder training throughput against a ViT of the same size",
                 "Stage wall times and peak memory", "Parameters and training time per benchmarked system",
                 "compiled vs reference", "stage 1 (autoregressive)", "MambaXray-VL"):
        assert text in page, text
    assert "USDT" not in page
    assert len(re.findall(r'<img[^>]+src="([^"]+)"', page)) >= 4
    # the explorer: a static gallery with highlighted sentences and images, no dead widget
    page = (html / "notebooks" / "06_explore.html").read_text()
    for text in ("Explore the generated reports", "Per-study scores, averaged", "Selected cases",
                 "Where systems disagree", "The live browser", 'class="cx-case"', 'class="cx-exact"',
                 "data:image/png;base64", "exact sentences (%)"):
        assert text in page, text
    assert "widget-view" not in page
    # reproducibility: versions, the runs of this book, checksums, how to rerun a number; references
    page = (html / "notebooks" / "07_reproducibility.html").read_text()
    for text in ("Software", "Every run", "Datasets: checksums", "How to rerun one number", "finetune"):
        assert text in page, text
    page = (html / "references.html").read_text()
    assert "CC BY-NC-ND 4.0" in page and "R2Gen" in page
    # progress bars stay out of the book (the pipeline switches them off in its kernels)
    for name in NOTEBOOKS:
        nb = nbformat.read(book / "notebooks" / f"{name}.ipynb", as_version=4)
        widgets = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert not widgets, f"{name}: {len(widgets)} widget outputs (progress bars?) in the book"
    results = smoke_book.run_root
    assert list(results.rglob("bench/results.csv")), "the smoke benchmark wrote no results.csv"
    # two training seeds in the smoke run: seed 1's rows in bench/seed_1/, and the page states its claims over both
    assert list(results.rglob("bench/seed_1/results.csv")), "the smoke benchmark's second seed wrote nothing"
    page = (html / "notebooks" / "04_benchmark.html").read_text()
    for text in ("What this run shows", "The training seeds, seen", "over 2 seeds", "Holm-adjusted p over seeds and studies",
                 "How the interval and the tests carry both sources of noise", "seeds 0."):
        assert text in page, text
    times = json.loads((book / "_build" / "pipeline_times.json").read_text())
    assert set(times["steps"]) == set(NOTEBOOKS) | {"jupyter-book build"}
    # the data was written where asked, under names that encode its settings (reused next time)
    assert sorted(p.name for p in data_root.iterdir()) == ["iu-phantom_n120_96px_s0", "phantom_n60_96px_s0"]
    # a page reads like a paper: stage logs in the run root's logs/, one line on the page; the injected
    # parameters folded like every code cell; no path of this machine
    for name in NOTEBOOKS:
        nb = nbformat.read(book / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all("hide-input" in c.metadata.get("tags", []) for c in code), name
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in code), name
        streams = "".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream")
        assert "INFO " not in streams, f"{name}: INFO log lines in the page"
        assert str(smoke_book.root) not in nbformat.writes(nb), f"{name}: a path of the building machine"
        assert (results / "logs" / f"{name}.log").exists(), name
    # nor in any file of the built site (the notebooks' sources are published beside the pages)
    leaked = [str(f.relative_to(html)) for f in html.rglob("*") if f.suffix in (".html", ".ipynb", ".txt", ".md")
              and str(smoke_book.root) in f.read_text(errors="replace")]
    assert not leaked, f"a path of the building machine in {leaked}"
    page = (html / "notebooks" / "04_benchmark.html").read_text()
    assert re.search(r"log: \d+ lines, (no warnings|\d+ warnings?)[^;]*; full log in logs/04_benchmark.log", page)
    assert "INFO cxpmrg_lib" not in page


def test_failing_notebook_stops_the_run_and_names_the_cell(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise ValueError('bad row 7 in table.csv')")]
    nbformat.write(nb, nbdir / "00_data.ipynb")
    book = tmp_path / "book"
    with pytest.raises(NotebookFailed, match=r"00_data.ipynb failed in cell 2 .*raise ValueError.*: ValueError: bad row 7"):
        run_book(book_dir=book, notebooks_dir=nbdir, build=False, params={"x": 2})
    assert not (book / "notebooks" / "00_data.ipynb").exists()
    assert (book / "notebooks" / "00_data.failed.ipynb").exists()


def test_unknown_notebook_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown notebook"):
        run_book(book_dir=tmp_path, only=["99_nothing"], build=False)


def test_every_notebook_has_the_common_parameters_with_the_same_defaults():
    """papermill -p NAME works the same on every chapter, and a chapter run alone finds the others' runs."""
    import papermill as pm

    from cxpmrg_lib.data.prepare import DEFAULT_PHANTOM_SIZE, DEFAULT_PHANTOM_STUDIES
    from cxpmrg_lib.chapters.pipeline import REPO_ROOT

    common = {"data_root": '"data"', "dataset_root": '""', "dataset_kind": '"auto"', "section": '"findings"',
              "split": '"patient"', "phantom_studies": str(DEFAULT_PHANTOM_STUDIES),
              "phantom_size": str(DEFAULT_PHANTOM_SIZE), "seed": "0", "run_root": '"runs"', "preset": '"tiny"',
              "device": '"cpu"', "smoke": "False"}
    for name in NOTEBOOKS:
        declared = pm.inspect_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"))
        got = {k: declared[k]["default"] for k in common if k in declared}
        assert got == common, f"{name}: {set(common.items()) ^ set(got.items())}"


def test_a_page_shows_no_path_of_the_machine_that_built_it(tmp_path):
    from cxpmrg_lib.chapters.pipeline import REPO_ROOT, for_the_page, local_paths

    local = local_paths(tmp_path / "book", {"data_root": str(tmp_path / "data"), "run_root": "runs",
                                            "dataset_root": "/mnt/cxr/chexpertplus"})
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"input_path": f"{REPO_ROOT}/notebooks/00_data.ipynb",
                                "parameters": {"data_root": f"{tmp_path}/data", "seed": 0}}
    nb.cells = [nbformat.v4.new_code_cell(f'data_root = "{tmp_path}/data"\ndataset_root = "/mnt/cxr/chexpertplus"',
                                          metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(run_dir)", metadata={"tags": ["hide-input"]})]
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=f"{REPO_ROOT}/runs/phantom/finetune/abc\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"PosixPath('{tmp_path}/runs')",
                                                       "text/html": f"<td>{REPO_ROOT}</td><td>{REPO_ROOT}x/y</td>"})]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    for_the_page(path, local)
    got = nbformat.read(path, as_version=4)
    assert got.metadata["papermill"] == {"input_path": "notebooks/00_data.ipynb",
                                         "parameters": {"data_root": "data", "seed": 0}}
    assert got.cells[0].source == 'data_root = "data"\ndataset_root = "<dataset_root: chexpertplus>"'
    assert got.cells[0].metadata["tags"] == ["injected-parameters", "hide-input"]
    out = got.cells[1].outputs
    assert out[0]["text"] == "runs/phantom/finetune/abc\n"
    assert out[1]["data"]["text/plain"] == "PosixPath('runs')"
    # a folder whose name only starts like the checkout's is another folder
    assert out[1]["data"]["text/html"] == f"<td>.</td><td>{REPO_ROOT}x/y</td>"


def test_a_chapter_logs_to_its_file_and_shows_warnings_and_one_line(tmp_path, monkeypatch, capsys):
    import logging

    from cxpmrg_lib.chapters import chapter_log

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        log = chapter_log.start("04_benchmark", "runs")
        logging.getLogger("cxpmrg_lib.bench").info("fitting r2gen in /somewhere/runs/x")
        logging.getLogger("cxpmrg_lib.bench").warning("row 7 dropped")
        assert log.summary() == ("log: 2 lines, 1 warning (shown above); full log in "
                                 "runs/logs/04_benchmark.log")
        assert log.summary() == "log: 0 lines, no warnings; full log in runs/logs/04_benchmark.log"
        again = chapter_log.start("04_benchmark", "runs")     # a re-run cell: handlers replaced, file rewritten
        logging.getLogger("x").info("second run")
        assert again.summary().startswith("log: 1 line, no warnings")
        assert len([h for h in root.handlers if isinstance(h, logging.FileHandler)]) == 1
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "WARNING cxpmrg_lib.bench: row 7 dropped" in err and "fitting r2gen" not in err
    text = (tmp_path / "runs" / "logs" / "04_benchmark.log").read_text()
    assert "second run" in text and "fitting r2gen" not in text       # rewritten at each execution


def test_every_code_cell_is_folded_and_logs_to_the_run_root():
    from cxpmrg_lib.chapters.pipeline import REPO_ROOT

    for name in NOTEBOOKS:
        nb = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all("hide-input" in c.metadata.get("tags", []) for c in code), name
        assert f'chapter_log.start("{name}", run_root)' in code[1].source, name
        assert "basicConfig" not in nbformat.writes(nb), name
