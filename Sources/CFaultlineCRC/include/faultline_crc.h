// faultline_crc.h - CRC-32C with the SSE4.2 crc32 instruction. Swift has no portable
// access to it; this is the only reason this module exists. No syscalls: the pure core
// may use it. Callers must check fl_crc32c_hw_available() first.
#ifndef FAULTLINE_CRC_H
#define FAULTLINE_CRC_H
#include <stddef.h>
#include <stdint.h>

int fl_crc32c_hw_available(void);
// Advances the (pre-inverted) CRC register over `length` bytes.
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length);

#endif
