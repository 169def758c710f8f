// bench/floor/tcp_floor.c: how fast can a destination receive N MiB over loopback TCP on this
// machine, depending on where the bytes land? The yardstick (`--baseline`) receives into one
// reused 1 MiB buffer; a migration destination must land every byte in memory it has never
// touched. This measures the floor of the second, without Faultline: no checksums, no
// protocol, no guest.
//
//   cc -O2 -pthread -o /tmp/tcp_floor bench/floor/tcp_floor.c && /tmp/tcp_floor 1024 5
//
// Methods (alternating, one line of JSON per run):
//   reuse       recv into one reused 1 MiB buffer (the plain TCP copy)
//   fresh       recv straight into a fresh anonymous mapping (the kernel first-touches each page)
//   uffd-copy   recv into a reused buffer, then UFFDIO_COPY it into a fresh registered range
//   uffd-pipe   as uffd-copy, but a second thread does the UFFDIO_COPY (8 buffers in flight)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)
static size_t total;
static char *source;
static int port;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static void die(const char *what) { fprintf(stderr, "tcp_floor: %s: %s\n", what, strerror(errno)); exit(1); }

static void *sender(void *arg) {
    (void)arg;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
    for (size_t off = 0; off < total;) {
        ssize_t n = send(s, source + off, total - off < CHUNK ? total - off : CHUNK, 0);
        if (n < 0) { if (errno == EINTR) continue; die("send"); }
        off += n;
    }
    char ack; if (recv(s, &ack, 1, MSG_WAITALL) != 1) die("ack");
    close(s);
    return NULL;
}

static void recv_all(int c, char *to, size_t len) {
    while (len) { ssize_t n = recv(c, to, len, 0); if (n <= 0) { if (n < 0 && errno == EINTR) continue; die("recv"); } to += n; len -= n; }
}

// The uffd-pipe ring: the receiver fills buffers, the installer copies them in.
#define RING 8
static char *ring[RING];
static size_t ring_off[RING];
static int head, tail_, done_;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int uffd; static char *dest;

static void uffd_copy(char *from, size_t off) {
    struct uffdio_copy cp = {.dst = (uint64_t)(dest + off), .src = (uint64_t)from, .len = CHUNK};
    while (ioctl(uffd, UFFDIO_COPY, &cp)) { if (errno != EAGAIN) die("UFFDIO_COPY"); cp.dst += cp.copy; cp.src += cp.copy; cp.len -= cp.copy; cp.copy = 0; }
}
static void *installer(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (head == tail_ && !done_) pthread_cond_wait(&cond, &lock);
        if (head == tail_ && done_) { pthread_mutex_unlock(&lock); return NULL; }
        int i = tail_ % RING; pthread_mutex_unlock(&lock);
        uffd_copy(ring[i], ring_off[i]);
        pthread_mutex_lock(&lock); tail_++; pthread_cond_broadcast(&cond); pthread_mutex_unlock(&lock);
    }
}

static double run(const char *method) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1)) die("bind");
    socklen_t al = sizeof a; getsockname(l, (struct sockaddr *)&a, &al); port = ntohs(a.sin_port);
    int is_uffd = !strncmp(method, "uffd", 4), fresh = strcmp(method, "reuse") != 0;
    char *buf = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    dest = fresh ? mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) : NULL;
    if (is_uffd) {
        uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
        struct uffdio_api api = {.api = UFFD_API};
        if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) die("userfaultfd");
        struct uffdio_register r = {.range = {(uint64_t)dest, total}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &r)) die("UFFDIO_REGISTER");
        for (int i = 0; i < RING; i++) ring[i] = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        head = tail_ = done_ = 0;
    }
    pthread_t st, it;
    double t0 = now();
    pthread_create(&st, NULL, sender, NULL);
    int c = accept(l, NULL, NULL);
    if (c < 0) die("accept");
    if (!strcmp(method, "uffd-pipe")) pthread_create(&it, NULL, installer, NULL);
    for (size_t off = 0; off < total; off += CHUNK) {
        if (!strcmp(method, "reuse")) recv_all(c, buf, CHUNK);
        else if (!strcmp(method, "fresh")) recv_all(c, dest + off, CHUNK);
        else if (!strcmp(method, "uffd-copy")) { recv_all(c, buf, CHUNK); uffd_copy(buf, off); }
        else {
            pthread_mutex_lock(&lock);
            while (head - tail_ == RING) pthread_cond_wait(&cond, &lock);
            int i = head % RING; pthread_mutex_unlock(&lock);
            recv_all(c, ring[i], CHUNK); ring_off[i] = off;
            pthread_mutex_lock(&lock); head++; pthread_cond_broadcast(&cond); pthread_mutex_unlock(&lock);
        }
    }
    if (!strcmp(method, "uffd-pipe")) {
        pthread_mutex_lock(&lock); done_ = 1; pthread_cond_broadcast(&cond); pthread_mutex_unlock(&lock);
        pthread_join(it, NULL);
    }
    if (send(c, "k", 1, 0) != 1) die("send ack");
    pthread_join(st, NULL);
    double t = now() - t0;
    if (fresh && memcmp(dest + total - 4096, source + total - 4096, 4096)) { fprintf(stderr, "tcp_floor: %s: bytes differ\n", method); exit(1); }
    close(c); close(l); munmap(buf, CHUNK);
    if (dest) munmap(dest, total);
    if (is_uffd) { close(uffd); for (int i = 0; i < RING; i++) munmap(ring[i], CHUNK); }
    return t;
}

int main(int argc, char **argv) {
    total = (size_t)(argc > 1 ? atoi(argv[1]) : 1024) << 20;
    int runs = argc > 2 ? atoi(argv[2]) : 5;
    source = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    for (size_t i = 0; i < total; i += 4096) memset(source + i, (int)(i >> 12) | 1, 16);
    const char *methods[] = {"reuse", "fresh", "uffd-copy", "uffd-pipe"};
    for (int r = 0; r < runs; r++)
        for (int m = 0; m < 4; m++)
            printf("{\"run\":%d,\"method\":\"%s\",\"mib\":%zu,\"seconds\":%.3f}\n", r + 1, methods[m], total >> 20, run(methods[m])), fflush(stdout);
    return 0;
}
