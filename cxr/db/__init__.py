"""Database layer: typed SQLAlchemy 2 models, engine/session factory, repository functions."""
