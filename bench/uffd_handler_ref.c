// uffd_handler_ref.c - the C yardstick for `faultline uffd-serve`: a minimal page-fault
// handler speaking Firecracker's classic snapshot protocol (docs/page-server.md), doing what
// uffd-serve's worker does per fault and nothing more.
//
//   uffd_handler_ref SOCKET MEMORY_FILE
//
// Listens on SOCKET, takes one connection, receives the JSON regions with the userfaultfd
// (SCM_RIGHTS), maps MEMORY_FILE privately, and serves: each page fault gets one UFFDIO_COPY
// of its page from the file (EEXIST: already there); a REMOVE marks its pages, which later
// faults fill with zeros (UFFDIO_ZEROPAGE; a copy of zeros for 2 MiB pages); a fill that
// meets EAGAIN waits until the queued events are read. Events are read up to 64 at a time.
// Ends when the peer closes the connection, printing one JSON line of counts.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGIONS 64
#define BATCH 64
#define PENDING 4096

struct region {
    uint64_t base, size, offset, page_size, first_page;
};

static struct region regions[MAX_REGIONS];
static int region_count;
static uint8_t *removed;  // one byte per page
static const uint8_t *file_base;
static void *zeros;
static int uffd;
static uint64_t copied, zero_pages, present, eagain, removes;

static void die(const char *what) {
    fprintf(stderr, "uffd_handler_ref: %s: %s\n", what, strerror(errno));
    exit(2);
}

// Reads "key": NUMBER from the object text starting at `obj` (up to `end`); 0 if absent.
static uint64_t field(const char *obj, const char *end, const char *key) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *p = strstr(obj, quoted);
    if (!p || p > end) return 0;
    p = strchr(p + strlen(quoted), ':');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static void parse_regions(const char *json) {
    uint64_t next_page = 0;
    for (const char *p = strchr(json, '{'); p && region_count < MAX_REGIONS; p = strchr(p + 1, '{')) {
        const char *end = strchr(p, '}');
        if (!end) break;
        struct region *r = &regions[region_count++];
        r->base = field(p, end, "base_host_virt_addr");
        r->size = field(p, end, "size");
        r->offset = field(p, end, "offset");
        r->page_size = field(p, end, "page_size");
        if (!r->page_size) r->page_size = field(p, end, "page_size_kib");
        if (r->page_size != 4096 && r->page_size != (2u << 20)) {
            fprintf(stderr, "uffd_handler_ref: region %d: page size %lu\n", region_count - 1, (unsigned long)r->page_size);
            exit(2);
        }
        r->first_page = next_page;
        next_page += r->size / r->page_size;
    }
    removed = calloc(next_page ? next_page : 1, 1);
}

static struct region *find(uint64_t addr) {
    for (int i = 0; i < region_count; i++)
        if (addr >= regions[i].base && addr < regions[i].base + regions[i].size) return &regions[i];
    return NULL;
}

static void mark_removed(uint64_t start, uint64_t end) {
    for (int i = 0; i < region_count; i++) {
        struct region *r = &regions[i];
        uint64_t s = start > r->base ? start : r->base, e = end < r->base + r->size ? end : r->base + r->size;
        for (uint64_t a = s; a + r->page_size <= e; a += r->page_size)
            if ((a - r->base) % r->page_size == 0) removed[r->first_page + (a - r->base) / r->page_size] = 1;
    }
}

// 1: done (filled, or already there); 0: EAGAIN, retry after reading events.
static int fill(uint64_t addr) {
    struct region *r = find(addr);
    if (!r) return 1;
    uint64_t page = addr & ~(r->page_size - 1);
    int zero = removed[r->first_page + (page - r->base) / r->page_size];
    int rc;
    if (zero && r->page_size == 4096) {
        struct uffdio_zeropage z = {.range = {.start = page, .len = 4096}};
        rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
    } else {
        struct uffdio_copy c = {.dst = page, .src = (uint64_t)(uintptr_t)(zero ? zeros : file_base + r->offset + (page - r->base)),
                                .len = r->page_size};
        rc = ioctl(uffd, UFFDIO_COPY, &c);
    }
    if (rc == 0) {
        if (zero) zero_pages++; else copied++;
        return 1;
    }
    if (errno == EEXIST) { present++; return 1; }
    if (errno == EAGAIN) { eagain++; return 0; }
    if (errno == ENOENT || errno == ESRCH) return 1;
    die("fill");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MEMORY_FILE\n", argv[0]);
        return 2;
    }
    int file = open(argv[2], O_RDONLY | O_CLOEXEC);
    if (file < 0) die(argv[2]);
    struct stat st;
    if (fstat(file, &st) != 0 || st.st_size == 0) die("memory file size");
    file_base = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, file, 0);
    if (file_base == MAP_FAILED) die("mmap memory file");
    zeros = mmap(NULL, 2u << 20, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    unlink(argv[1]);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0) die("bind");
    chmod(argv[1], 0600);
    if (listen(listener, 1) != 0) die("listen");
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) die("accept");

    char json[65536];
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = json, .iov_len = sizeof json - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (n <= 0 || !c || c->cmsg_type != SCM_RIGHTS) die("receive regions and userfaultfd");
    json[n] = 0;
    memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
    parse_regions(json);

    struct uffd_msg events[BATCH];
    uint64_t pending[PENDING];
    int pending_count = 0;
    struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLRDHUP}};
    struct timespec t0 = {0}, t1;
    for (;;) {
        if (pending_count == 0) {
            if (poll(fds, 2, -1) < 0 && errno != EINTR) die("poll");
            if (fds[1].revents) break;
        }
        for (;;) {  // every queued event first
            ssize_t got = read(uffd, events, sizeof events);
            if (got < 0) {
                if (errno == EAGAIN) break;
                if (errno == EINTR) continue;
                die("read userfaultfd");
            }
            for (size_t i = 0; i < (size_t)got / sizeof events[0]; i++) {
                if (events[i].event == UFFD_EVENT_PAGEFAULT) {
                    if (t0.tv_sec == 0) clock_gettime(CLOCK_MONOTONIC, &t0);
                    if (pending_count < PENDING) pending[pending_count++] = events[i].arg.pagefault.address;
                } else if (events[i].event == UFFD_EVENT_REMOVE) {
                    removes++;
                    mark_removed(events[i].arg.remove.start, events[i].arg.remove.end);
                }
            }
        }
        int kept = 0;
        for (int i = 0; i < pending_count; i++)
            if (!fill(pending[i])) pending[kept++] = pending[i];
        pending_count = kept;
        if (pending_count) sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &t1);
    }
    double seconds = t0.tv_sec ? (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9 : 0;
    printf("{\"pages_copied\":%lu,\"zero_pages\":%lu,\"already_present\":%lu,\"eagain_retries\":%lu,\"removes_seen\":%lu,\"serving_seconds\":%.6f}\n",
           (unsigned long)copied, (unsigned long)zero_pages, (unsigned long)present, (unsigned long)eagain,
           (unsigned long)removes, seconds);
    unlink(argv[1]);
    return 0;
}
