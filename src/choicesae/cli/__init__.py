"""The command line: each command parses its config and calls one function."""
