"""The module paths of iav-trl 0.1's flat layout, kept importable for one release after the package moved into
folders (`iav_trl.model` is now `iav_trl.tuners.iav.model`, ...).

Checkpoints pickle their `training_args.bin` by class path (`iav_trl.iav_config.IAVConfig`), and user code may import
the old paths: each old name resolves to the new module itself (the same module object, not a copy), with a
`FutureWarning` naming the new path. Old paths that are now packages (`iav_trl.cli`, `iav_trl.evaluation`,
`iav_trl.inference`) re-export their old public names from the package instead. `iav_trl.io`, split in three,
resolves to a module holding the public names of the three (`SPLIT_MODULES`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old module path -> new module path (to be removed in iav-trl 0.2)
MOVED_MODULES = {
    "iav_trl.alpha": "iav_trl.tuners.iav.alpha",
    "iav_trl.config": "iav_trl.tuners.iav.config",
    "iav_trl.layer": "iav_trl.tuners.iav.head",
    "iav_trl.readout": "iav_trl.tuners.iav.readout",
    "iav_trl.fused": "iav_trl.tuners.iav.fused",
    "iav_trl.model": "iav_trl.tuners.iav.model",
    "iav_trl.model_card": "iav_trl.tuners.iav.model_card",
    "iav_trl.iav_config": "iav_trl.trainer.iav_config",
    "iav_trl.iav_trainer": "iav_trl.trainer.iav_trainer",
    "iav_trl.features": "iav_trl.trainer.features",
    "iav_trl.kl_control": "iav_trl.trainer.kl_control",
    "iav_trl.callbacks": "iav_trl.trainer.callbacks",
    "iav_trl.input_checks": "iav_trl.trainer.input_checks",
    "iav_trl.base_models": "iav_trl.models.base_models",
    "iav_trl.fingerprint": "iav_trl.models.fingerprint",
    "iav_trl.tiny": "iav_trl.models.tiny",
    "iav_trl.genarm": "iav_trl.inference.genarm",
    "iav_trl.serving": "iav_trl.inference.serving",
    "iav_trl.evaluation_config": "iav_trl.evaluation.config",
    "iav_trl.evaluation_metrics": "iav_trl.evaluation.metrics",
    "iav_trl.plotting": "iav_trl.evaluation.plotting",
    "iav_trl.cli_args": "iav_trl.scripts.args",
    "iav_trl.cli_recipe": "iav_trl.cli.recipe",
    "iav_trl.cli_models": "iav_trl.scripts.models",
    "iav_trl.cli_train": "iav_trl.scripts.train",
    "iav_trl.cli_inference": "iav_trl.scripts.inference",
}


# old module path -> the modules its public names went to
SPLIT_MODULES = {"iav_trl.io": ("iav_trl.utils.files", "iav_trl.utils.hub", "iav_trl.trainer.checkpoints")}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec) -> ModuleType:
        warnings.warn(
            f"`{spec.name}` moved to `{self.new_name}`; the old path is removed in iav-trl 0.2.",
            FutureWarning,
            stacklevel=2,
        )
        if spec.name not in SPLIT_MODULES:
            return importlib.import_module(self.new_name)
        module = ModuleType(spec.name, f"iav-trl 0.1's `{spec.name}`, now split into {self.new_name}.")
        for name in SPLIT_MODULES[spec.name]:
            source = importlib.import_module(name)
            module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("_")})
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: `create_module` returned the new module, already executed by its own import (for a split
        module, a module filled from the new ones)."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of `MOVED_MODULES` and `SPLIT_MODULES` and answers them with the new modules."""

    def find_spec(self, fullname: str, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname) or ", ".join(SPLIT_MODULES.get(fullname, ()))
        if not new_name:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    """Register the finder (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
