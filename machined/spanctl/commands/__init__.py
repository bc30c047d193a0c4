"""spanctl's commands, one module per command group; :mod:`machined.spanctl.parser` wires them."""
