"""Binary convolution kernels (XNOR + popcount); imports nothing of the project."""
