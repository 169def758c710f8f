#define _GNU_SOURCE
#include "faultline_shim.h"

#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int fl_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int fl_ioctl_val(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
int fl_errno(void) { return errno; }
int fl_fallocate(int fd, int mode, int64_t offset, int64_t length) { return fallocate(fd, mode, offset, length); }
int fl_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }

int fl_userfaultfd_syscall(int flags) {
#ifdef SYS_userfaultfd
    return (int)syscall(SYS_userfaultfd, flags);
#else
    return (int)syscall(323, flags);
#endif
}

int fl_pidfd_open(int pid, unsigned int flags) { return (int)syscall(SYS_pidfd_open, pid, flags); }
int fl_pidfd_send_signal(int pidfd, int sig) { return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0); }
int fl_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }
int fl_memfd_create(const char *name, unsigned int flags) { return (int)syscall(SYS_memfd_create, name, flags); }

uint64_t fl_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

// ---- kick signal --------------------------------------------------------------------
static int kick_signal = -1;
static void kick_handler(int sig) { (void)sig; }

int fl_kick_signal_install(void) {
    if (kick_signal > 0) return kick_signal;
    int sig = SIGRTMIN + 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;  // no SA_RESTART: a blocked ioctl returns EINTR
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0) return -1;
    kick_signal = sig;
    return sig;
}

int fl_kick_thread(pthread_t thread) {
    if (kick_signal < 0) return EINVAL;
    return pthread_kill(thread, kick_signal);
}

int fl_kick_signal_block(int block) {
    if (kick_signal < 0) return EINVAL;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, kick_signal);
    return pthread_sigmask(block ? SIG_BLOCK : SIG_UNBLOCK, &set, NULL);
}

// ---- SIGBUS hook ----------------------------------------------------------------------
static __thread fl_sigbus_resolver tls_resolver;
static __thread void *tls_context;

static void sigbus_handler(int sig, siginfo_t *info, void *uctx) {
    (void)uctx;
    int saved = errno;
    fl_sigbus_resolver r = tls_resolver;
    if (r && info && r(tls_context, (uint64_t)(uintptr_t)info->si_addr) == 0) {
        errno = saved;
        return;  // the page is there now: the faulting instruction runs again
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

int fl_sigbus_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = sigbus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL);
}

void fl_sigbus_set_thread_resolver(fl_sigbus_resolver resolver, void *context) {
    tls_context = context;
    tls_resolver = resolver;
}

/* The CPUs the process may use, less `cpu` when another is left (-1: none taken out). */
static int cpus_avoiding(int cpu, cpu_set_t *set) {
    CPU_ZERO(set);
    if (sched_getaffinity(getpid(), sizeof(*set), set) != 0) return -1;
    if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, set) && CPU_COUNT(set) > 1) CPU_CLR(cpu, set);
    return 0;
}

int fl_thread_create(pthread_t *thread, size_t stack_size, int avoid_cpu, void *(*entry)(void *), void *arg) {
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc) return rc;
    if (stack_size) pthread_attr_setstacksize(&attr, stack_size);
    cpu_set_t set;
    if (avoid_cpu >= 0 && cpus_avoiding(avoid_cpu, &set) == 0)
        pthread_attr_setaffinity_np(&attr, sizeof(set), &set);  /* best effort: started elsewhere, moved later */
    rc = pthread_create(thread, &attr, entry, arg);
    pthread_attr_destroy(&attr);
    return rc;
}

int fl_gettid(void) { return (int)syscall(SYS_gettid); }

void fl_malloc_warm_thread(void) {
    void *volatile p = malloc(64);
    free(p);
}

size_t fl_malloc_mapped_chunks(void) { return mallinfo2().hblks; }

int fl_thread_allows_cpu(int tid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(tid, sizeof(set), &set) != 0) return -1;
    return cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &set) ? 1 : 0;
}

int fl_malloc_keep_heap(size_t top_pad) {
    if (!mallopt(M_MMAP_MAX, 0)) return -1;
    if (!mallopt(M_TRIM_THRESHOLD, -1)) return -1;
    if (!mallopt(M_TOP_PAD, (int)top_pad)) return -1;
    return 0;
}

int fl_set_current_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }

int fl_last_allowed_cpu(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    for (int cpu = CPU_SETSIZE - 1; cpu >= 0; cpu--) if (CPU_ISSET(cpu, &set)) return cpu;
    return -1;
}

int fl_allowed_cpu_count(void) {
    cpu_set_t set;
    if (cpus_avoiding(-1, &set) != 0) return -1;
    return CPU_COUNT(&set);
}

int fl_thread_avoid_cpu(int tid, int cpu) {
    cpu_set_t set;
    if (cpus_avoiding(cpu, &set) != 0) return -1;
    return sched_setaffinity(tid, sizeof(set), &set);
}

int fl_pin_current_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set);
}

int fl_current_cpu(void) { return sched_getcpu(); }
