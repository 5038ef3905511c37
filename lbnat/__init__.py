"""lbnat: a Layer-4 NAT load balancer for Linux, in Python. See docs/architecture.md."""

__version__ = "0.1.0"
