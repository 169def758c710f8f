// bench/floor/touch.c: what a first touch of fresh anonymous memory costs here - the cost
// every migration destination pays once per page and a reused-buffer copy never pays.
// Maps MIB of memory, writes one byte per 4 KiB page, unmaps; RUNS times in a row (the later
// runs reuse memory the earlier ones freed). With "huge", the range is 2 MiB-aligned and
// MADV_HUGEPAGE.
//
//   cc -O2 -o /tmp/touch bench/floor/touch.c && /tmp/touch 1024 4 && /tmp/touch 512 4 huge
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    size_t bytes = (size_t)(argc > 1 ? atoi(argv[1]) : 1024) << 20;
    int runs = argc > 2 ? atoi(argv[2]) : 4;
    int huge = argc > 3 && !strcmp(argv[3], "huge");
    size_t align = (size_t)2 << 20;
    for (int r = 0; r < runs; r++) {
        char *base = mmap(NULL, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) { perror("mmap"); return 1; }
        char *p = huge ? (char *)(((unsigned long)base + align - 1) & ~(align - 1)) : base;
        if (huge && madvise(p, bytes, MADV_HUGEPAGE)) { perror("madvise"); return 1; }
        double t = now();
        for (size_t i = 0; i < bytes; i += 4096) p[i] = 1;
        t = now() - t;
        printf("{\"run\":%d,\"mib\":%zu,\"huge\":%s,\"us_per_page\":%.2f}\n", r + 1, bytes >> 20, huge ? "true" : "false",
               t / (bytes / 4096) * 1e6);
        munmap(base, bytes + align);
    }
    return 0;
}
