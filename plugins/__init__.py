"""The built-in Cortex plugins, installed as ``cortex_plugins``.

Each module is one feature, registered through the ``cortex.plugins`` entry-point group
exactly as a third-party package would be.
"""
