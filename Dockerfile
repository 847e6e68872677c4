# One image for api, watcher, worker and migrate. Multi-stage, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY cxr cxr
COPY api api
COPY worker worker
COPY trainer trainer
COPY migrations migrations
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 cxr
COPY --from=build /opt/venv /opt/venv
COPY --chown=cxr alembic.ini /app/alembic.ini
COPY --chown=cxr migrations /app/migrations
COPY --chown=cxr models /app/models
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH CXR_HOME=/data CXR_INBOX=/inbox PYTHONUNBUFFERED=1
USER cxr
ENTRYPOINT ["cxr"]
CMD ["--help"]
