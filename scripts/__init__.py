"""Installation scripts, and `make demo` (run as ``python -m scripts.demo`` from the repository root)."""
