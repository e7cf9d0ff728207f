"""The shipped config files (moe_grok/configs/*.py), loaded the way ml_collections' config flags load them."""
from moe_grok import configs

CONFIG_DIR = configs.directory()


def load_config(name: str):
    """The shipped config `name`'s get_config()."""
    return configs.load(name)
