"""`python -m jointcli.cli ARGS` runs `jointopt ARGS`."""

from .main import main

if __name__ == "__main__":
    main()
