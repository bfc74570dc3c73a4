"""kernelsel's registry: the manifest schema, its loader, op contracts and adapters.

Importing it is free: no torch, flashinfer or triton.  Adapters import their
library when one is built for a selection.
"""

from registry.errors import KernelselError, ManifestError
from registry.loader import bundled_manifest_path, load_manifest
from registry.schema import KernelSpec, Manifest

__all__ = ["KernelSpec", "KernelselError", "Manifest", "ManifestError", "bundled_manifest_path", "load_manifest"]
