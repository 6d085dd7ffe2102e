"""From a manifest to training batches: cases, validation, fingerprint, planning, transforms and loaders."""
