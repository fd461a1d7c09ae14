"""Triton kernels of the GPU path: paged attention and fused elementwise steps. Imported only on a GPU
(or under Triton's interpreter in tests), so a CPU install needs no Triton."""
