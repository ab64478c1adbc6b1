"""`python -m xbt ...`: the command line."""

from xbt.cli import main

main()
