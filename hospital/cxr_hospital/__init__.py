"""cxr_hospital: hospital integration on top of the cxr runtime.

DICOM Structured Reports (:mod:`cxr_hospital.sr`, ``cxr-infer --format dicom-sr``), FHIR R4
(:mod:`cxr_hospital.fhir`, ``cxr-infer --format fhir``), the vocabulary both share
(:mod:`cxr_hospital.report`) and the Orthanc PACS link (:mod:`cxr_hospital.pacs`, ``cxr-pacs``).
It imports the runtime (``cxr_infer``); the runtime never imports it: the output formats reach
``cxr-infer`` through the ``cxr.formats`` entry point group.
"""
