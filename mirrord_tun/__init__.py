"""mirrord-ns: run a local program inside a Kubernetes pod's network."""

__version__ = "0.1.0"
