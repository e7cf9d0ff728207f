"""The launchers' config files (configs/*.py), loaded the way ml_collections' config flags load them."""
import os

from moe_grok.studies.launch import config_module

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    return config_module(CONFIG_DIR, name).get_config()
