"""The benchmark (``scripts-dev/bench/run``) and the demo (``scripts-dev/demo``).

Importable as ``bench`` with ``scripts-dev`` on ``sys.path`` (the entry points
arrange that) and the repository root too (for ``tests.fedkit``).
"""
