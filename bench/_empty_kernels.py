"""Empty Triton kernels for the GPU check's host-cost section (``gpu_check.host_cost_variants``): the launcher's
cost per call with 2 and with 38 arguments (like the integer GEMM's), apart from any work.

A module of its own: it imports triton at import time (Triton resolves the ``tl.constexpr`` annotations in the
kernel's module), which ``gpu_check`` must not (the test suite imports it before the Triton tests set
``TRITON_INTERPRET=1``)."""
import triton.language as tl


def empty_2(a_ptr, n):
    pass


def empty_38(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, f_ptr, g_ptr, h_ptr, s0, s1, i0, i1, i2, i3, i4, i5, i6, i7, i8,
             i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19, i20, i21, i22,
             C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr):
    pass
