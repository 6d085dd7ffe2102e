"""`python -m unetpp3d ...`, which `torchrun --nproc_per_node=N -m unetpp3d train ...` uses."""

from unetpp3d.commands.cli import main

main()
