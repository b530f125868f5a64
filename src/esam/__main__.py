"""``python -m esam``: the command line (see `esam.cli`)."""

from esam.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
