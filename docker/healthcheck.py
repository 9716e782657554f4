"""Container health check: exit 0 when the service answers GET /readyz with 200, 1 otherwise.

Standard library only (the image has no curl). Used by the Dockerfile HEALTHCHECK and docker-compose.yml;
Kubernetes probes call /readyz and /healthz directly. Asks the address and port the service listens on
(SOAP_HOST, SOAP_PORT; a wildcard address means loopback).
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    host = os.environ.get("SOAP_HOST", "").strip() or "0.0.0.0"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    port = os.environ.get("SOAP_PORT", "8000")
    url = f"http://{host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as error:  # 503 while loading or warming up
        print(f"{url}: HTTP {error.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # refused, timed out, bad URL
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
