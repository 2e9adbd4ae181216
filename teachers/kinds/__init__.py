"""The teacher families shipped with the package: one module per kind, holding its spec class and its registered
`Teacher`. Importing this package imports every module in it, so adding a kind is adding one file here (a kind
kept elsewhere is a module named in a manifest's `plugins:`).
"""

import importlib
import pkgutil

# Registration happens on import; listing the folder instead of naming the modules is what keeps a new kind to
# one new file.
for _family in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
    importlib.import_module(_family.name)
