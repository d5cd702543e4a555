"""Placeholder: the `working` feature is being written."""

from cortex import hookimpl


@hookimpl
def cortex_register_components(register):
    pass
