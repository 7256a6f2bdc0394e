"""``pipeguard``: the user's command line (status, testnet, keygen)."""
import sys


def main(argv=None) -> int:
    print("todo")
    return 0
