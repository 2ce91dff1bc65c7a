"""`python -m jepa_cache` and `torchrun -m jepa_cache` run the CLI."""

from .cli import main

main()
