"""The on-disk forms the loader reads (`lmlab.model.loading`), one module each.

Importing this package imports every module in it (the loader imports it), and each
registers its reader with `registry.register_format` as it is imported: a new form is a
new file here, and neither this file nor the loader names it.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
