"""The base class of every view on the worker's web server."""

from __future__ import annotations

from faust.web import View


class RouteView(View):
    """A Faust view that gets a HEAD route only when it serves GET.

    Faust 0.15 routes HEAD to every view and handles it with the view's GET, so a
    view without GET listed HEAD in the Allow header of its 405 responses and then
    rejected HEAD with 405 too. Without the HEAD route, aiohttp rejects HEAD with
    the same 405 and an Allow header that lists only the methods served.
    """

    def get_methods(self) -> set[str]:
        methods = set(super().get_methods())
        if "GET" not in methods:
            methods.discard("HEAD")
        return methods
