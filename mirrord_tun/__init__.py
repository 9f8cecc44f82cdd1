"""mirrord-ns: run a local program inside a Kubernetes pod's network."""
import os
import sys

__version__ = "0.1.0"

# Run with sudo from a user's editable install, Python would write root-owned __pycache__
# folders into the user's clone. Root's bytecode goes to a cache of root's instead (the
# package as installed by root, e.g. under /opt, keeps Python's usual place).
if os.geteuid() == 0 and sys.pycache_prefix is None and os.stat(__path__[0]).st_uid != 0:
    sys.pycache_prefix = "/var/cache/mirrord-ns/pycache"
