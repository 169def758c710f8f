// faultline_unix.h - Unix-socket calls Swift cannot express comfortably, and why:
//
//  * SCM_RIGHTS: passing descriptors needs a control buffer walked with the CMSG_FIRSTHDR /
//    CMSG_NXTHDR / CMSG_DATA macros, which Swift does not import. fl_send_with_fds and
//    fl_recv_with_fds do the whole sendmsg/recvmsg.
//  * SO_PEERCRED: `struct ucred` is only declared with _GNU_SOURCE, which Swift's Glibc
//    module does not set. fl_peer_credentials reads it.
//  * accept4 (a descriptor close-on-exec from birth) is declared only with _GNU_SOURCE too.
//  * signalfd: SIGINT/SIGTERM as a readable descriptor, so a poll loop can end cleanly
//    (sigset_t manipulation is macros as well).
// Every function returns the raw result (-1 and errno on failure); the error policy is in
// Swift (FaultlineLinux).
#ifndef FAULTLINE_UNIX_H
#define FAULTLINE_UNIX_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

// The most descriptors one message carries or accepts.
#define FL_MAX_PASSED_FDS 8

// sendmsg(MSG_NOSIGNAL) of `len` bytes with `nfds` descriptors (0..FL_MAX_PASSED_FDS)
// attached as one SCM_RIGHTS message. Returns the bytes sent or -1.
ssize_t fl_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

// recvmsg(MSG_CMSG_CLOEXEC) of up to `len` bytes. Descriptors that arrived are stored in
// `fds` (at most `max_fds`; any beyond are closed) and counted in `*nfds`; `*truncated` is 1
// when the kernel dropped descriptors for lack of room (MSG_CTRUNC). Returns the bytes
// received (0: end of stream) or -1.
ssize_t fl_recv_with_fds(int sock, void *buf, size_t len, int flags, int *fds, int max_fds, int *nfds, int *truncated);

// accept4(SOCK_CLOEXEC) (declared only with _GNU_SOURCE). The descriptor or -1.
int fl_accept_cloexec(int sock);

// getsockopt(SO_PEERCRED): the peer's pid, uid and gid as of its connect(). 0 or -1.
int fl_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC): message boundaries kept. 0 or -1.
int fl_seqpacket_pair(int fds[2]);

// Blocks SIGINT and SIGTERM in the calling thread (threads it starts later inherit that)
// and returns a close-on-exec, non-blocking signalfd reporting them, or -1.
int fl_termination_signalfd(void);

// Reads one pending signal from a signalfd; returns its number, 0 when none is pending, -1.
int fl_signalfd_read(int fd);

// Undoes fl_termination_signalfd's mask in the calling thread (before exec of a child that
// must see SIGTERM with its default action). 0 or -1.
int fl_termination_signals_unblock(void);

#endif
