// The element loops of the CPU attention kernels built with AVX2, FMA and F16C (chosen at
// run time when the CPU has them; csrc/cpu/attention_kernel.cpp).
#define STEPFUSE_CPU_ISA avx2
#define STEPFUSE_ATTENTION_MATH_IMPL
#include "attention_math.h"
