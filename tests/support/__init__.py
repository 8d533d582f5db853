"""Helpers of the tests, in one place: real peers, DICOM built in tests, the node as a process.

- ``peers``: DCMTK, Orthanc, PostgreSQL, dciodvfy, OpenJPH on loopback in temp dirs.
- ``data``: the real chest CT on disk (skips where it is absent).
- ``dicom``: results and small images built by hand; ``series``: synthetic CT series and radiographs.
- ``nodeproc``: the node in its own process (``launch_node`` is its entry point); ``inprocess``: the
  receiving half in the test process; ``runners``: the pipeline runners the node's tests use.
- ``cli``: the operator's commands as a subprocess; ``waiting``: bounded waits on a condition.
- ``viewer``: OHIF served from one local origin with Orthanc's DICOMweb.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root folder.
REPO = Path(__file__).resolve().parents[2]
