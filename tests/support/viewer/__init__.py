"""The radiologist's view: the OHIF v3 web viewer, served locally in front of the test Orthanc."""
