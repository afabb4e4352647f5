"""Report cleaning and robust decoding."""

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib.data.text import clean_report, clean_report_iu, clean_report_mimic, decode_text, is_blank
from cxpmrg_lib.data.text import decode_text_counted


def test_iu_rules():
    assert clean_report_iu("The heart is normal. Lungs are clear..  No effusion.\nNormal chest x-XXXX.") == \
        "the heart is normal . lungs are clear . no effusion . normal chest xxxxx ."
    assert clean_report_iu("1. No acute process. 2. Stable 1.5 cm nodule, left-sided.") == \
        "no acute process . stable 15 cm nodule leftsided ."
    assert clean_report_iu("Heart size normal") == "heart size normal ."
    assert clean_report_iu("... . !!") == ""


def test_mimic_rules():
    assert clean_report_mimic("1. No acute process.\n2. ___ tube in place; 3. Heart size normal\nLungs clear") == \
        "no acute process . tube in place . heart size normal lungs clear ."
    assert clean_report_mimic("FINDINGS: PA and lateral views ... Heart: normal size.  ") == \
        "findings pa and lateral views . heart normal size ."
    # underscores never glue words; IU style would just delete them
    assert clean_report_mimic("seen on___study") == "seen on study ."
    assert clean_report_iu("seen on___study") == "seen onstudy ."


@pytest.mark.parametrize("blank", [None, float("nan"), np.nan, pd.NA, "", "   \n\t"])
def test_blank(blank):
    assert is_blank(blank)
    assert clean_report(blank, "iu") == clean_report(blank, "mimic") == clean_report(blank, "none") == ""


def test_not_blank():
    assert not is_blank("x") and not is_blank(0.0) and not is_blank(3)


def test_clean_report_styles():
    assert clean_report("  Keep As Is.  ", "none") == "Keep As Is."
    assert clean_report("A. B", "iu") == "a . b ."
    with pytest.raises(ValueError, match="unknown cleaning style"):
        clean_report("x", "bogus")


def test_decode_text():
    assert decode_text("caf\u00e9".encode("utf-8")) == "caf\u00e9"
    assert decode_text(b"caf\xe9 \x96 ok") == "caf\u00e9 \u2013 ok"  # cp1252 fallback
    assert decode_text_counted(b"\x81\x8d") == ("\ufffd\ufffd", True)  # bytes undefined in cp1252
    assert decode_text_counted(b"plain") == ("plain", False)
    assert decode_text("already str") == "already str"
