/*
 * The QEMU peer's guest: a multiboot (v1) kernel that does what Faultline's `dirtier`
 * workload does (Sources/FaultlineCore/RunningWorkload.swift), forever.
 *
 * QEMU's multiboot loader enters _start in 32-bit protected mode, paging off, flat
 * segments, interrupts off, eax = 0x2BADB002, ebx = the multiboot information. The region
 * is [0x10000000, 0x10000000 + N MiB): the same guest-physical start as Faultline's RAM
 * (MachineLayout.ramBase), so with `-m 1G` and N = 512 it is the first half of the RAM
 * above it, like `--memory 1G --working-set 131072` on one vCPU. N comes from `mib=N` on
 * the kernel command line (`-append mib=512`), default 512.
 *
 * Each pass k (from 1) stores the 32-bit tag k (the dirtier's tag of vCPU 0) to the first
 * word of every page of the region and to the word at 4 + 64 * (k % 64), then writes k to
 * port 0x10, as the dirtier does. Registers as in the dirtier: esi/edi the region, edx the
 * cursor, ebx the tag, ecx the second word's offset, ebp the pass. No stack is used.
 * If the region does not fit in the RAM the loader reports, the guest writes 0 to port
 * 0x11 and halts (nothing is dirtied, which the benchmark checks for).
 */
        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x00000003            /* page-align modules; give memory info */
        .set    REGION_BASE, 0x10000000
        .set    DEFAULT_MIB, 512
        .set    PAGE, 4096
        .set    TAG_CYCLE, 0xFFFFFF
        .set    PROGRESS_PORT, 0x10
        .set    FAIL_PORT, 0x11

        .text
        .code32
        .globl  _start
        .align  4
multiboot_header:                               /* within the file's first 8 KiB */
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
_start:
        cli
        mov     $DEFAULT_MIB, %edi
        testl   $4, (%ebx)                      /* flags bit 2: cmdline present */
        jz      have_size
        mov     16(%ebx), %esi                  /* cmdline (NUL-terminated) */
find_key:
        cmpb    $0, (%esi)
        je      have_size
        cmpl    $0x3d62696d, (%esi)             /* "mib=" */
        je      key_found
        inc     %esi
        jmp     find_key
key_found:
        add     $4, %esi
        xor     %edi, %edi
digit:
        movzbl  (%esi), %eax
        sub     $'0', %eax
        cmp     $9, %eax
        ja      have_size                       /* not a digit: the number ends */
        imul    $10, %edi, %edi
        add     %eax, %edi
        inc     %esi
        jmp     digit
have_size:
        test    %edi, %edi
        jz      fail
        /* The region must end inside the RAM: mem_upper (KiB above 1 MiB) is at ebx+8. */
        testl   $1, (%ebx)
        jz      fail
        mov     8(%ebx), %eax
        shr     $10, %eax                       /* MiB above 1 MiB */
        inc     %eax                            /* MiB of RAM from 0 */
        mov     %edi, %ecx
        add     $(REGION_BASE >> 20), %ecx      /* end of the region, MiB */
        cmp     %eax, %ecx
        ja      fail
        shl     $20, %edi
        mov     $REGION_BASE, %esi
        add     %esi, %edi                      /* edi = end of the region */
        mov     %esi, %edx
        mov     $1, %ebp                        /* pass 1 */
        mov     $1, %ebx                        /* its tag */
        mov     $(4 + 64), %ecx                 /* 4 + 64 * (1 % 64) */
page:
        mov     %ebx, (%edx)                    /* first word */
        mov     %edx, %eax
        add     %ecx, %eax
        mov     %ebx, (%eax)                    /* second word, at this pass's offset */
        add     $PAGE, %edx
        cmp     %edi, %edx
        jb      page
        mov     %ebp, %eax
        out     %eax, $PROGRESS_PORT            /* the pass just completed */
        inc     %ebp
        mov     %ebx, %eax                      /* next tag: +1, low 24 bits never 0 */
        inc     %eax
        mov     %eax, %ecx
        shl     $8, %ecx
        jne     1f
        sub     $TAG_CYCLE, %eax
1:      mov     %eax, %ebx
        mov     %ebp, %ecx
        shl     $6, %ecx
        and     $0xFC0, %ecx
        add     $4, %ecx
        mov     %esi, %edx
        jmp     page
fail:
        xor     %eax, %eax
        out     %eax, $FAIL_PORT
2:      hlt
        jmp     2b
