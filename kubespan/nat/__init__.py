"""NAT traversal for the mesh: learn the public mapping of the WireGuard port and classify the NAT.

``rawstun`` sends STUN Binding requests from the WireGuard port through a raw socket (WireGuard keeps
owning the port); ``classify`` turns the answers of two or more responders into a NAT class; ``punch``
decides when to punch towards which peer and when to fall back to a relay. The codec
itself is ``spanutil.stun`` (the discovery service's responder uses it too).
"""
