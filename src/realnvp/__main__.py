"""``python -m realnvp``: the command line."""

from .cli import main

main()
