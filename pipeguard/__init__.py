"""pipeguard: pipeline-parallel training across machines that don't trust each other.

This package is the core library both daemons share: the wire format (``v1``, ``signing``,
``tensors``), identities (``identity``), errors, configuration, the model and the data.
The daemons themselves live in the top-level ``node`` and ``coordinator`` packages, and the app on
top of them (the ``pipeguard`` command, the local testnet) in ``pipeguard.app``; the core never
imports either (tests/test_layering.py).
"""

__version__ = "0.1.0"

import warnings as _warnings

# The CPU torch wheel does not depend on NumPy and warns about it on import; pipeguard never
# needs NumPy (tensors cross the wire as raw bytes), so the warning is noise.
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
