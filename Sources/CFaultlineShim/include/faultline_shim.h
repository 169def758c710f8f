// faultline_shim.h - the only C in Faultline, and why each piece exists:
//
//  * The KVM and userfaultfd ABI. The system headers on the build machines are older than
//    the running kernel (no KVM_SET_USER_MEMORY_REGION2, guest_memfd, UFFDIO_MOVE...), so
//    the structs are defined here, prefixed fl_, and every size and offset is checked by
//    the ABITests target. Request numbers are computed with the _IOC formula below and
//    the tests recompute them independently in Swift.
//  * ioctl(2) is variadic; Swift cannot call variadic C functions. fl_ioctl_* are the
//    non-variadic entry points.
//  * userfaultfd has no libc wrapper on older glibc: fl_userfaultfd_syscall.
//  * pidfd_open, pidfd_send_signal and pipe2 are not visible to Swift's Glibc module:
//    fl_pidfd_open, fl_pidfd_send_signal, fl_pipe2 (a pipe that is close-on-exec from birth).
//  * kvm_run and uffd_msg hold unions; they are spelled out as structs with named members.
//  * Signal handlers: the vCPU "kick" signal (interrupts KVM_RUN with EINTR) and the SIGBUS
//    hook used by software vCPUs; a handler must be plain C to be async-signal-safe.
#ifndef FAULTLINE_SHIM_H
#define FAULTLINE_SHIM_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

// ---------------------------------------------------------------------------------------
// _IOC (asm-generic/ioctl.h): dir << 30 | size << 16 | type << 8 | nr
#define FL_IOC_NONE 0U
#define FL_IOC_WRITE 1U
#define FL_IOC_READ 2U
#define FL_IOC(dir, type, nr, size) \
    ((unsigned long)(((dir) << 30) | ((size) << 16) | ((type) << 8) | (nr)))
#define FL_IO(type, nr) FL_IOC(FL_IOC_NONE, (type), (nr), 0U)
#define FL_IOR(type, nr, T) FL_IOC(FL_IOC_READ, (type), (nr), (unsigned)sizeof(T))
#define FL_IOW(type, nr, T) FL_IOC(FL_IOC_WRITE, (type), (nr), (unsigned)sizeof(T))
#define FL_IOWR(type, nr, T) FL_IOC(FL_IOC_READ | FL_IOC_WRITE, (type), (nr), (unsigned)sizeof(T))

// ---------------------------------------------------------------------------------------
// KVM structs (include/uapi/linux/kvm.h, x86-64)

struct fl_kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct fl_kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];  // pad2[0] is userfault_bitmap in the KVM Userfault proposal
};

struct fl_kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct fl_kvm_memory_attributes {
    uint64_t address;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
};

struct fl_kvm_pre_fault_memory {
    uint64_t gpa;
    uint64_t size;
    uint64_t flags;
    uint64_t padding[5];
};

struct fl_kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    uint64_t dirty_bitmap;  // a pointer
};

struct fl_kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    uint64_t dirty_bitmap;  // a pointer
};

struct fl_kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct fl_kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct fl_kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};

struct fl_kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct fl_kvm_sregs {
    struct fl_kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct fl_kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[4];
};

struct fl_kvm_run_io {
    uint8_t direction;  // 0 in, 1 out
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;  // data at (char *)run + data_offset
};

struct fl_kvm_run_mmio {
    uint64_t phys_addr;
    uint8_t data[8];
    uint32_t len;
    uint8_t is_write;
};

struct fl_kvm_run_memory_fault {
    uint64_t flags;
    uint64_t gpa;
    uint64_t size;
};

// KVM_EXIT_HYPERCALL (3): nr, args, and ret (userspace's answer; KVM puts it in the guest's
// rax on the next KVM_RUN); flags bit 0 = KVM_EXIT_HYPERCALL_LONG_MODE (was __u32 longmode).
struct fl_kvm_run_hypercall {
    uint64_t nr;
    uint64_t args[6];
    uint64_t ret;
    uint64_t flags;
};

struct fl_kvm_run_internal {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t data[16];
};

struct fl_kvm_run_system_event {
    uint32_t type;
    uint32_t ndata;
    uint64_t data[16];
};

// The head of struct kvm_run; the mapping is KVM_GET_VCPU_MMAP_SIZE bytes (more than this).
struct fl_kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct fl_kvm_run_io io;
        struct fl_kvm_run_mmio mmio;
        struct fl_kvm_run_internal internal;
        struct fl_kvm_run_system_event system_event;
        struct fl_kvm_run_memory_fault memory_fault;
        struct fl_kvm_run_hypercall hypercall;
        char padding[256];
    } u;
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};

