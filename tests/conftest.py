"""Suite-wide settings. OpenMP threads that spin while waiting waste a busy 2-core CI machine
(the service sets the same policy); this must happen before torch is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
