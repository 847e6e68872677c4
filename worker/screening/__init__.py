"""The screening core: plain functions for decode -> preprocess -> infer -> explain.

Nothing here knows about HTTP, Celery or SQL. ``cxr predict``, the Celery worker and the
trainer all call these same functions, so they cannot drift apart.
"""
