"""Example job specs, installed as the package ``maskd_examples``.

``maskd demo`` reads the quickstart spec from here through ``importlib.resources``, so it works
from an installed wheel as well as from a checkout; people read and copy the YAML files.
"""
