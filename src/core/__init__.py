"""The lowest layer: what every other package uses and that uses none of them (``core.distributed``,
``core.compute``)."""
