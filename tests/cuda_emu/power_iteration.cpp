// power_iteration.cu compiled as C++ for the CUDA emulator (cuda_emu.h, force-included).
#include "cuda/power_iteration.cu"
