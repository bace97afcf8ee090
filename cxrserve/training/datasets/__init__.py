"""Chest X-ray datasets: flat records, folder readers, public-format adapters, patient splits.

Every image becomes one :class:`Record` (path, source, raw label, patient, view, masks,
severity scores, survival, ...). Readers exist for

* the shared layout used by ``../shared/data`` and by the project's own phantom folders:
  ``root/labels.csv`` whose first two columns are ``filename,label`` (paths relative to
  ``root``) followed by optional, source-specific columns (:func:`read_folder`,
  :func:`read_shared`);
* three public formats: the ieee8023 covid-chestxray-dataset ``metadata.csv``
  (:func:`covid_chestxray_metadata`), NIH ChestX-ray14 ``Data_Entry_2017.csv``
  (:func:`nih_data_entry`) and the Kermany et al. folder tree (:func:`kermany_tree`).

Splits are always by patient (:func:`patient_split`, :func:`repeated_patient_splits`,
:func:`patient_kfold`). A patient is the pair ``(source, patient_id)``, so equal ids in
different sources are different people, unless a record names other patient keys in
``Record.links`` (the same person published twice under two ids, or the same image in
two collections): linked keys are merged into one group and always land in the same
part. :func:`find_duplicates` / :func:`link_duplicates` build such links from image
content, and :func:`read_shared` applies them by default.

Design follows torchxrayvision's datasets (one record per image, label mapping kept
apart from pixel loading) without its size: pixels are read only by
:class:`RecordDataset`, whose loader the caller can replace.
"""
from cxrserve.training.datasets.folders import read_folder, shared_sources, read_shared  # noqa: F401
from cxrserve.training.datasets.formats import covid_chestxray_metadata, nih_data_entry, kermany_tree  # noqa: F401
from cxrserve.training.datasets.grouping import patient_groups, find_duplicates, link_duplicates  # noqa: F401
from cxrserve.training.datasets.records import CLASS_LABELS, NON_IMAGE_FOLDERS, Record, triage_label_for, finding_to_label, normalize_view, kermany_patient  # noqa: F401
from cxrserve.training.datasets.splits import patient_split, repeated_patient_splits, patient_kfold  # noqa: F401
from cxrserve.training.datasets.summary import fingerprint, summarize  # noqa: F401
from cxrserve.training.datasets.torch_dataset import default_load, default_target, RecordDataset  # noqa: F401
