"""The `bake` command line: argument parsing and rendering; the engine does the work."""
