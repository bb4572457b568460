"""Alembic scripts of the job database, installed as the package ``maskd_migrations``.

The folder stays ``migrations/`` at the repository root (where ``alembic.ini`` points); the wheel
maps it to this package so ``service.db`` finds the scripts through ``importlib.resources`` in an
installed service as well as in a checkout.
"""
