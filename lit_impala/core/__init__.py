"""Pure torch: V-trace, losses, episode-boundary targets, action distributions, networks. Nothing here
knows about TensorDicts, torchrl or Lightning."""
