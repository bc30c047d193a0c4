"""apid's one authorization step of its own: which roles a call runs with.

The roles, their parser and the rule table are machined's (:mod:`machined.api.roles`), so apid and
machined cannot disagree. Roles are the ``O=`` values of the verified client leaf certificate, one role
per value (:func:`machined.api.roles.parse_roles`). A caller holding ``os:impersonator`` (another apid
forwarding a user's call) may name the roles to act with in ``talos-role`` metadata, one role per
value; those replace its certificate's roles. Anyone else's ``talos-role`` is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

from machined.api.roles import IMPERSONATOR, parse_roles, role_values


def effective_roles(
    cert_roles: frozenset[str], metadata: Sequence[tuple[str, str | bytes]] | None
) -> frozenset[str]:
    """The roles a call runs with: the certificate's, or — for an ``os:impersonator`` caller that sends
    ``talos-role`` metadata — those (a header naming no valid role: none). Anyone else's ``talos-role``
    metadata is ignored."""
    if IMPERSONATOR in cert_roles:
        values = role_values(metadata)
        if values is not None:
            return parse_roles(values)
    return cert_roles
