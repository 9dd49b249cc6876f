"""Classic results reproduced from scratch with mechscope's own hooks and analyses.

- :mod:`~mechscope.toys.superposition`: Toy Models of Superposition (Elhage et al. 2022).
- :mod:`~mechscope.toys.modular`: modular addition and grokking (Nanda et al. 2023).
- :mod:`~mechscope.toys.induction`: induction heads and the phase change (Olsson et al. 2022).

Each returns one JSON-ready result (:mod:`~mechscope.toys.common`) that ``mechscope.report.toys`` renders
as HTML beside the paper's numbers; ``mechscope toy NAME`` runs one from the command line.
"""
