"""Kubernetes targets: find the pod, launch an agent next to it, reach it, remove it.

Everything here imports the `kubernetes` client (an optional extra), so nothing
outside this package imports it: `run --agent` never pays for it.
"""
