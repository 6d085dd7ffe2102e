"""The network (UNet++ and its fused fast path), the checkpoint it is saved in, what it costs, and the planner that sizes it for a dataset."""
