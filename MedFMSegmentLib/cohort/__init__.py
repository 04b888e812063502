"""Cohort-scale batch work: the batch on a Dask cluster, DICOM SEG output, a QC report.

Its dependencies (dask/distributed, highdicom) are the optional extra ``medfmsegment[cohort]``;
nothing here is imported unless asked for (``batch --cluster``, ``--format dcm``, ``--report``).
Modules: :mod:`.cluster` (starting or joining a cluster), :mod:`.distributed` (the batch on it),
:mod:`.dicom_seg`, :mod:`.qc_report`.
"""

__all__ = ["cluster", "distributed", "dicom_seg", "qc_report"]
