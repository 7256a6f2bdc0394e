"""The app on top of the core library: the ``pipeguard`` command, status rendering, the local
testnet and demo, model export and the generated config reference.

Unlike the core (``pipeguard`` minus this package), the app may import the daemons
(``node``, ``coordinator``) and the ``benchmarks/`` scripts; tests/test_layering.py enforces that
the core never does.
"""
