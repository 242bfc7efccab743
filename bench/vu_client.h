/* The vhost-user client side shared by the benchmark front-ends
 * (blkfe.c, tsofe.c): message framing, connection, split ring layout.
 * Define PROG (the program name for error messages) before including. */
#ifndef VU_CLIENT_H
#define VU_CLIENT_H

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_REPLY 0x4u
#define VU_FLAG_NEED_REPLY 0x8u

#define F_LOG_ALL 26
#define F_RING_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32
#define PF_LOG_SHMFD 1
#define PF_REPLY_ACK 3
#define VU_SET_LOG_BASE_REQ 6
#define VRING_F_LOG 1u          /* SET_VRING_ADDR flags: log used ring writes at `log` */
#define BIT(n) (1ull << (n))

#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

/* SET_MEM_TABLE carries up to 8 regions, each with its fd (VHOST_MEMORY_BASELINE_NREGIONS). */
#define VU_MAX_FDS 8

#define EXIT_SETUP 2
#define EXIT_BACKEND 3

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static inline void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) & ~(a - 1);
}

/* virtio 1.2 2.7.10: notify iff new_idx passed event_idx since old_idx. */
static inline bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];           /* then used_event (EVENT_IDX) */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];   /* then avail_event (EVENT_IDX) */
};

struct vu_hdr {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
};

struct vu_state {
    uint32_t index;
    uint32_t num;
};

struct vu_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc;
    uint64_t used;
    uint64_t avail;
    uint64_t log;
};

struct vu_mem {
    uint32_t nregions;
    uint32_t padding;
    struct {
        uint64_t gpa;
        uint64_t size;
        uint64_t uva;
        uint64_t mmap_offset;
    } region[1];
};

struct vu_conn {
    int sock;
    uint64_t features;        /* acked virtio features */
    uint64_t protocol;        /* acked protocol features */
};

static inline void vu_send(struct vu_conn *c, uint32_t req, bool need_reply, const void *payload,
                    uint32_t size, const int *fds, int nfds)
{
    struct vu_hdr h = { req, VU_FLAG_VERSION | (need_reply ? VU_FLAG_NEED_REPLY : 0), size };
    struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)payload, size } };
    union {
        char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
    if (nfds > VU_MAX_FDS)
        die(EXIT_SETUP, "request %u: %d fds, at most %d", req, nfds, VU_MAX_FDS);
    if (nfds > 0) {
        memset(&ctl, 0, sizeof(ctl));
        m.msg_control = ctl.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do
        n = sendmsg(c->sock, &m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(sizeof(h) + size))
        die(EXIT_BACKEND, "sending request %u: %s", req, n < 0 ? strerror(errno) : "short write");
}

static inline void recv_exact(int sock, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(sock, (char *)buf + got, len - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(EXIT_BACKEND, "back-end %s", n == 0 ? "closed the connection" : strerror(errno));
        got += (size_t)n;
    }
}

static inline void vu_connect(struct vu_conn *c, const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path))
        die(EXIT_SETUP, "socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->sock < 0 || connect(c->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die(EXIT_SETUP, "connect %s: %s", path, strerror(errno));
}

/* --- dirty-page log (--log), shared by the front-ends ------------------------------------ */

/* As QEMU's vhost during a migration: one bit per 4 KiB guest-physical page from GPA 0
 * (bit n = page n: byte n/8, bit n%8), in a memfd the back-end maps (LOG_SHMFD); the
 * back-end sets bits with atomic ORs, and a sync thread takes them every 100 ms with atomic
 * exchanges, as QEMU's migration bitmap sync does. */
#define VU_LOG_PAGE 4096ull
#define VU_LOG_SYNC_NS (100 * 1000000ull)

struct vu_log {
    int fd;
    uint64_t *words;
    uint64_t nwords;
    uint64_t size;                /* bytes, the SET_LOG_BASE mmap_size */
    pthread_t thread;
    bool stop;                    /* atomic */
    uint64_t pages, syncs;        /* pages seen set (summed over syncs), syncs done */
    uint64_t outside;             /* pages seen set outside guest RAM: a back-end bug */
    uint64_t first_page, end_page;   /* guest RAM in pages */
};

