"""Test packages; this file puts the repository root (not tests/) on sys.path for conftest."""
