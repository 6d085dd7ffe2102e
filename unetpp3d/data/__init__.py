"""From a manifest to training batches: cases, validation, fingerprint, transforms and loaders."""
