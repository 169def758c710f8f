// demand_paging_ref.c - reference C implementation of the demand-paging experiment.
//
// It is the yardstick for the project's own benchmark: the same guest, the same
// memory layout and the same fault-resolution modes, written as plainly as possible
// in C. Compare ratios measured in one run on one machine, never absolute numbers
// across machines.
//
// Guest: each vCPU runs 32-bit protected-mode code (flat segments, paging off) at
// GPA 0x1000 that stores one 32-bit word (0xC0DE0000 | vcpu id) at the start of every
// 4 KiB page of its own chunk, in ascending order, then executes HLT.
// Guest RAM under test starts at GPA 0x10000000; vCPU i owns
// [0x10000000 + i*chunk, 0x10000000 + (i+1)*chunk).
//
// Every page of the "source" holds a pattern derived from its page index; after the
// run every page is checked: first word == the guest's store, the rest == the pattern.
//
// Modes:
//   none         guest RAM is anonymous memory with nothing registered (first touch
//                is an ordinary host page fault; contents are not checked)
//   prefilled    guest RAM already holds the source contents (the local-memory ceiling)
//   uffd-missing anonymous memory, userfaultfd MISSING, resolved with UFFDIO_COPY by
//                handler threads (--uffd single|per-vcpu, --readers R per uffd)
//   uffd-minor   memfd (shmem) memory whose page cache exists, userfaultfd MINOR,
//                resolved by pwrite() of the contents into the memfd + UFFDIO_CONTINUE
//   vcpu-exit    anonymous memory, userfaultfd MISSING with UFFD_FEATURE_SIGBUS: the
//                vCPU thread itself sees the fault as a KVM exit (KVM_EXIT_MMIO at a RAM
//                address when KVM emulates the instruction, or KVM_EXIT_MEMORY_FAULT),
//                installs the page with UFFDIO_COPY(DONTWAKE), completes the access and
//                re-enters: no handler thread, no wait queue, no wake-up.
//
// Build: cc -O2 -pthread -o demand_paging_ref bench/demand_paging_ref.c   (from the repository root)
// Run:   ./demand_paging_ref --mode vcpu-exit --vcpus 4 --mem-per-vcpu 64
// Needs: /dev/kvm and permission to create a userfaultfd that handles kernel faults
//        (root, CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

// KVM ABI, defined here so old system headers do not matter.
#define KVMIO 0xAE
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_GET_VCPU_MMAP_SIZE _IO(KVMIO, 0x04)
#define KVM_CREATE_VCPU _IO(KVMIO, 0x41)
#define KVM_RUN _IO(KVMIO, 0x80)
struct ref_region { uint32_t slot, flags; uint64_t gpa, size, hva; };
#define KVM_SET_USER_MEMORY_REGION _IOW(KVMIO, 0x46, struct ref_region)
struct ref_regs { uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags; };
#define KVM_SET_REGS _IOW(KVMIO, 0x82, struct ref_regs)
struct ref_segment { uint64_t base; uint32_t limit; uint16_t selector; uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding; };
struct ref_dtable { uint64_t base; uint16_t limit, padding[3]; };
struct ref_sregs { struct ref_segment cs, ds, es, fs, gs, ss, tr, ldt; struct ref_dtable gdt, idt;
                   uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base, interrupt_bitmap[4]; };
#define KVM_GET_SREGS _IOR(KVMIO, 0x83, struct ref_sregs)
#define KVM_SET_SREGS _IOW(KVMIO, 0x84, struct ref_sregs)
enum { EXIT_HLT = 5, EXIT_MMIO = 6, EXIT_MEMORY_FAULT = 39 };
struct run_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
struct run_memfault { uint64_t flags, gpa, size; };
#define RUN_EXIT_REASON(run) (*(uint32_t *)((char *)(run) + 8))
#define RUN_MMIO(run) ((struct run_mmio *)((char *)(run) + 32))
#define RUN_MEMFAULT(run) ((struct run_memfault *)((char *)(run) + 32))

#define PAGE 4096ULL
#define CODE_GPA 0x1000ULL
#define RAM_GPA 0x10000000ULL

enum mode { M_NONE, M_PREFILLED, M_MISSING, M_MINOR, M_EXIT };
static const char *mode_names[] = {"none", "prefilled", "uffd-missing", "uffd-minor", "vcpu-exit"};

static enum mode mode = M_EXIT;
static int per_vcpu_uffd, readers = 1, nvcpus = 1, delay_us, json;
static uint64_t chunk = 64ULL << 20, total;
static int kvm, vm, run_size, memfd = -1;
static uint8_t *ram, *source;
static int uffds[1024];
static long resolved;

