"""Revision scripts; alembic loads them by file name (it skips this ``__init__``)."""
