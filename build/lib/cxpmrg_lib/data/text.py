"""Report text: robust decoding and the cleaning rules report-generation papers use.

Every loader goes through these functions so that a report means the same string
whatever the source. The two cleaning styles follow the rules R2Gen applies to IU
X-Ray ("iu") and to MIMIC-CXR ("mimic", which CheXpert Plus papers also use); the
implementation here is our own, written from those rules:

* lower-case; newlines and runs of blanks become one space; runs of dots collapse to one;
* list numbering ("1. ", "2) ") becomes a sentence break;
* split into sentences on ". ";
* within a sentence drop every character that is not a letter, digit or space
  (so "x-XXXX" becomes "xxxxx", "1.5 cm" becomes "15 cm", "left-sided" "leftsided",
  as in R2Gen, which keeps scores comparable with published ones), then squeeze blanks;
* drop empty sentences; join with " . " and end with " .".

The MIMIC style also turns runs of underscores (the "___" de-identification
blanks of MIMIC-CXR and CheXpert Plus) into a space first, and also removes list
numbers written inline after ";" or ":" (as "... tube; 3. heart ..."). A line break
is only a space, as in R2Gen: we do not invent sentence breaks, so that cleaned
references stay comparable with published ones.
"""
from __future__ import annotations

import math
import re

__all__ = ["decode_text", "is_blank", "clean_report", "clean_report_iu", "clean_report_mimic",
           "CLEAN_STYLES"]

CLEAN_STYLES = ("iu", "mimic", "none")


def decode_text(data: bytes | bytearray | str) -> str:
    """Bytes to str without ever raising.

    UTF-8 first (the encoding every source declares); if the bytes are not valid
    UTF-8 (hand-edited CSVs saved from Excel are cp1252), cp1252 with replacement,
    which also maps every byte latin-1 can. Use `decode_text_counted` to know whether a
    fallback happened.
    """
    return decode_text_counted(data)[0]


def decode_text_counted(data: bytes | bytearray | str) -> tuple[str, bool]:
    """Like `decode_text`; the flag is True when the bytes were not valid UTF-8."""
    if isinstance(data, str):
        return data, False
    data = bytes(data)
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        pass
    # cp1252 leaves five bytes undefined; errors="replace" turns those into U+FFFD.
    return data.decode("cp1252", errors="replace"), True


def is_blank(x) -> bool:
    """None, NaN, pandas NA or a string of only whitespace."""
    if x is None:
        return True
    if isinstance(x, str):
        return not x.strip()
    if isinstance(x, float):
        return math.isnan(x)
    try:  # pandas.NA, numpy.nan and friends
        import pandas as pd

        res = pd.isna(x)
        return bool(res) if isinstance(res, (bool,)) or getattr(res, "ndim", 1) == 0 else False
    except Exception:  # pragma: no cover - exotic types are simply not blank
        return False


_DOTS = re.compile(r"\.(?:\s*\.)+")
_SPACES = re.compile(r"\s+")
_LIST_NUMBER = re.compile(r"(?:^|(?<=\s))\d{1,2}[.)](?=\s|$)")
_LIST_NUMBER_MIMIC = re.compile(r"(?:^|(?<=[\s.;:]))\d{1,2}[.)](?=\s|$)")
_UNDERSCORES = re.compile(r"_+")
_NOT_WORD_OR_BREAK = re.compile(r"[^0-9a-z \n]")


def _to_sentences(text: str, list_number: re.Pattern) -> str:
    text = _SPACES.sub(" ", text.lower()).strip()
    text = list_number.sub(". ", text)
    text = _DOTS.sub(".", text)
    text = _SPACES.sub(" ", text)
    # Mark sentence breaks with "\n" (no newline is left after the squeeze above), then
    # clean all sentences in one pass instead of one regex call per sentence.
    text = _NOT_WORD_OR_BREAK.sub("", text.replace(". ", "\n"))
    sentences = [" ".join(s.split()) for s in text.split("\n")]
    sentences = [s for s in sentences if s]
    return (" . ".join(sentences) + " .") if sentences else ""


def clean_report_iu(text) -> str:
    """IU X-Ray (R2Gen) cleaning; "" for a blank report."""
    if is_blank(text):
        return ""
    return _to_sentences(str(text), _LIST_NUMBER)


def clean_report_mimic(text) -> str:
    """MIMIC-CXR (R2Gen) cleaning, also used for CheXpert Plus; "" for a blank report."""
    if is_blank(text):
        return ""
    t = _UNDERSCORES.sub(" ", str(text))
    return _to_sentences(t, _LIST_NUMBER_MIMIC)


def clean_report(text, style: str = "iu") -> str:
    """Clean `text` in one of CLEAN_STYLES; "none" only strips and maps blanks to ""."""
    if style == "iu":
        return clean_report_iu(text)
    if style == "mimic":
        return clean_report_mimic(text)
    if style == "none" or style is None:
        return "" if is_blank(text) else str(text).strip()
    raise ValueError(f"unknown cleaning style {style!r}; use one of {CLEAN_STYLES}")
