"""`python -m mirrord_tun`: the `mirrord-ns` command (children of `demo` and the tests start it so)."""
from mirrord_tun.cli import console

console()
