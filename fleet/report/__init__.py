"""The fleet report: what the registry knows about a set of devices, as one self-contained
HTML file with plots (``fleet report --html``) or as CSV tables (``--csv``).

One concept per module: :mod:`fleet.report.data` gathers plain dataclasses from the
registry (a fixed number of queries whatever the fleet size); :mod:`fleet.report.figures`
draws them with Plotly; :mod:`fleet.report.html` assembles the page (plotly.js inlined
once, so it opens offline); :mod:`fleet.report.csvfiles` writes one CSV per table.
Plotly is imported only here, never by ``fleet --help`` or other commands.
"""
