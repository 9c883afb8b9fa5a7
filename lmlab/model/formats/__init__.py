"""The on-disk forms the loader reads (`lmlab.model.loading`), one module each.

Every module in this package is imported when the loader first looks for a form, and
registers its reader with `register_format` as it is imported: a new form is a new file
here, and neither this file nor the loader names it.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
