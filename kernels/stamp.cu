// Writes the GPU's %globaltimer (ns) into out[slot]: placed at the start and end of a
// captured decode step, it stamps the step's window on the device clock.
#include <cstdint>

extern "C" __global__ void stamp_globaltimer(unsigned long long* out, int slot) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  if (threadIdx.x == 0 && blockIdx.x == 0) out[slot] = t;
}