static void die(const char *what) { perror(what); exit(2); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void fetch_delay(void) {
  if (!delay_us) return;
  struct timespec t = {0, delay_us * 1000L};
  nanosleep(&t, NULL);
}
static uint32_t pattern(uint64_t page, uint64_t word) { return (uint32_t)(page * 2654435761u) ^ (uint32_t)word; }

static void install(int uffd, uint64_t offset, int wake) {
  fetch_delay();
  if (mode == M_MINOR) {
    if (pwrite(memfd, source + offset, PAGE, offset) != (ssize_t)PAGE) die("pwrite");
    struct uffdio_continue c = {.range = {(uint64_t)ram + offset, PAGE}, .mode = wake ? 0 : UFFDIO_CONTINUE_MODE_DONTWAKE};
    if (ioctl(uffd, UFFDIO_CONTINUE, &c) < 0 && errno != EEXIST) die("UFFDIO_CONTINUE");
  } else {
    struct uffdio_copy c = {.dst = (uint64_t)ram + offset, .src = (uint64_t)source + offset, .len = PAGE,
                            .mode = wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE};
    if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST) die("UFFDIO_COPY");
  }
  __atomic_add_fetch(&resolved, 1, __ATOMIC_RELAXED);
}

static void *reader(void *arg) {
  int uffd = (int)(long)arg;
  for (;;) {
    struct pollfd p = {.fd = uffd, .events = POLLIN};
    if (poll(&p, 1, -1) < 0) continue;
    struct uffd_msg m;
    if (read(uffd, &m, sizeof m) != sizeof m) continue;  // EAGAIN: another reader took it
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    install(uffd, (m.arg.pagefault.address & ~(PAGE - 1)) - (uint64_t)ram, 1);
  }
  return NULL;
}

static void setup_vcpu_state(int vcpu, int id) {
  struct ref_sregs s;
  if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  struct ref_segment code = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1, .db = 1, .s = 1, .g = 1};
  struct ref_segment data = code;
  data.type = 3;
  data.selector = 16;
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;
  s.cr0 |= 1;
  if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
  uint64_t base = RAM_GPA + id * chunk;
  struct ref_regs r = {.rip = CODE_GPA, .rflags = 2, .rsi = base, .rdi = base + chunk, .rax = 0xC0DE0000u | id};
  if (ioctl(vcpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
}

static void *vcpu_thread(void *arg) {
  int id = (int)(long)arg;
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, id);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  void *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");
  setup_vcpu_state(vcpu, id);
  for (;;) {
    int rc = ioctl(vcpu, KVM_RUN, NULL);
    uint32_t reason = RUN_EXIT_REASON(run);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 && errno == EFAULT && reason == EXIT_MEMORY_FAULT && mode == M_EXIT) {
      install(uffds[0], (RUN_MEMFAULT(run)->gpa & ~(PAGE - 1)) - RAM_GPA, 0);
      continue;
    }
    if (rc < 0) die("KVM_RUN");
    if (reason == EXIT_HLT) break;
    struct run_mmio *mmio = RUN_MMIO(run);
    if (reason == EXIT_MMIO && mode == M_EXIT && mmio->phys_addr >= RAM_GPA && mmio->phys_addr < RAM_GPA + total) {
      uint64_t off = mmio->phys_addr - RAM_GPA;
      install(uffds[0], off & ~(PAGE - 1), 0);
      if (mmio->is_write) memcpy(ram + off, mmio->data, mmio->len);
      else memcpy(mmio->data, ram + off, mmio->len);
      continue;
    }
    fprintf(stderr, "vcpu %d: unexpected exit %u\n", id, reason);
    exit(2);
  }
  return NULL;
}

static int new_uffd(uint64_t features) {
  int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (u < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(u, UFFDIO_API, &api) < 0) die("UFFDIO_API");
  return u;
}

static void register_range(int u, uint64_t start, uint64_t len) {
  struct uffdio_register r = {.range = {start, len}, .mode = mode == M_MINOR ? UFFDIO_REGISTER_MODE_MINOR : UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(u, UFFDIO_REGISTER, &r) < 0) die("UFFDIO_REGISTER");
}

static void usage(void) {
  fprintf(stderr, "usage: demand_paging_ref [--mode none|prefilled|uffd-missing|uffd-minor|vcpu-exit] [--uffd single|per-vcpu]\n"
                  "       [--readers R] [--vcpus N] [--mem-per-vcpu MiB] [--delay-us D] [--json]\n");
  exit(2);
}

