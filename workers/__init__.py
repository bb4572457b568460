"""Celery workers that run MasKD jobs: the app, the job task, its lease and the reconciler.

Nothing in this package imports torch at module level: the prefork pool forks children from the
worker's parent process, and torch (GNU OpenMP) used before a fork hangs the children.
"""
