"""Export a trained model as a MONAI Bundle, and the components its configs name."""

from unetpp3d.bundle.components import (
    AtomicNibabelWriter,
    BundleEvaluator,
    CaseNames,
    NoduleReportd,
    SaveMaskd,
    load_network,
    one_line_user_errors,
    scan_datalist,
)
from unetpp3d.bundle.configs import meta_schema_path, verify_metadata
from unetpp3d.bundle.export import export_bundle
from unetpp3d.bundle.training import BundleTrainer, BundleValidator, labelled_datalist

__all__ = ["AtomicNibabelWriter", "BundleEvaluator", "BundleTrainer", "BundleValidator", "CaseNames", "NoduleReportd",
           "SaveMaskd", "export_bundle", "labelled_datalist", "load_network", "meta_schema_path",
           "one_line_user_errors", "scan_datalist", "verify_metadata"]
