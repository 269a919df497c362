"""Weight-only post-training quantization: RTN and GPTQ grids, bit packing, the QuantLinear cell."""
