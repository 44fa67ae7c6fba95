"""CPU inference kernels for AQLM weights: C++ sources built once per machine, and their dispatch."""
