// sn_cuda_emu::set_schedule(order, seed): the order in which the emulator runs a launch's
// threads between barriers (cuda_emu.h): 0 fiber order, 1 reverse, 2 random from `seed`.
#include <torch/library.h>

namespace {
void set_schedule(int64_t order, int64_t seed) {
  sn_cuda_emu::set_schedule(static_cast<int>(order), static_cast<uint64_t>(seed));
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(sn_cuda_emu, m) {
  m.def("set_schedule(int order, int seed) -> ()", &set_schedule);
}
