/* The vhost-user client side shared by the benchmark front-ends
 * (blkfe.c, tsofe.c): message framing, connection, split ring layout.
 * Define PROG (the program name for error messages) before including. */
#ifndef VU_CLIENT_H
#define VU_CLIENT_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>

#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_REPLY 0x4u
#define VU_FLAG_NEED_REPLY 0x8u

#define F_RING_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32
#define PF_REPLY_ACK 3
#define BIT(n) (1ull << (n))

#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

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
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
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

#endif
