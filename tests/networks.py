"""Networks of the tests, built from the configs' network defs with a profile layered: one source of truth."""

from __future__ import annotations

import warnings
from pathlib import Path
from pydoc import locate

from monai.bundle import ConfigParser
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEF_CONFIG = {"phenotype_vae_def": "train_phenotype_vae.json", "autoencoder_def": "train_autoencoder.json",
              "mar_def": "train_mar.json", "segmenter_def": "train_segmenter.json"}


def layered(config: str, profile: str) -> dict:
    """configs/<config> with configs/profiles/<profile>.json layered as MONAI's loader does (unparsed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Can't merge entry")
        return ConfigParser.load_config_files([CONFIGS / config, CONFIGS / "profiles" / f"{profile}.json"])


def is_expression(value: object) -> bool:
    """A config value MONAI evaluates (`$` expression) or references (`@id`): data-dependent, not a literal argument."""
    return isinstance(value, str) and value[:1] in "$@"


def def_kwargs(name: str, profile: str, config: str | None = None) -> dict:
    """Constructor kwargs of the entry `name` (e.g. "mar_def") of `config` (default: the config that trains it) with
    configs/profiles/<profile>.json layered; data-dependent (expression) arguments are left out."""
    entry = layered(config or DEF_CONFIG[name], profile)[name]
    return {k: v for k, v in entry.items() if k != "_target_" and not is_expression(v)}


def build(name: str, profile: str, **values) -> nn.Module:
    """The network of `name` for `profile` (`def_kwargs`), `values` giving or replacing arguments (e.g. n_phenotypes)."""
    target = locate(ConfigParser.load_config_file(CONFIGS / DEF_CONFIG[name])[name]["_target_"])
    return target(**(def_kwargs(name, profile) | values))
