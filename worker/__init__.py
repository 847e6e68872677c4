"""Worker side: the folder watcher, the Celery tasks and the screening core (``worker.screening``).

Importing this package imports no torch; the model is loaded lazily, once per worker process.
"""
