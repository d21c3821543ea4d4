// The CPU kernel built with AVX2, FMA and F16C (chosen at run time when the CPU has them).
#define STEPFUSE_CPU_ISA avx2
#include "solver_step_kernel.h"
