"""Logging that cannot carry patient data: the filter every cxr process installs on its handlers.

Two kinds of leak, two rules, neither depending on what a line looks like:

- **Exception text from DICOM code is withheld.** An exception raised while pydicom,
  highdicom or our DICOM readers handle a file may quote a header value (``Invalid value
  for VR DA: '<birth date>'``, a PatientName highdicom refuses). When any exception of a
  record's chain (``__cause__``/``__context__``) has a frame in that code, the record's
  traceback keeps its frames (file, line, function) but every exception *message* of the
  chain is replaced by ``<message withheld: may quote DICOM header values>``. The same holds
  for an exception passed as a ``%s`` argument.
- **Quoted values in pydicom's and highdicom's own messages** (their loggers, and Python
  warnings raised from their code) are masked: those messages quote element values.
- **One record, one line.** Control characters (newline, carriage return, escape sequences,
  bell...) in the formatted message are escaped (``\\n``, ``\\x1b``), so a value cannot forge
  extra log lines or terminal output, and ``PatientName=``/``PatientID=``/``(0010,0010)``-style
  pairs are masked up to the end of the whole message, not the end of a line.

Standards: DICOM PS3.15 Annex E (the Basic Application Level Confidentiality Profile) lists
the attributes treated as identifying here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from types import TracebackType

WITHHELD = "<message withheld: may quote DICOM header values>"

# Module prefixes whose exceptions may quote header values.
DICOM_CODE = ("pydicom", "highdicom", "cxr.dicom", "worker.dicom_out", "worker.screening.decode",
              "worker.screening.gate", "pylibjpeg", "gdcm", "openjpeg", "libjpeg")

# Identifying attributes (PS3.15 Annex E, the ones that can sit in a CR/DX header we read).
_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthName", "PatientMotherBirthName",
             "OtherPatientNames", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
             "ReferringPhysicianName", "PerformingPhysicianName", "InstitutionName", "AccessionNumber")
_TAGS = ("0010,0010", "0010,0020", "0010,0030", "0010,1005", "0010,1060", "0010,1001", "0010,1000",
         "0010,1040", "0010,2154", "0008,0090", "0008,1050", "0008,0080", "0008,0050")
# "PatientName=...", "PatientName: ...", "(0010,0010) ... PN: ..." up to the next ", " key or the end of the message.
_PAIR = re.compile(
    r"(?P<key>\b(?:" + "|".join(_KEYWORDS) + r")\b|\((?:" + "|".join(_TAGS).replace(",", r",\s*") + r")\))"
    r"(?P<sep>[^\S\n]*(?:[A-Z]{2}:)?[^\S\n]*[=:]?[^\S\n]*)(?P<value>.*?)(?=(?:,\s|;\s)\w+[=:]|$)",
    re.IGNORECASE | re.DOTALL)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    def one(m: re.Match) -> str:
        c = m.group()
        return {"\n": "\\n", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(one, text)


def redact_text(text: str) -> str:
    """Mask identifying ``key=value`` pairs (the whole value, across lines) and escape control
    characters, so the result is one line."""
    text = _PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep') or '='}<redacted>", text)
    return _escape(text)


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def _touches_dicom(tb: TracebackType | None) -> bool:
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "") or ""
        if name.startswith(DICOM_CODE):
            return True
        tb = tb.tb_next
    return False


def from_dicom_code(exc: BaseException) -> bool:
    """True when any exception of ``exc``'s chain was raised through DICOM-handling code."""
    return any(_touches_dicom(e.__traceback__) for e in _chain(exc))


def safe_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` (chain included) with every exception message withheld: frames only."""
    te = traceback.TracebackException.from_exception(exc, capture_locals=False)
    for t in _iter_te(te):
        t._str = WITHHELD  # noqa: SLF001 - TracebackException keeps the message here (3.11)
        if hasattr(t, "__notes__"):
            t.__notes__ = None
        # A SyntaxError keeps its offending text separately.
        for attr in ("text", "filename", "msg"):
            if getattr(t, attr, None) is not None and t.exc_type is not None and issubclass(t.exc_type, SyntaxError):
                setattr(t, attr, WITHHELD if attr != "filename" else "<withheld>")
    return "".join(te.format()).rstrip("\n")


def _iter_te(te: traceback.TracebackException):
    seen = set()
    while te is not None and id(te) not in seen:
        seen.add(id(te))
        yield te
        te = te.__cause__ or (None if te.__suppress_context__ else te.__context__)


class RedactingFilter(logging.Filter):
    """Rewrites a record as the module docstring says; never drops one. Installed for every
    record of the process by :func:`install_record_factory`; usable on a handler as well."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            # uvicorn's AccessFormatter unpacks (client, method, path, http version, status) from
            # the args: keep their shape, redact each text.
            record.args = tuple(redact_text(a) if isinstance(a, str) else a for a in record.args)
            return True
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            if any(isinstance(a, BaseException) and from_dicom_code(a) for a in args):
                args = tuple(f"{type(a).__name__}({WITHHELD})" if isinstance(a, BaseException) and from_dicom_code(a)
                             else a for a in args)
            try:
                message = str(record.msg) % args
            except (TypeError, ValueError):
                message = f"{record.msg} {args!r}"
        else:
            message = str(record.msg)
        name = record.name or ""
        if name.startswith(("pydicom", "highdicom")) or (name == "py.warnings" and any(
                f"{os.sep}{m}{os.sep}" in message for m in ("pydicom", "highdicom"))):
            message = _QUOTED.sub("'<redacted>'", message)  # "Invalid value for VR DA: '<value>'"
        record.msg, record.args = redact_text(message), None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if from_dicom_code(exc):
                record.exc_text = safe_traceback(exc)
                record.exc_info = None
            else:
                # Not from DICOM code: kept, but its text still goes through the pair mask (all lines).
                text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
                record.exc_text = _PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep') or '='}<redacted>", text)
                record.exc_info = None
        elif record.exc_text:
            record.exc_text = _PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep') or '='}<redacted>",
                                        record.exc_text)
        if record.stack_info:
            record.stack_info = _escape(record.stack_info).replace("\\n", "\n")
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_installed = False


def install_record_factory() -> None:
    """Apply :class:`RedactingFilter` to every record this process creates, whatever logger and
    handler it goes to (uvicorn's and Celery's own handlers included): ``logging.setLogRecordFactory``."""
    global _installed
    if _installed:
        return
    base = logging.getLogRecordFactory()
    redact = RedactingFilter()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        redact.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def configure_logging(level: str) -> None:
    """Every cxr process: one stderr handler on the root logger; every record redacted as it is
    made. Python warnings (pydicom's quote values) go through logging too, and so through it."""
    install_record_factory()
    logging.basicConfig(level=level.upper(), format=_FORMAT, stream=sys.stderr)
    logging.captureWarnings(True)
