"""The on-disk format of an exported directory, shared by the exporters (export/) and the backends that run
exports: manifest.py (every file's SHA-256, and checking a directory against it) and contract.py (each
component's inputs and outputs: names, shapes with named dynamic axes, dtypes)."""
