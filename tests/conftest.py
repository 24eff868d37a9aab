import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines (docs/CPU_KERNELS.md)
