"""cxr-screen: batch screening of chest radiographs. Screening aid, not for clinical use.

The ``cxr`` package holds what every process shares and that needs no torch:
settings, the database layer, the content-addressed store, the queue client and
the command line. The screening core (torch) lives in ``worker.screening``.
"""

__version__ = "0.1.0"

CLASS_NAMES_DEFAULT = ("Normal", "Pneumonia", "Tuberculosis")
DISCLAIMER = "Screening aid only - not for clinical use. Results must be reviewed by a qualified reader."
