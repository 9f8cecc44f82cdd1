"""The one thing pyproject.toml cannot say: the C packet path (mirrord_tun/_datapath.c).

Optional: without a C compiler and Python's headers (Debian: gcc, python3-dev; scripts/install
brings them) the build goes on without it, and the packet path runs in Python (native.py).
The source's hash is compiled in, so an extension built from another version of the file
(an editable install after a `git pull`) is not used.
"""
import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "mirrord_tun/_datapath.c"
digest = hashlib.sha256((Path(__file__).resolve().parent / SOURCE).read_bytes()).hexdigest()
setup(ext_modules=[Extension("mirrord_tun._datapath", [SOURCE], optional=True,
                             define_macros=[("DATAPATH_SOURCE_SHA256", f'"{digest}"')])])
