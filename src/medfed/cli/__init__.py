"""Command line: parse, build a config, call the library, render."""
