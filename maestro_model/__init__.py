"""MAESTRO in PyTorch, numerically faithful to the official implementation (IGNF/MAESTRO@6a30075)."""