// KVM request numbers (KVMIO = 0xAE)
#define FL_KVMIO 0xAEU
static const unsigned long FL_KVM_GET_API_VERSION = FL_IO(FL_KVMIO, 0x00);
static const unsigned long FL_KVM_CREATE_VM = FL_IO(FL_KVMIO, 0x01);
static const unsigned long FL_KVM_CHECK_EXTENSION = FL_IO(FL_KVMIO, 0x03);
static const unsigned long FL_KVM_GET_VCPU_MMAP_SIZE = FL_IO(FL_KVMIO, 0x04);
static const unsigned long FL_KVM_CREATE_VCPU = FL_IO(FL_KVMIO, 0x41);
static const unsigned long FL_KVM_GET_DIRTY_LOG = FL_IOW(FL_KVMIO, 0x42, struct fl_kvm_dirty_log);
static const unsigned long FL_KVM_SET_USER_MEMORY_REGION = FL_IOW(FL_KVMIO, 0x46, struct fl_kvm_userspace_memory_region);
static const unsigned long FL_KVM_SET_USER_MEMORY_REGION2 = FL_IOW(FL_KVMIO, 0x49, struct fl_kvm_userspace_memory_region2);
static const unsigned long FL_KVM_RUN = FL_IO(FL_KVMIO, 0x80);
static const unsigned long FL_KVM_GET_REGS = FL_IOR(FL_KVMIO, 0x81, struct fl_kvm_regs);
static const unsigned long FL_KVM_SET_REGS = FL_IOW(FL_KVMIO, 0x82, struct fl_kvm_regs);
static const unsigned long FL_KVM_GET_SREGS = FL_IOR(FL_KVMIO, 0x83, struct fl_kvm_sregs);
static const unsigned long FL_KVM_SET_SREGS = FL_IOW(FL_KVMIO, 0x84, struct fl_kvm_sregs);
static const unsigned long FL_KVM_ENABLE_CAP = FL_IOW(FL_KVMIO, 0xa3, struct fl_kvm_enable_cap);
static const unsigned long FL_KVM_CLEAR_DIRTY_LOG = FL_IOWR(FL_KVMIO, 0xc0, struct fl_kvm_clear_dirty_log);
static const unsigned long FL_KVM_SET_MEMORY_ATTRIBUTES = FL_IOW(FL_KVMIO, 0xd2, struct fl_kvm_memory_attributes);
static const unsigned long FL_KVM_CREATE_GUEST_MEMFD = FL_IOWR(FL_KVMIO, 0xd4, struct fl_kvm_create_guest_memfd);
static const unsigned long FL_KVM_PRE_FAULT_MEMORY = FL_IOWR(FL_KVMIO, 0xd5, struct fl_kvm_pre_fault_memory);

// ---------------------------------------------------------------------------------------
// userfaultfd structs (include/uapi/linux/userfaultfd.h)

struct fl_uffdio_api {
    uint64_t api;
    uint64_t features;
    uint64_t ioctls;
};

struct fl_uffdio_range {
    uint64_t start;
    uint64_t len;
};

struct fl_uffdio_register {
    struct fl_uffdio_range range;
    uint64_t mode;
    uint64_t ioctls;
};

struct fl_uffdio_copy {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t copy;
};

struct fl_uffdio_zeropage {
    struct fl_uffdio_range range;
    uint64_t mode;
    int64_t zeropage;
};

struct fl_uffdio_writeprotect {
    struct fl_uffdio_range range;
    uint64_t mode;
};

struct fl_uffdio_continue {
    struct fl_uffdio_range range;
    uint64_t mode;
    int64_t mapped;
};

struct fl_uffdio_poison {
    struct fl_uffdio_range range;
    uint64_t mode;
    int64_t updated;
};

struct fl_uffdio_move {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t move;
};

struct __attribute__((packed)) fl_uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags; uint64_t address; uint32_t ptid; } pagefault;
        struct { uint32_t ufd; } fork;
        struct { uint64_t from; uint64_t to; uint64_t len; } remap;
        struct { uint64_t start; uint64_t end; } remove;
        struct { uint64_t reserved1, reserved2, reserved3; } reserved;
    } arg;
};

