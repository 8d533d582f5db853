"""The functional core: series in, results out.

Nothing in this package opens a socket, touches the database or reads the node's
configuration (see ARCHITECTURE.md, invariant 5). Inputs are pydicom datasets or
file paths; outputs are the plain result objects of :mod:`pipelines.results` and
the DICOM datasets made from them by :mod:`pipelines.dicom`. :mod:`pipelines.study`
analyses one study from end to end (select, load, run, write): the node's worker
and ``ainode run`` both call it.
"""
