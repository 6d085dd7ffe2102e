"""Export a trained model as a MONAI Bundle, and the components its ``inference.json`` names."""

from unetpp3d.bundle.components import (
           BundleEvaluator,
           SaveMaskd,
           load_network,
           scan_datalist,
)
from unetpp3d.bundle.configs import meta_schema_path, verify_metadata
from unetpp3d.bundle.export import export_bundle

__all__ = ["BundleEvaluator", "SaveMaskd", "export_bundle", "load_network", "meta_schema_path", "scan_datalist",
           "verify_metadata"]
