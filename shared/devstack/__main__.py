"""`python -m shared.devstack`: see shared.devstack.cli.main."""

from __future__ import annotations

from shared.devstack.cli import main

if __name__ == "__main__":
    main()
