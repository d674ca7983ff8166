"""LYNX confidence probes and online early exit."""
