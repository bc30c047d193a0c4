"""``spanctl``: the operator CLI, in talosctl's conventions (NODE column first, UPPERCASE headers,
errors per node after the output, ``-o table|yaml|json``).

Modules: :mod:`.config` (client config in talosconfig's format), :mod:`.client` (connections to apid
or to machined's socket, per-node errors), :mod:`.output` (tables, resource rendering, watch),
:mod:`.mesh` (health evaluation and the mesh matrix), :mod:`.app` (the connection and fanned-out
calls), :mod:`.parser` (arguments), :mod:`.commands` (one module per command group), :mod:`.main`
(the entry point).
"""
