"""Sub-commands of the ``diasr`` CLI, one module per family."""
