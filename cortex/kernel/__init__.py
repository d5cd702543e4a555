"""The kernel: the contracts every other part of Cortex and every plugin builds on.

Hook specifications, component interfaces, the registry, plugin discovery and the
manifest schema. Nothing here imports torch at import time.
"""

#: the version of Cortex (``cortex.__version__``)
VERSION = "0.1.0"
