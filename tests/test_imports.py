import importlib
import pkgutil

import dadpo_offline


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(dadpo_offline.__path__, "dadpo_offline.")]
    assert "dadpo_offline.cli" in names and "dadpo_offline.cache.index" in names
    for name in names:
        if name != "dadpo_offline.__main__":
            importlib.import_module(name)
