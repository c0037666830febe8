"""``import sparsebert`` makes the ``sparsebert`` model type known to every Auto class of transformers, without
importing torch or transformers itself (the entry points import the package before torch, on purpose).

transformers' Auto classes live in modules that import torch, so the registration waits for transformers: a finder
on ``sys.meta_path`` (:func:`install`, run by ``sparsebert/__init__.py``) watches two modules. When
``transformers.models.auto.configuration_auto`` has run, a stand-in for the config class is registered under the
model type; its first use (``AutoConfig.from_pretrained`` on a SparseBERT folder, ``pipeline(...)``,
``AutoModel*.from_pretrained``, which reads the config first) imports :mod:`sparsebert.model.modeling` and registers
the real config and model classes with every Auto class, replacing the stand-in. When
:mod:`sparsebert.model.modeling` itself has run (a user imported the classes), the real classes are registered at
once. Registering the real classes as soon as transformers' auto module has run would be unsafe: transformers loads
it halfway through ``transformers.modeling_utils``, which the model classes need.

This module is not part of the code a standalone export ships (:mod:`sparsebert.model.standalone`): there
transformers registers the shipped classes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Any

MODEL_TYPE = "sparsebert"
# Auto class → the model class of sparsebert.model.modeling it makes for a SparseBERT config.
AUTO_MODELS = {
    "AutoModel": "SparseBertModel",
    "AutoModelForPreTraining": "SparseBertForPreTraining",
    "AutoModelForMaskedLM": "SparseBertForMaskedLM",
    "AutoModelForSequenceClassification": "SparseBertForSequenceClassification",
    "AutoModelForQuestionAnswering": "SparseBertForQuestionAnswering",
}
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING = "sparsebert.model.modeling"

_lock = threading.RLock()
_registered = False


def install() -> None:
    """Register with transformers now if its auto module is loaded, and in any case when it (or the model classes)
    load later. Idempotent; imports neither torch nor transformers."""
    with _lock:
        if not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
            sys.meta_path.insert(0, _Watcher())
        if _CONFIG_AUTO in sys.modules:
            _register_stand_in(sys.modules[_CONFIG_AUTO])


def register_auto_classes(modeling: ModuleType | None = None) -> None:
    """Register :class:`~sparsebert.model.modeling.SparseBertConfig` with ``AutoConfig`` and each model class with
    its Auto class (:data:`AUTO_MODELS`). Idempotent; imports the model classes unless given their module."""
    global _registered
    with _lock:
        if _registered:
            return
        modeling = modeling or importlib.import_module(_MODELING)
        import transformers

        transformers.AutoConfig.register(MODEL_TYPE, modeling.SparseBertConfig, exist_ok=True)
        for auto, name in AUTO_MODELS.items():
            getattr(transformers, auto).register(
                modeling.SparseBertConfig, getattr(modeling, name), exist_ok=True
            )
        _registered = True


def _register_stand_in(configuration_auto: ModuleType) -> None:
    with _lock:
        if not _registered and MODEL_TYPE not in configuration_auto.CONFIG_MAPPING:
            configuration_auto.CONFIG_MAPPING.register(MODEL_TYPE, SparseBertConfig, exist_ok=True)


def _real_config() -> type:
    register_auto_classes()
    return importlib.import_module(_MODELING).SparseBertConfig


class _OnFirstUse(type):
    """The stand-in's class: every attribute it lacks, a call, ``isinstance`` and ``issubclass`` go to the real
    config class, which the first of them loads and registers."""

    def __getattr__(cls, name: str) -> Any:
        return getattr(_real_config(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return _real_config()(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _real_config())

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _real_config())


class SparseBertConfig(metaclass=_OnFirstUse):
    """Stands for :class:`sparsebert.model.modeling.SparseBertConfig` in transformers' config mapping until it is
    first used (its module is not transformers', so transformers treats it as installed code, as it is)."""

    model_type = MODEL_TYPE


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds the two watched modules through the other finders and runs the registration after each has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_CONFIG_AUTO, _MODELING):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            then = _register_stand_in if fullname == _CONFIG_AUTO else register_auto_classes
            spec.loader = _ThenRegister(spec.loader, then)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """A module's own loader, then ``then(module)`` once the module has run."""

    def __init__(self, loader: Any, then: Any):
        self._loader, self._then = loader, then

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_resource_reader, ...: the module's own loader's
        return getattr(self._loader, name)