#define FL_UFFDIO 0xAAU
static const unsigned long FL_USERFAULTFD_IOC_NEW = FL_IO(FL_UFFDIO, 0x00);
static const unsigned long FL_UFFDIO_API = FL_IOWR(FL_UFFDIO, 0x3f, struct fl_uffdio_api);
static const unsigned long FL_UFFDIO_REGISTER = FL_IOWR(FL_UFFDIO, 0x00, struct fl_uffdio_register);
static const unsigned long FL_UFFDIO_UNREGISTER = FL_IOR(FL_UFFDIO, 0x01, struct fl_uffdio_range);
static const unsigned long FL_UFFDIO_WAKE = FL_IOR(FL_UFFDIO, 0x02, struct fl_uffdio_range);
static const unsigned long FL_UFFDIO_COPY = FL_IOWR(FL_UFFDIO, 0x03, struct fl_uffdio_copy);
static const unsigned long FL_UFFDIO_ZEROPAGE = FL_IOWR(FL_UFFDIO, 0x04, struct fl_uffdio_zeropage);
static const unsigned long FL_UFFDIO_MOVE = FL_IOWR(FL_UFFDIO, 0x05, struct fl_uffdio_move);
static const unsigned long FL_UFFDIO_WRITEPROTECT = FL_IOWR(FL_UFFDIO, 0x06, struct fl_uffdio_writeprotect);
static const unsigned long FL_UFFDIO_CONTINUE = FL_IOWR(FL_UFFDIO, 0x07, struct fl_uffdio_continue);
static const unsigned long FL_UFFDIO_POISON = FL_IOWR(FL_UFFDIO, 0x08, struct fl_uffdio_poison);

// ---------------------------------------------------------------------------------------
// Entry points Swift cannot express directly. Each returns the raw result (-1 and errno on
// failure); error policy lives in Swift (`systemCall` in FaultlineLinux/SystemError.swift).

int fl_ioctl_ptr(int fd, unsigned long request, void *arg);
int fl_ioctl_val(int fd, unsigned long request, unsigned long arg);
int fl_userfaultfd_syscall(int flags);
int fl_memfd_create(const char *name, unsigned int flags);
int fl_errno(void);
int fl_fallocate(int fd, int mode, int64_t offset, int64_t length);
int fl_eventfd(unsigned int initval, int flags);
int fl_pidfd_open(int pid, unsigned int flags);
int fl_pidfd_send_signal(int pidfd, int sig);
int fl_pipe2(int fds[2], int flags);

// The vCPU kick: a real-time signal whose handler does nothing, installed without
// SA_RESTART, so a blocked KVM_RUN returns EINTR. Returns the signal number or -1.
int fl_kick_signal_install(void);
int fl_kick_thread(pthread_t thread);
// Block/unblock the kick signal in the calling thread (non-vCPU threads block it).
int fl_kick_signal_block(int block);

// SIGBUS hook for software vCPUs (UFFD_FEATURE_SIGBUS). The handler calls the resolver
// registered for the faulting thread with the fault address; a zero return means it
// resolved the page and the access is retried; otherwise the default action runs.
typedef int (*fl_sigbus_resolver)(void *context, uint64_t address);
int fl_sigbus_install(void);
void fl_sigbus_set_thread_resolver(fl_sigbus_resolver resolver, void *context);

// Spawning an OS thread with a plain C entry (Swift hands a retained box as `arg`). With
// `avoid_cpu` >= 0 the thread starts on the process's other CPUs (when there are any).
int fl_thread_create(pthread_t *thread, size_t stack_size, int avoid_cpu, void *(*entry)(void *), void *arg);
/* glibc malloc: no mmap-backed chunks (M_MMAP_MAX 0), never give memory back (M_TRIM_THRESHOLD
 * -1), grow the heap by `top_pad` extra bytes at a time (M_TOP_PAD). 0, or -1 if mallopt refused. */
int fl_malloc_keep_heap(size_t top_pad);
/* One malloc and free on the calling thread: glibc gives a thread its arena (mmap, mprotect)
 * on its first allocation; this makes that happen now. */
void fl_malloc_warm_thread(void);
/* glibc malloc: chunks currently served by their own mmap (mallinfo2().hblks). */
size_t fl_malloc_mapped_chunks(void);
/* 1 when thread `tid` (0: the caller) may run on `cpu`, 0 when not, -1 with errno. */
int fl_thread_allows_cpu(int tid, int cpu);
/* pthread_setname_np for the calling thread (at most 15 bytes and the NUL; longer fails with ERANGE). */
int fl_set_current_thread_name(const char *name);
/* Lets thread `tid` (0: the caller) run on the CPUs the process may use, except `cpu` (when
 * another is left; -1: none excepted). 0, or -1 with errno. */
int fl_thread_avoid_cpu(int tid, int cpu);

// Monotonic time in nanoseconds (vDSO clock_gettime).
uint64_t fl_now_ns(void);
int fl_gettid(void);
/// Pins the calling thread to one CPU (sched_setaffinity); 0 or -1 with errno.
int fl_pin_current_thread(int cpu);
/// The highest-numbered CPU the calling thread may run on, or -1.
int fl_last_allowed_cpu(void);
/// How many CPUs this process may run on (sched_getaffinity), or -1.
int fl_allowed_cpu_count(void);
/// The CPU the calling thread runs on (sched_getcpu).
int fl_current_cpu(void);

#endif
