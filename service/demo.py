"""The demo web page (GET /) and the opt-in attack endpoint. Filled in by the web-page work (issue 7)."""

from fastapi import FastAPI


def register_demo(app: FastAPI) -> None:
    """Mount the demo page and the attack endpoint on `app` (reads what it needs from `app.state`)."""
