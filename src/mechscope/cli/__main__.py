"""``python -m mechscope.cli``: the same as the ``mechscope`` command."""

from mechscope.cli import main

main()
