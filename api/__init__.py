"""Thin HTTP intake: validate, store, write rows, enqueue. Never imports torch."""
