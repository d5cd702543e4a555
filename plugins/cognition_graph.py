"""Placeholder: the `cognition_graph` feature is being written."""

from cortex import hookimpl


@hookimpl
def cortex_register_components(register):
    pass
