"""The baseline's responder as a process: ``python -m ops.bench.respond HOST PORT V USER``.

The password comes on stdin, never on the command line.
"""

from __future__ import annotations

from .baseline import main

if __name__ == "__main__":
    main()
