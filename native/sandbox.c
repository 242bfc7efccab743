/* The in-process sandbox ([daemon] sandbox = true, --sandbox).
 *
 * Ring workers handle what the guest puts in its rings, so they are the
 * threads a hostile guest would attack.  When the sandbox is on, every
 * worker thread, as it starts (vhd_sandbox_thread_start, called first in
 * sched.c's worker loop), drops all of its capabilities, sets
 * no_new_privs and installs a seccomp filter that allows only the
 * syscalls the data plane makes.  Anything else kills the whole process
 * with SIGSYS (SECCOMP_RET_KILL_PROCESS): a worker that tries to open a
 * file, create a socket or exec has been taken over, and systemd's
 * Restart=on-failure plus the front-ends' reconnect are the recovery.
 * mmap/mprotect are allowed only without PROT_EXEC (glibc's malloc arenas
 * need them).
 *
 * Seccomp filters and capabilities are per thread: the control plane
 * (Python's main thread) is not filtered, so reload can still open images
 * and sockets; it drops its capabilities separately
 * (vhd_sandbox_drop_caps, vhostd/sandbox.py).
 *
 * Not covered: io_uring requests are executed by the kernel on the
 * submitter's behalf and are not seen by seccomp.  The rings only ever
 * carry the read/write/fsync requests the data plane prepares, but a
 * worker that has been taken over could submit others; --aio sync avoids
 * io_uring for disks. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "vhd.h"

#if defined(__x86_64__)
#define SANDBOX_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SANDBOX_ARCH AUDIT_ARCH_AARCH64
#else
#error "the sandbox's seccomp filter knows x86-64 and aarch64 only"
#endif

/* What a worker does: wait (epoll), move data (eventfds, tap, image file,
 * io_uring), sync, take locks (futex), allocate (malloc arenas), read the
 * clock and leave.  Every entry is here because the data plane or glibc
 * under it makes that call; tests/test_sandbox.py runs the whole I/O path
 * with the filter on. */
static const int allowed[] = {
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64,
    SYS_preadv, SYS_pwritev, SYS_preadv2, SYS_pwritev2,
    SYS_epoll_pwait, SYS_epoll_ctl,
#ifdef SYS_epoll_wait
    SYS_epoll_wait,
#endif
#ifdef SYS_epoll_pwait2
    SYS_epoll_pwait2,
#endif
    SYS_io_uring_enter,
    SYS_fdatasync, SYS_fsync, SYS_fallocate,
    SYS_futex,
#ifdef SYS_futex_waitv
    SYS_futex_waitv,
#endif
    SYS_munmap, SYS_madvise, SYS_mremap, SYS_brk,   /* mmap, mprotect: below, without PROT_EXEC */
    SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep, SYS_sched_yield,
    SYS_timerfd_settime,                            /* QoS: a throttled ring's wake-up */
    SYS_gettid, SYS_getpid,
    SYS_rt_sigprocmask, SYS_restart_syscall, SYS_rseq,
    SYS_exit,                                       /* the thread ends (not exit_group) */
};

#define NALLOWED (sizeof(allowed) / sizeof(allowed[0]))
/* arch (3) + nr (1) + x32 (2) + one jump per allowed syscall + mmap and
 * mprotect (2) + kill (1) + PROT_EXEC check (3) + allow (1) */
#define FILTER_MAX (3 + 1 + 2 + NALLOWED + 2 + 1 + 3 + 1)

static atomic_int sandbox_on;
static atomic_uint sandboxed_threads;

static int build_filter(struct sock_filter *f)
{
    int n = 0;
#define EMIT(s) (f[n++] = (struct sock_filter)s)
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SANDBOX_ARCH, 1, 0));
    EMIT(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
#if defined(__x86_64__)
    /* x32 syscall numbers share the arch: refuse them all. */
    EMIT(BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1));
    EMIT(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
#endif
    /* Positions, relative to the first allowed-syscall jump at index first:
     * first + NALLOWED: mmap, +1: mprotect, +2: kill, +3..+5: PROT_EXEC
     * check, +6: allow.  A jump's offset counts from the next instruction. */
    const int first = n;
    const int prot_check = first + (int)NALLOWED + 3;
    const int allow = prot_check + 3;
    for (size_t i = 0; i < NALLOWED; i++, n++)
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)allowed[i],
                                            (unsigned char)(allow - n - 1), 0);
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, (unsigned char)(prot_check - n - 1), 0);
    n++;
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mprotect, (unsigned char)(prot_check - n - 1), 0);
    n++;
    EMIT(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    /* prot_check: mmap/mprotect's third argument (its low 32 bits: little endian). */
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])));
    EMIT(BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 0, 1));
    EMIT(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    /* allow */
    EMIT(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
#undef EMIT
    return n;
}

/* This thread's capabilities: all of them gone. */
static int drop_thread_caps(void)
{
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    return syscall(SYS_capset, &hdr, data) == 0 ? 0 : -errno;
}

static int install(void)
{
    struct sock_filter f[FILTER_MAX];
    struct sock_fprog prog = { .len = (unsigned short)build_filter(f), .filter = f };
    int rc = drop_thread_caps();
    if (rc < 0)
        return rc;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        return -errno;
    atomic_fetch_add(&sandboxed_threads, 1);
    return 0;
}

void vhd_sandbox_thread_start(void)
{
    if (!atomic_load(&sandbox_on))
        return;
    int rc = install();
    if (rc < 0) {
        /* vhd_sandbox_enable() installed the same filter on a probe thread,
         * so this does not happen; a worker never runs unfiltered. */
        fprintf(stderr, "vhostd: sandbox: cannot filter a ring worker: %s\n", strerror(-rc));
        abort();
    }
}

static void *probe_thread(void *arg)
{
    *(int *)arg = install();
    return NULL;
}

int vhd_sandbox_enable(void)
{
    int rc = -EINVAL;
    pthread_t t;
    int err = pthread_create(&t, NULL, probe_thread, &rc);
    if (err != 0)
        return -err;
    pthread_join(t, NULL);
    if (rc == 0)
        atomic_store(&sandbox_on, 1);
    return rc;
}

int vhd_sandbox_enabled(void)
{
    return atomic_load(&sandbox_on);
}

uint32_t vhd_sandbox_threads(void)
{
    return atomic_load(&sandboxed_threads);
}

int vhd_sandbox_syscall_count(void)
{
    return (int)NALLOWED + 2;
}

int vhd_sandbox_drop_caps(uint64_t keep)
{
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0)
        return -errno;
    /* The bounding set first (needs CAP_SETPCAP, which is dropped below). */
    for (int cap = 0; cap < 64; cap++) {
        if (keep & (1ull << cap))
            continue;
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1 && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                && errno != EPERM)
            return -errno;
    }
    (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (int i = 0; i < 2; i++) {
        uint32_t k = (uint32_t)(keep >> (32 * i));
        data[i].permitted &= k;
        data[i].effective &= k;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -errno;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    return 0;
}

uint64_t vhd_sandbox_caps(void)
{
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0)
        return 0;
    return (uint64_t)data[0].effective | ((uint64_t)data[1].effective << 32);
}

/* Test builds only: run syscall *(long *)arg on the calling thread (a
 * worker, through vhd_task_call) and leave its result (or -errno) there. */
void vhd_sandbox_test_syscall(vhd_task *t, void *arg)
{
    (void)t;
    long *nr = arg;
#ifdef VHD_TEST_HOOKS
    long r = syscall(*nr, 0, 0, 0);
    *nr = r < 0 ? -errno : r;
#else
    *nr = -ENOSYS;
#endif
}