int main(int argc, char **argv) {
  static struct option opts[] = {{"mode", 1, 0, 'm'}, {"uffd", 1, 0, 'u'}, {"readers", 1, 0, 'r'}, {"vcpus", 1, 0, 'v'},
                                 {"mem-per-vcpu", 1, 0, 'b'}, {"delay-us", 1, 0, 'd'}, {"json", 0, 0, 'j'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    switch (c) {
    case 'm': {
      int found = 0;
      for (int i = 0; i < 5; i++) if (!strcmp(optarg, mode_names[i])) { mode = i; found = 1; }
      if (!found) usage();
      break;
    }
    case 'u': per_vcpu_uffd = !strcmp(optarg, "per-vcpu"); break;
    case 'r': readers = atoi(optarg); break;
    case 'v': nvcpus = atoi(optarg); break;
    case 'b': chunk = strtoull(optarg, NULL, 10) << 20; break;
    case 'd': delay_us = atoi(optarg); break;
    case 'j': json = 1; break;
    default: usage();
    }
  }
  if (nvcpus < 1 || nvcpus > 1024 || readers < 1 || chunk < PAGE) usage();
  total = chunk * nvcpus;
  if (RAM_GPA + total > 0xF0000000ULL) { fprintf(stderr, "guest RAM must stay below 3.75 GiB in this guest mode\n"); return 2; }

  if ((kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0) die("/dev/kvm");
  if ((vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0) die("KVM_CREATE_VM");
  if ((run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)) < 0) die("KVM_GET_VCPU_MMAP_SIZE");

  // mov [esi],eax ; add esi,4096 ; cmp esi,edi ; jb -12 ; hlt
  static const uint8_t code[] = {0x89, 0x06, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0x39, 0xfe, 0x72, 0xf4, 0xf4};
  uint8_t *low = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  memcpy(low + CODE_GPA, code, sizeof code);
  struct ref_region slot0 = {0, 0, 0, 0x10000, (uint64_t)low};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot0) < 0) die("slot 0");

  source = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (source == MAP_FAILED) die("mmap source");
  for (uint64_t p = 0; p < total / PAGE; p++)
    for (uint64_t w = 0; w < PAGE / 4; w++) ((uint32_t *)(source + p * PAGE))[w] = pattern(p, w);

  if (mode == M_MINOR) {
    if ((memfd = memfd_create("guest-ram", MFD_CLOEXEC)) < 0) die("memfd_create");
    if (ftruncate(memfd, total) < 0 || fallocate(memfd, 0, 0, total) < 0) die("memfd size");
    ram = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  } else {
    ram = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  }
  if (ram == MAP_FAILED) die("mmap ram");
  if (mode == M_PREFILLED) memcpy(ram, source, total);
  struct ref_region slot1 = {1, 0, RAM_GPA, total, (uint64_t)ram};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot1) < 0) die("slot 1");

  pthread_t t;
  if (mode == M_MISSING || mode == M_MINOR) {
    uint64_t features = mode == M_MINOR ? UFFD_FEATURE_MINOR_SHMEM : 0;
    int n = per_vcpu_uffd ? nvcpus : 1;
    for (int i = 0; i < n; i++) {
      uffds[i] = new_uffd(features);
      register_range(uffds[i], (uint64_t)ram + (per_vcpu_uffd ? i * chunk : 0), per_vcpu_uffd ? chunk : total);
      for (int r = 0; r < readers; r++) pthread_create(&t, NULL, reader, (void *)(long)uffds[i]);
    }
  } else if (mode == M_EXIT) {
    uffds[0] = new_uffd(UFFD_FEATURE_SIGBUS);
    register_range(uffds[0], (uint64_t)ram, total);
  }

  pthread_t vcpus[1024];
  double t0 = now();
  for (long i = 0; i < nvcpus; i++) pthread_create(&vcpus[i], NULL, vcpu_thread, (void *)i);
  for (int i = 0; i < nvcpus; i++) pthread_join(vcpus[i], NULL);
  double elapsed = now() - t0;

  long bad = 0;
  for (uint64_t p = 0; p < total / PAGE && mode != M_NONE; p++) {
    uint32_t *w = (uint32_t *)(ram + p * PAGE);
    if (w[0] != (0xC0DE0000u | (uint32_t)(p * PAGE / chunk))) bad++;
    else for (uint64_t i = 1; i < PAGE / 4; i++) if (w[i] != pattern(p, i)) { bad++; break; }
  }
  double pages = (double)(total / PAGE);
  double per_vcpu = pages / nvcpus / elapsed;
  if (json) {
    printf("{\"implementation\":\"c-reference\",\"mode\":\"%s\",\"uffd\":\"%s\",\"readers\":%d,\"vcpus\":%d,\"mem_per_vcpu_mib\":%llu,"
           "\"delay_us\":%d,\"seconds\":%.6f,\"pages_per_sec_per_vcpu\":%.0f,\"pages_per_sec\":%.0f,\"resolved\":%ld,\"bad_pages\":%ld}\n",
           mode_names[mode], per_vcpu_uffd ? "per-vcpu" : "single", readers, nvcpus, (unsigned long long)(chunk >> 20), delay_us,
           elapsed, per_vcpu, per_vcpu * nvcpus, resolved, bad);
  } else {
    printf("mode %s, %d vCPU(s) x %llu MiB, uffd %s, %d reader(s), delay %d us\n", mode_names[mode], nvcpus,
           (unsigned long long)(chunk >> 20), per_vcpu_uffd ? "per-vcpu" : "single", readers, delay_us);
    printf("Total guest execution time:\t%.6fs\n", elapsed);
    printf("Per-vcpu demand paging rate:\t%f pgs/sec/vcpu\n", per_vcpu);
    printf("Overall demand paging rate:\t%f pgs/sec\n", per_vcpu * nvcpus);
    printf("Pages resolved: %ld, pages failing verification: %ld\n", resolved, bad);
  }
  return bad ? 1 : 0;
}
