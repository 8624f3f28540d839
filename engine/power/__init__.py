"""Power and energy sources, the sampler that polls them, and tools to probe them."""
