"""The decoded-memory budget: what a worker process holds is bounded by bytes, not by what a file claims.

The pixel limit (CXR_MAX_IMAGE_PIXELS) bounds one image's area, not its memory: an 8900 x 8900
RGB DICOM is under it and decodes to 238 MB (a deflated one arrives as a few hundred KB), and
16 screening threads may decode 16 of them at once. So before any pixel (or, for a deflated
DICOM, any of the dataset) is decoded, the file's **decoded bytes** are computed from its
header:

    rows x columns x frames x samples per pixel x bytes per sample

(DICOM PS3.3 C.7.6.3: Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated; PNG and
JPEG: the size and mode PIL reads from the header, without decoding). A process-wide
:class:`DecodeBudget` of ``CXR_DECODE_BUDGET_MB`` then admits studies while their total fits:
the others wait their turn, first come first served. A file whose decoded bytes alone exceed
the whole budget is rejected ``too_large`` with a sentence, without being decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Iterator

from cxr.dicom import SNIFF_BYTES, bare_dicom_encoding, is_dicom
from worker.screening.gate import Code

DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian (PS3.5 A.5)
_HEADER_INFLATE_LIMIT = 4 * 1024 * 1024  # a deflated dataset's header is read from at most this much inflated data
_BYTES_PER_BAND = {"1": 1, "L": 1, "P": 1, "RGB": 1, "RGBA": 1, "CMYK": 1, "YCbCr": 1, "LAB": 1, "HSV": 1,
                   "LA": 1, "PA": 1, "RGBX": 1, "RGBa": 1, "La": 1, "I": 4, "F": 4, "I;16": 2, "I;16B": 2,
                   "I;16L": 2, "I;16N": 2}


def _dicom_header(data: bytes):
    """The dataset without its pixel data. A deflated dataset is inflated only as far as its
    header needs (at most _HEADER_INFLATE_LIMIT), never whole."""
    import pydicom
    from pydicom.filereader import read_dataset, read_preamble

    buf = io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_preamble(buf, False)
        meta = pydicom.filereader._read_file_meta_info(buf)  # noqa: SLF001 - the file meta group only
        ts = str(meta.get("TransferSyntaxUID", ""))
        if ts != DEFLATED:
            buf.seek(0)
            return pydicom.dcmread(buf, stop_before_pixels=True, force=True)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = inflater.decompress(data[buf.tell():], _HEADER_INFLATE_LIMIT)
        return read_dataset(io.BytesIO(head), is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag.group >= 0x7FE0)


def decoded_bytes(data: bytes) -> int | None:
    """The bytes the decoded pixels of this file take, from its header alone:
    rows x cols x frames x samples x bytes per sample. None when the header does not say (the
    decoder then refuses the file with its own reason)."""
    try:
        bare = not is_dicom(data) and bare_dicom_encoding(data[:SNIFF_BYTES]) is not None
        if is_dicom(data) or bare:
            if bare:  # no preamble, 'DICM' or file meta: read as the decoder reads it (cxr.dicom.read_dataset)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import pydicom

                    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            else:
                ds = _dicom_header(data)
            rows, cols = ds.get("Rows"), ds.get("Columns")
            if not isinstance(rows, int) or not isinstance(cols, int):
                return None
            frames = int(str(ds.get("NumberOfFrames") or 1).strip() or 1)
            samples = int(ds.get("SamplesPerPixel") or 1)
            bits = int(ds.get("BitsAllocated") or 16)
            return max(0, rows) * max(0, cols) * max(1, frames) * max(1, samples) * max(1, math.ceil(bits / 8))
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))  # the header only; nothing is decoded
            width, height, mode, bands = img.width, img.height, img.mode, len(img.getbands())
        return width * height * bands * _BYTES_PER_BAND.get(mode, 4)
    except Exception:  # noqa: BLE001 - an unreadable header: the decoder says why, with a stable code
        return None


class TooLargeForBudget(Exception):
    def __init__(self, nbytes: int, budget: int) -> None:
        super().__init__(nbytes, budget)
        self.code = str(Code.too_large)
        self.message = (f"the image decodes to {nbytes / 1048576:,.0f} MB (rows x columns x frames x samples x bytes "
                        f"per sample, from its header), more than this worker's whole decode budget of "
                        f"{budget / 1048576:,.0f} MB; refused before decoding. Send a smaller image, or raise "
                        "CXR_DECODE_BUDGET_MB where the workers have the memory")


class DecodeBudget:
    """A byte semaphore for one process: :meth:`hold` waits until ``nbytes`` fit beside what
    is already held (first come, first served, so a large study is not starved by small ones).
    ``in_flight`` and ``peak`` are the bytes held now and the most ever held at once."""

    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError("the decode budget must be positive")
        self.total = int(total_bytes)
        self.in_flight = 0
        self.peak = 0
        self.waited = 0  # admissions that had to wait
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` for the duration of the block. Raises TooLargeForBudget when
        ``nbytes`` alone exceeds the whole budget (it could never be admitted)."""
        nbytes = max(0, int(nbytes))
        if nbytes > self.total:
            raise TooLargeForBudget(nbytes, self.total)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            waited = False
            while self._queue[0] is not ticket or self.in_flight + nbytes > self.total:
                waited = True
                self._cond.wait()
            self._queue.popleft()
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)
            self.waited += waited
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= nbytes
                self._cond.notify_all()
