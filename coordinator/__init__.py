"""The pipeguard coordinator: registry, stage assignment, step clock and status API."""
