// faultline_crc.h - CRC-32C with the SSE4.2 crc32 instruction and carry-less
// multiplication. Swift has no portable access to them; this is the only reason this
// module exists. No syscalls: the pure core
// may use it. Callers must check fl_crc32c_hw_available() first.
#ifndef FAULTLINE_CRC_H
#define FAULTLINE_CRC_H
#include <stddef.h>
#include <stdint.h>

int fl_crc32c_hw_available(void);
// Advances the (pre-inverted) CRC register over `length` bytes: by carry-less folding
// where the CPU has AVX-512 VPCLMULQDQ (inputs of 256 bytes or more), else with the crc32
// instruction alone.
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length);
// The same with the crc32 instruction alone (four lanes for long inputs).
uint32_t fl_crc32c_lanes(uint32_t state, const void *data, size_t length);
// 1 when fl_crc32c_hw folds long inputs on this CPU.
int fl_crc32c_folds(void);

#endif
