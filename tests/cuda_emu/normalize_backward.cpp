// normalize_backward.cu compiled as C++ for the CUDA emulator (cuda_emu.h, force-included).
#include "cuda/normalize_backward.cu"
