"""Reading and writing scans and masks: NIfTI, NRRD, MetaImage and DICOM series, validated on every read."""
