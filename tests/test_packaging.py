"""Optional dependencies: a missing extra raises an ImportError naming it, and the zoo still lists
the other modalities while naming what to install for the missing one."""

import importlib

import pytest

from moezoo.checks import import_extra
from moezoo.zoo import registry


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"no_such_module_xyz is needed here; .*pip install 'moezoo\[speech\]'"):
        import_extra("no_such_module_xyz", "speech")
    assert import_extra("json", "speech").dumps([1]) == "[1]"


def test_the_zoo_registers_the_rest_and_names_a_missing_modality(monkeypatch):
    real_import = importlib.import_module

    def without_speech(name, package=None):
        if name == "moezoo.modalities.speech.zoo":
            import_extra("no_such_module_xyz", "speech")
        return real_import(name, package)

    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry.importlib, "import_module", without_speech)
    for module in [m for m in list(importlib.sys.modules) if m.endswith(".zoo") and ".modalities." in m]:
        monkeypatch.delitem(importlib.sys.modules, module)  # registration happens at import
    assert "vmoe_ti_digits" in registry.list_models()
    assert not registry.list_models("speech*")
    with pytest.raises(KeyError, match=r"the speech modality is not installed .*moezoo\[speech\]"):
        registry.get_entry("speechmoe_tiny_espeak")
