"""The stage-3 chapter's table of MambaXray-VL against the released code (chapters.fidelity)."""
import re

from cxpmrg_lib.chapters.fidelity import FIDELITY_COLUMNS, released_fidelity


def test_released_fidelity_has_one_short_row_per_part():
    table = released_fidelity()
    assert [table.index.name, *table.columns] == list(FIDELITY_COLUMNS)
    for part in ("block norms", "class token", "position embedding", "input", "MLP", "scan directions",
                 "merging the directions", "stage-1 layout", "checkpoint formats", "stage-3 projection",
                 "stage-3 prompt", "stage-3 LLM", "decoding"):
        assert part in table.index
    assert table.notna().all().all() and (table.map(str.strip) != "").all().all()
    # numbers read from the code: the tiny preset's encoder, the released Base MLP, the released decoding
    assert table.loc["input", "this study's tiny preset"].startswith("128 px grey")
    assert "hidden 2048" in table.loc["MLP", "released code"] and "hidden 344" in table.loc["MLP", "this study's tiny preset"]
    assert table.loc["decoding", "released code"].startswith("beam 3, 80-120 new tokens")
    assert "beam 5, 40-100" in table.loc["decoding", "released code"]
    for cell in table.reset_index().to_numpy().ravel():               # the book's prose limit
        for sentence in re.split(r"(?<=[.;])\s", cell):
            assert len(sentence.split()) <= 25, sentence