/* A bitmap covering guest-physical [0, ram_gpa + ram_size). */
static inline void vu_log_create(struct vu_log *l, uint64_t ram_gpa, uint64_t ram_size)
{
    uint64_t pages = (ram_gpa + ram_size + VU_LOG_PAGE - 1) / VU_LOG_PAGE;
    l->nwords = (pages + 63) / 64;
    l->size = l->nwords * 8;
    l->first_page = ram_gpa / VU_LOG_PAGE;
    l->end_page = (ram_gpa + ram_size) / VU_LOG_PAGE;
    l->fd = memfd_create("vu-dirty-log", MFD_CLOEXEC);
    if (l->fd < 0 || ftruncate(l->fd, (off_t)align_up(l->size, 4096)) < 0)
        die(EXIT_SETUP, "memfd for the dirty log: %s", strerror(errno));
    l->words = mmap(NULL, align_up(l->size, 4096), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                    l->fd, 0);
    if (l->words == MAP_FAILED)
        die(EXIT_SETUP, "mmap the dirty log: %s", strerror(errno));
}

/* SET_LOG_BASE is answered with a u64 whatever REPLY_ACK says.  Its value means nothing:
 * QEMU reads the reply and ignores it, and libvhost-user (qemu-storage-daemon) echoes the
 * request's first word (mmap_size) instead of 0, so only its arrival is checked. */
static inline void vu_log_set_base(struct vu_conn *c, const struct vu_log *l)
{
    struct {
        uint64_t mmap_size;
        uint64_t mmap_offset;
    } base = { l->size, 0 };
    vu_send(c, VU_SET_LOG_BASE_REQ, false, &base, sizeof(base), &l->fd, 1);
    struct vu_hdr h;
    uint64_t value;
    recv_exact(c->sock, &h, sizeof(h));
    if (h.request != VU_SET_LOG_BASE_REQ || !(h.flags & VU_FLAG_REPLY) || h.size != sizeof(value))
        die(EXIT_BACKEND, "bad reply to SET_LOG_BASE (request %u, flags %#x, size %u)", h.request,
            h.flags, h.size);
    recv_exact(c->sock, &value, sizeof(value));
}

/* One pass over the bitmap, like QEMU's vhost_dev_sync_region(): a word that reads zero is
 * skipped, any other is exchanged with 0 and its bits counted. */
static inline void vu_log_sync(struct vu_log *l)
{
    uint64_t pages = 0, outside = 0;
    for (uint64_t i = 0; i < l->nwords; i++) {
        if (__atomic_load_n(&l->words[i], __ATOMIC_RELAXED) == 0)
            continue;
        uint64_t w = __atomic_exchange_n(&l->words[i], 0, __ATOMIC_SEQ_CST);
        pages += (uint64_t)__builtin_popcountll(w);
        for (; w; w &= w - 1) {
            uint64_t page = i * 64 + (uint64_t)__builtin_ctzll(w);
            outside += page < l->first_page || page >= l->end_page;
        }
    }
    l->pages += pages;
    l->outside += outside;
    l->syncs++;
}

static inline void *vu_log_main(void *arg)
{
    struct vu_log *l = arg;
    while (!__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE)) {
        struct timespec ts = { 0, (long)VU_LOG_SYNC_NS };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        vu_log_sync(l);
    }
    return NULL;
}

static inline void vu_log_start(struct vu_log *l)
{
    int rc = pthread_create(&l->thread, NULL, vu_log_main, l);
    if (rc != 0)
        die(EXIT_SETUP, "pthread_create: %s", strerror(rc));
}

/* Stops the sync thread and takes what the back-end logged since its last pass. */
static inline void vu_log_stop(struct vu_log *l)
{
    __atomic_store_n(&l->stop, true, __ATOMIC_RELEASE);
    pthread_join(l->thread, NULL);
    vu_log_sync(l);
}

/* The JSON fields of a --log run (to append inside an object). */
static inline void vu_log_print_json(const struct vu_log *l)
{
    printf(", \"log\": true, \"logged_pages\": %" PRIu64 ", \"log_syncs\": %" PRIu64
           ", \"logged_pages_outside_ram\": %" PRIu64, l->pages, l->syncs, l->outside);
}

#endif
