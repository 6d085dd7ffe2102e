"""The network (UNet++ and its fused fast path) and the checkpoint it is saved in."""
