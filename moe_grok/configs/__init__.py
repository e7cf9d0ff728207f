"""The run configs shipped with the package: one ml_collections config file per job (`get_config()`).

Each file is read by path, the way ml_collections' config flags read a config file, so an
installed package (not only a source checkout) serves them: `moe-grok toy --config=toy_mixture`,
or `--config=<path of a config file of one's own>`. Every key is declared with a trailing comment,
its help (`moe-grok print-config NAME` lists them). A config file that builds on another loads it
with `moe_grok.studies.launch.config_module` from this directory.
"""
from __future__ import annotations

import importlib.resources
import os

import ml_collections


def directory() -> str:
    """The directory holding the shipped config files (inside the installed package)."""
    return os.fspath(importlib.resources.files(__name__))


def names() -> list[str]:
    """The shipped configs' names (file stems), sorted."""
    return sorted(name[:-3] for name in os.listdir(directory())
                  if name.endswith(".py") and not name.startswith("_"))


def path(name_or_path: str) -> str:
    """The file of a shipped config named `name_or_path` (e.g. "toy_mixture"), or `name_or_path`
    itself where it is an existing file. ValueError names the shipped configs otherwise."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in names():
        return os.path.join(directory(), f"{name_or_path}.py")
    raise ValueError(f"no config {name_or_path!r}: neither a file nor a shipped config ({', '.join(names())})")


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """The `get_config()` of a shipped config (by name) or of a config file (by path)."""
    from moe_grok.studies.launch import config_module

    file = path(name_or_path)
    return config_module(os.path.dirname(os.path.abspath(file)), os.path.basename(file)[:-3]).get_config()
