"""`python -m xbt.cli ...` (what `./run.sh xbt` and torchrun run)."""

from xbt.cli import main

main()
