"""dicom-ai-node: the imperative shell (network, disk, clock, database, CLI)."""

__version__ = "0.1.0"
