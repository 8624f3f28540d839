// %globaltimer stamps: the GPU's nanosecond timer, read by one thread.
//
// Stable ABI (extern "C"; device pointers):
//   tpj_read_globaltimer(unsigned long long* out, int slot)
//     grid (1), block 32: out[slot] = %globaltimer (ns). The timebase calibration launches it
//     between two host clock reads; the decode step's own stamps come from tpj_step_begin,
//     tpj_step_end and tpj_add_rmsnorm (elementwise.cu), which write into a ring of stamp rows.
#include "tpj_device.cuh"

extern "C" __global__ void tpj_read_globaltimer(unsigned long long* out, int slot) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[slot] = tpj_globaltimer();
}
