#include "faultline_crc.h"
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// Carry-less folding (where the CPU has AVX-512 VPCLMULQDQ): the register is linear in its
// input, so a 16-byte block A followed by d more bytes can be moved forward: A * x^(8d)
// mod P, computed from A's two 64-bit halves times x^(8d+32) and x^(8d-32) mod P (bit-
// reflected, shifted left once for the reflected product), XORed into the block d bytes
// on. Four 512-bit registers fold 256 bytes a step; they are then folded into one, and its
// four 128-bit lanes into one block, whose CRC (then the tail's) the crc32 instruction
// finishes: the folded block has the CRC of everything it replaced. The constants were
// derived from the polynomial and are checked against the software CRC by the tests.
#define FOLD_16_LO 0xf20c0dfeULL
#define FOLD_16_HI 0x14cd00bd6ULL
#define FOLD_64_LO 0x740eef02ULL
#define FOLD_64_HI 0x9e4addf8ULL
#define FOLD_256_LO 0xdcb17aa4ULL
#define FOLD_256_HI 0xb9e02b86ULL

// One fold: x's two 64-bit halves times the constant pair k, XORed into `next`.
#define FOLD512(x, k, next) \
    _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128((x), (k), 0x00), _mm512_clmulepi64_epi128((x), (k), 0x11), (next), 0x96)
#define FOLD128(x, k, next) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x00), _mm_clmulepi64_si128((x), (k), 0x11)), (next))

// `length` >= 256.
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))
static uint32_t crc_fold(uint32_t state, const unsigned char *p, size_t length) {
    // The register enters the first 4 bytes (zero-extended: a plain cast leaves the upper
    // lanes undefined, and unoptimised builds fill them with garbage).
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)state)));
    __m512i x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128), x3 = _mm512_loadu_si512(p + 192);
    p += 256;
    length -= 256;
    const __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)FOLD_256_HI, (long long)FOLD_256_LO));
    while (length >= 256) {
        x0 = FOLD512(x0, k256, _mm512_loadu_si512(p));
        x1 = FOLD512(x1, k256, _mm512_loadu_si512(p + 64));
        x2 = FOLD512(x2, k256, _mm512_loadu_si512(p + 128));
        x3 = FOLD512(x3, k256, _mm512_loadu_si512(p + 192));
        p += 256;
        length -= 256;
    }
    const __m512i k64 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)FOLD_64_HI, (long long)FOLD_64_LO));
    x1 = FOLD512(x0, k64, x1);
    x2 = FOLD512(x1, k64, x2);
    x3 = FOLD512(x2, k64, x3);
    for (; length >= 64; p += 64, length -= 64) x3 = FOLD512(x3, k64, _mm512_loadu_si512(p));
    const __m128i k16 = _mm_set_epi64x((long long)FOLD_16_HI, (long long)FOLD_16_LO);
    __m128i v = _mm512_extracti32x4_epi32(x3, 0);
    v = FOLD128(v, k16, _mm512_extracti32x4_epi32(x3, 1));
    v = FOLD128(v, k16, _mm512_extracti32x4_epi32(x3, 2));
    v = FOLD128(v, k16, _mm512_extracti32x4_epi32(x3, 3));
    for (; length >= 16; p += 16, length -= 16) v = FOLD128(v, k16, _mm_loadu_si128((const __m128i *)p));
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(v));
    c = _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(v, 1));
    for (; length >= 8; p += 8, length -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    uint32_t c32 = (uint32_t)c;
    while (length--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

// 1 where folding is used, 0 where not, -1 before the first call looked.
static int fold_state = -1;

int fl_crc32c_folds(void) {
    int s = __atomic_load_n(&fold_state, __ATOMIC_RELAXED);
    if (s < 0) {
        s = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq")
            && __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
        __atomic_store_n(&fold_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

__attribute__((target("sse4.2")))
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length) {
    const unsigned char *p = data;
    if (length >= 256 && fl_crc32c_folds()) return crc_fold(state, p, length);
    return fl_crc32c_lanes(state, p, length);
}

// The crc32 instruction alone, four lanes for long inputs.
__attribute__((target("sse4.2")))
uint32_t fl_crc32c_lanes(uint32_t state, const void *data, size_t length) {
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
int fl_crc32c_folds(void) { return 0; }
uint32_t fl_crc32c_hw(uint32_t state, const void *data, size_t length) { (void)data; (void)length; return state; }
uint32_t fl_crc32c_lanes(uint32_t state, const void *data, size_t length) { (void)data; (void)length; return state; }
#endif
