#include "faultline_crc.h"
#include <string.h>

#if defined(__x86_64__)
int fl_crc32c_hw_available(void) { return __builtin_cpu_supports("sse4.2"); }

// One stream, 8 bytes a step (the instruction's latency, 3 cycles, per 8 bytes).
__attribute__((target("sse4.2")))
static uint64_t crc_stream(uint64_t c, const unsigned char *p, size_t length) {
    while (length >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        length -= 8;
    }
    return c;
}

// Four lanes of LANE bytes run interleaved (the instruction issues one a cycle, so four
// independent chains hide its latency) and are joined by advancing each lane's register
// over the next lane's length of zero bytes: the register is linear in its input, so
// crc(s, A.B) = crc(s, A) advanced over |B| zeros, xor crc(0, B). `shift[k][b]` is the
// register (b << 8k) advanced over LANE zero bytes, so advancing any register is four
// table lookups.
#define LANE 1024
static uint32_t shift[4][256];
static int shift_ready;

__attribute__((target("sse4.2")))
static void shift_init(void) {
    static const unsigned char zeros[LANE];
    for (int k = 0; k < 4; k++)
        for (int b = 0; b < 256; b++)
            shift[k][b] = (uint32_t)crc_stream((uint64_t)((uint32_t)b << (8 * k)), zeros, LANE);
    __atomic_store_n(&shift_ready, 1, __ATOMIC_RELEASE);
}

static inline uint32_t shift_lane(uint32_t c) {
    return shift[0][c & 0xff] ^ shift[1][(c >> 8) & 0xff] ^ shift[2][(c >> 16) & 0xff] ^ shift[3][c >> 24];
}

__attribute__((target("sse4.2")))
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length) {
    const unsigned char *p = data;
    uint64_t c = state;
    if (length >= 4 * LANE) {
        // Racing initialisations compute the same tables: harmless.
        if (!__atomic_load_n(&shift_ready, __ATOMIC_ACQUIRE)) shift_init();
        while (length >= 4 * LANE) {
            uint64_t c1 = 0, c2 = 0, c3 = 0;
            for (size_t i = 0; i < LANE; i += 8) {
                uint64_t v0, v1, v2, v3;
                memcpy(&v0, p + i, 8);
                memcpy(&v1, p + LANE + i, 8);
                memcpy(&v2, p + 2 * LANE + i, 8);
                memcpy(&v3, p + 3 * LANE + i, 8);
                c = __builtin_ia32_crc32di(c, v0);
                c1 = __builtin_ia32_crc32di(c1, v1);
                c2 = __builtin_ia32_crc32di(c2, v2);
                c3 = __builtin_ia32_crc32di(c3, v3);
            }
            uint32_t joined = shift_lane((uint32_t)c) ^ (uint32_t)c1;
            joined = shift_lane(joined) ^ (uint32_t)c2;
            c = shift_lane(joined) ^ (uint32_t)c3;
            p += 4 * LANE;
            length -= 4 * LANE;
        }
    }
    c = crc_stream(c, p, length);
    p += length & ~(size_t)7;
    length &= 7;
    uint32_t c32 = (uint32_t)c;
    while (length--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#else
int fl_crc32c_hw_available(void) { return 0; }
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length) { (void)data; (void)length; return state; }
#endif
