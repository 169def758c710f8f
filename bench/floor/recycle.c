// bench/floor/recycle.c: what a page sent again after pre-copy costs the destination, in C
// (no Faultline): its stale copy dropped (MADV_DONTNEED) and the new one installed with
// UFFDIO_COPY (a fresh page), against the stale page moved out to a second registered area
// (UFFDIO_MOVE), the new bytes written into it and moved back.
//
//   cc -O2 -Wall -o /tmp/recycle bench/floor/recycle.c && for i in 1 2 3; do for m in drop move; do /tmp/recycle 131072 0.3 $m; done; done
//
// Arguments: PAGES, GAP (seconds between the drop and the new copies), METHOD (drop | move).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
struct fl_move { uint64_t dst, src, len, mode; int64_t move; };
#define FL_MOVE 0xC028AA05UL
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static void die(const char *w) { fprintf(stderr, "%s: %s\n", w, strerror(errno)); exit(1); }
int uffd;
static void copy(char *dst, char *src, size_t len) {
    struct uffdio_copy c = {.dst = (uint64_t)dst, .src = (uint64_t)src, .len = len};
    if (ioctl(uffd, UFFDIO_COPY, &c)) die("copy");
}
static void move(char *dst, char *src, size_t len) {
    struct fl_move m = {.dst = (uint64_t)dst, .src = (uint64_t)src, .len = len, .mode = 0};
    if (ioctl(uffd, FL_MOVE, &m) || m.move != (int64_t)len) die("move");
}
int main(int argc, char **argv) {
    size_t pages = argc > 1 ? atol(argv[1]) : 131072, len = pages * 4096;
    double gap = argc > 2 ? atof(argv[2]) : 0.3;
    const char *method = argc > 3 ? argv[3] : "drop";
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    struct uffdio_api api = {.api = UFFD_API, .features = 1ULL << 16};
    if (ioctl(uffd, UFFDIO_API, &api)) die("api");
    char *g = mmap(0, len, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *pool = mmap(0, len, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    struct uffdio_register r = {.range = {(uint64_t)g, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &r)) die("reg g");
    struct uffdio_register r2 = {.range = {(uint64_t)pool, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &r2)) die("reg pool");
    char *buf = mmap(0, 64 * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    memset(buf, 7, 64 * 4096);
    double t0 = now();
    for (size_t off = 0; off < len; off += 64 * 4096) copy(g + off, buf, 64 * 4096);  // pre-copy's install
    double t1 = now();
    if (!strcmp(method, "drop")) { if (madvise(g, len, MADV_DONTNEED)) die("dontneed"); }
    else { for (size_t off = 0; off < len; off += 64 * 4096) move(pool + off, g + off, 64 * 4096); }
    double t2 = now();
    usleep((useconds_t)(gap * 1e6));
    memset(buf, 9, 64 * 4096);
    double t3 = now();
    if (!strcmp(method, "drop")) { for (size_t off = 0; off < len; off += 64 * 4096) copy(g + off, buf, 64 * 4096); }
    else { for (size_t off = 0; off < len; off += 64 * 4096) { memcpy(pool + off, buf, 64 * 4096); move(g + off, pool + off, 64 * 4096); } }
    double t4 = now();
    if (g[len - 1] != 9 || g[0] != 9) { fprintf(stderr, "bad bytes\n"); return 1; }
    printf("{\"method\":\"%s\",\"pages\":%zu,\"gap\":%.2f,\"first_install_s\":%.3f,\"drop_s\":%.3f,\"reinstall_s\":%.3f,\"reinstall_us_per_page\":%.2f}\n",
           method, pages, gap, t1 - t0, t2 - t1, t4 - t3, (t4 - t3) / pages * 1e6);
    return 0;
}
