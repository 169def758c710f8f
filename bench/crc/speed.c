// bench/crc/speed.c: CRC32C speed of Faultline's C implementation, folding (AVX-512
// VPCLMULQDQ, where the CPU has it) against the crc32 instruction alone, over 4 KiB pages:
// one page checked again and again (in cache, as the receiver checks a page it just read),
// and 1 GiB of distinct resident pages (from memory, as the read-back digest reads them).
//
//   cc -O2 -I Sources/CFaultlineCRC/include -o /tmp/crc_speed bench/crc/speed.c Sources/CFaultlineCRC/crc.c && /tmp/crc_speed 5
//
// One JSON line per run (seconds per GiB); results agree or the program exits 1.
#define _GNU_SOURCE
#include "faultline_crc.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    int runs = argc > 1 ? atoi(argv[1]) : 5;
    if (!fl_crc32c_hw_available()) { fprintf(stderr, "crc_speed: no SSE4.2 crc32 instruction here\n"); return 2; }
    size_t bytes = 1ul << 30, pages = bytes / 4096;
    unsigned char *memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (memory == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < bytes; i += 64) memory[i] = (unsigned char)(i >> 6);
    for (int r = 1; r <= runs; r++) {
        uint32_t a = 0, b = 0;
        double t0 = now();
        for (size_t i = 0; i < pages; i++) a ^= fl_crc32c_lanes(0xFFFFFFFFu, memory, 4096);
        double t1 = now();
        for (size_t i = 0; i < pages; i++) b ^= fl_crc32c_hw(0xFFFFFFFFu, memory, 4096);
        double t2 = now();
        for (size_t i = 0; i < pages; i++) a ^= fl_crc32c_lanes(0xFFFFFFFFu, memory + i * 4096, 4096);
        double t3 = now();
        for (size_t i = 0; i < pages; i++) b ^= fl_crc32c_hw(0xFFFFFFFFu, memory + i * 4096, 4096);
        double t4 = now();
        if (a != b) { fprintf(stderr, "crc_speed: the implementations disagree\n"); return 1; }
        printf("{\"run\":%d,\"folds\":%d,\"cached_page_instruction_s\":%.3f,\"cached_page_fold_s\":%.3f,"
               "\"memory_instruction_s\":%.3f,\"memory_fold_s\":%.3f}\n", r, fl_crc32c_folds(), t1 - t0, t2 - t1, t3 - t2, t4 - t3);
    }
    return 0;
}
