// The CPU kernel for any x86-64 / other processor (compiler defaults).
#define STEPFUSE_CPU_ISA baseline
#include "solver_step_kernel.h"
