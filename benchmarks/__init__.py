"""Benchmarks of lightning-stablelr: ``python -m benchmarks.overhead`` and ``python -m benchmarks.robustness``.

Both write their tables into ``benchmarks/RESULTS.md`` (each between its own markers) and record the
command, the machine and the date next to the numbers. They depend on ``recipes`` (the library never does).
"""
