"""The one thing pyproject.toml cannot say: the C packet path (mirrord_tun/_datapath.c, _gcm.c).

Optional: without a C compiler and Python's headers (Debian: gcc, python3-dev; scripts/install
brings them) the build goes on without it, and the packet path runs in Python (native.py).
The sources' hash is compiled in, so an extension built from another version of the files
(an editable install after a `git pull`) is not used (native.py).
"""
import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCES = ["mirrord_tun/_datapath.c", "mirrord_tun/_gcm.c"]
HEADERS = ["mirrord_tun/_gcm.h"]
here = Path(__file__).resolve().parent
digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in SOURCES + HEADERS)).hexdigest()
setup(ext_modules=[Extension("mirrord_tun._datapath", SOURCES, depends=HEADERS, optional=True,
                             define_macros=[("DATAPATH_SOURCE_SHA256", f'"{digest}"')])])
