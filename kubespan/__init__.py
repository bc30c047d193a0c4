"""KubeSpan mesh engine (WireGuard controller).

Importing any part of it registers the light pyroute2 stand-in first (:mod:`kubespan.lazynetlink`):
agent start-up CPU, issue 18.
"""

from kubespan import lazynetlink

lazynetlink.install()
