"""What a route depends on, typed: `runtime_of(request)` is the ServiceRuntime its app was built with (create_app
puts it on `app.state.runtime`, once, before any route is added; nothing else is kept on app.state). Routes call it
or declare `Runtime` as a parameter (`runtime: Runtime`); they close over no app state.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .runtime import ServiceRuntime


def runtime_of(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


Runtime = Annotated[ServiceRuntime, Depends(runtime_of)]
