"""Cohort-scale batch work: the batch on a Dask cluster, DICOM SEG output, a QC report.

Its dependencies (dask/distributed, highdicom) are the optional extra ``medfmsegment[cohort]``;
nothing here is imported unless asked for (``--cluster``, ``--format dcm``, ``--report``).
Modules: :mod:`.cluster` (starting or joining a cluster), :mod:`.distributed` (the batch on it),
:mod:`.dicom_seg`, :mod:`.qc_report`, :mod:`.cli` (the ``batch`` command's cohort options).
"""

__all__ = ["cluster", "distributed", "dicom_seg", "qc_report", "cli"]
