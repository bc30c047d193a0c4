"""``spanctl dashboard --web``: a live web view of the mesh, assembled on the operator's side from the
machine API through apid (the registry stays blind). ``model`` is pure (resources in, view model out),
``collector`` runs the watches, ``server`` serves the page and its Server-Sent Events, ``web/`` holds
the page (no build step, nothing loaded from elsewhere)."""
