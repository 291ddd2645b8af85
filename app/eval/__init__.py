"""Evaluation and benchmark harness behind ``factpatch eval`` and ``factpatch bench``.

``datasets`` reads zsRE and CounterFact records, ``backends`` drives the service's HTTP API
(over the network or in-process), ``runner`` applies edits and measures them, ``metrics`` holds
the metric functions, ``report`` writes results.json / report.md / PNG curves, ``bench`` times
the served path, and ``cli`` exposes both commands.
"""
