// The fresh-memory floor of a restore: read a memory file sequentially into memory never
// touched before (anonymous, private), as any restore must land it, and print the time.
// Build: cc -O2 -Wall -o file_floor bench/floor/file_floor.c
// Usage: file_floor FILE   (prints one JSON line: {"method":"file_floor","bytes":...,"ms":...})
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s FILE\n", argv[0]); return 2; }
    double t0 = now_ms();
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) { perror("open"); return 1; }
    struct stat st;
    if (fstat(fd, &st) != 0) { perror("fstat"); return 1; }
    size_t size = (size_t)st.st_size;
    char *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) { perror("mmap"); return 1; }
    const size_t chunk = 1 << 20;
    for (size_t done = 0; done < size;) {
        size_t want = size - done < chunk ? size - done : chunk;
        ssize_t n = pread(fd, memory + done, want, (off_t)done);
        if (n <= 0) { perror("pread"); return 1; }
        done += (size_t)n;
    }
    double ms = now_ms() - t0;
    unsigned long sum = 0;  // keep the copy observable
    for (size_t i = 0; i < size; i += 4096) sum += (unsigned char)memory[i];
    printf("{\"method\":\"file_floor\",\"bytes\":%zu,\"ms\":%.3f,\"check\":%lu}\n", size, ms, sum & 1);
    return 0;
}
