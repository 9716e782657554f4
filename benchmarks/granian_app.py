"""The service's ASGI app as a module-level object for Granian, a Rust HTTP server for ASGI apps:
`benchmarks/service_ab.py --against-granian` serves it with `python -m granian --interface asgi
benchmarks.granian_app:app`, settings from SOAP_* variables (SOAP_MODELS=models/zoo/mnist-fcn-dr).

Not a way to deploy: under Granian the service has none of service/server.py (the drain that loses no request on
SIGTERM) nor service/connection_guard.py (head timeouts, the connection cap). It exists to measure whether Granian's
HTTP front end is cheaper than uvicorn's for the same app (issue 27)."""

from service.app import create_app
from service.config import ServiceSettings

app = create_app(ServiceSettings())
