"""The pipeguard node daemon: serves one pipeline stage, or stands by."""
