"""The task files of the bundled datasets (package data)."""
