# One image for migrate, api, watcher and worker. Multi-stage; runs as a non-root user.
# Screening aid, not for clinical use.
#
# The code lives at /app and is installed there in editable mode: cxr finds alembic.ini,
# migrations/ and models/ next to its package (cxr.settings.PROJECT_ROOT), so
# `cxr db upgrade` and the shipped default bundle work in the container as in a checkout.

# --- build: a virtual environment with every dependency ---------------------------------
FROM python:3.11-slim AS build
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cxr cxr
COPY api api
COPY worker worker
COPY trainer trainer
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir -e .

# --- runtime: the venv and the code; no build tools, no root ---------------------------
FROM python:3.11-slim AS runtime
# Named volumes mounted on these folders start with this ownership, so the non-root user can write.
RUN useradd --create-home --uid 10001 cxr \
    && mkdir -p /data/store /data/heatmaps /inbox /outbox \
    && chown -R cxr:cxr /data /inbox /outbox
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY alembic.ini /app/alembic.ini
COPY migrations /app/migrations
COPY models /app/models
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH CXR_HOME=/data CXR_INBOX=/inbox PYTHONUNBUFFERED=1
EXPOSE 8000 9100
USER cxr
ENTRYPOINT ["cxr"]
CMD ["--help"]
