"""The agent: an SSH server whose sessions plug a TUN into the target's namespace."""
