"""unetpp3d: 3D UNet++ segmentation of CT scans, built on MONAI and PyTorch.

Research software: no clinical model ships with it, and it is not a medical device.
"""

from unetpp3d.errors import UserError
from unetpp3d.model.network import UNetPlusPlus3D, load_model

# The one source of the version: pyproject.toml reads this line (setuptools dynamic attr), and
# `unetpp3d --version`, evaluate's summary.json and the package metadata all come from it.
__version__ = "0.1.0"
__all__ = ["UNetPlusPlus3D", "UserError", "load_model", "__version__"]
