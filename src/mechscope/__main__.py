"""``python -m mechscope`` (and ``torchrun ... -m mechscope``): the same as the ``mechscope`` command."""

from mechscope.cli import main

main()
