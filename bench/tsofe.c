/* tsofe: a vhost-user-net front-end (the guest driver's TX side) that sends large TSO frames
 * (or, for the net-null benchmark, small plain frames, or receives: --frame, --rx).
 *
 * dpdk-testpmd's txonly engine makes only small UDP frames, and its csum engine segments only
 * what it receives; a guest's TCP stack hands its virtio-net driver 64 KiB GSO frames.  tsofe
 * does the same without a VM: it connects to a back-end's socket, negotiates VERSION_1, CSUM
 * and HOST_TSO4 (EVENT_IDX when offered), shares its "guest RAM" through a memfd and keeps the
 * TX ring (ring 1) full of single-descriptor chains [virtio_net_hdr_v1][Ethernet|IPv4|TCP|
 * payload] with gso_type TCPV4, gso_size MSS and a partial TCP checksum (NEEDS_CSUM), as
 * Linux's virtio-net driver sends them.  The RX ring (ring 0) is started without buffers.
 * Completions are interrupt-driven like a guest's: sleep on the call eventfd when nothing was
 * used, re-post the used chains at once, kick once per batch when the device wants a kick.
 *
 *   tsofe --socket PATH [--seconds S] [--mss N] [--segments N] [--ring N] [--buffers N]
 *         [--cpu C] [--sync] [--frame N | --rx] [--log]
 *
 * --frame N sends plain N-byte Ethernet frames instead (a zeroed virtio-net header: no GSO,
 * no checksum offload).  --rx is the guest's RX side instead: the RX ring is kept full of
 * device-writable 2 KiB buffers and the TX ring stays empty; frames are what the device
 * filled.  --log turns on dirty-page logging as while QEMU migrates the guest (LOG_ALL,
 * LOG_SHMFD, SET_LOG_BASE, VHOST_VRING_F_LOG on both rings, a 100 ms sync thread; see
 * vu_client.h) and adds logged_pages to the JSON line.  --regions N spreads the frame
 * buffers round-robin over N guest RAM regions (ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else
 * SET_MEM_TABLE for N <= 8), so that each translation must find its region among N.
 *
 * Frames go to 02:00:00:00:00:02 (no host's MAC), so a tap's kernel side drops them at once
 * (PACKET_OTHERHOST) after counting them: what is measured is the way into the tap.
 * It prints one JSON line: frames (used by the back-end), payload_bytes, seconds, gbps (TCP
 * payload), kicks and wake-ups per frame.  --sync: print READY after setup, wait for a line on
 * stdin, run, print the JSON line, wait for stdin to close before disconnecting.
 * Exit status: 0 ok, 2 usage or setup failure, 3 the back-end failed or hung up.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE tsofe.c -o tsofe
 * Layouts: virtio 1.2 (2.7 split virtqueues, 5.1 network device), QEMU's vhost-user.rst.
 * x86-64 (little-endian) only, like the back-ends. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROG "tsofe"
#include "vu_client.h"

/* --- numbers from the specs ------------------------------------------------------------- */

enum vu_request {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_SET_MEM_TABLE = 5,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_SET_VRING_ERR = 14,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_MAX_MEM_SLOTS = 36,
    VU_ADD_MEM_REG = 37,
};
#define PF_CONFIGURE_MEM_SLOTS 15


#define F_NET_CSUM 0
#define F_NET_HOST_TSO4 11
#define BIT(n) (1ull << (n))


#define NET_HDR_F_NEEDS_CSUM 1
#define NET_HDR_GSO_TCPV4 1
#define ETH_LEN 14
#define IP_LEN 20
#define TCP_LEN 20
#define HDRS_LEN (ETH_LEN + IP_LEN + TCP_LEN)
#define RX_RING 0
#define TX_RING 1
#define RX_BUF 2048
#define VRING_DESC_F_WRITE 2


struct virtio_net_hdr_v1 {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* --- small helpers ---------------------------------------------------------------------- */

/* virtio 1.2, 2.7.10.2: notify iff new_idx passed event_idx since old_idx. */
/* --- vhost-user connection -------------------------------------------------------------- */

static uint64_t vu_recv_u64(struct vu_conn *c, uint32_t req)
{
    struct vu_hdr h;
    uint64_t v = 0;
    recv_exact(c->sock, &h, sizeof(h));
    if (h.request != req || !(h.flags & VU_FLAG_REPLY) || h.size != sizeof(v))
        die(EXIT_BACKEND, "bad reply to request %u (request %u, flags %#x, size %u)", req,
            h.request, h.flags, h.size);
    recv_exact(c->sock, &v, sizeof(v));
    return v;
}

static uint64_t vu_get_u64(struct vu_conn *c, uint32_t req)
{
    vu_send(c, req, false, NULL, 0, NULL, 0);
    return vu_recv_u64(c, req);
}

/* A request without a reply of its own; with REPLY_ACK and `ack` the back-end confirms it. */
static void vu_request(struct vu_conn *c, uint32_t req, const void *payload, uint32_t size,
                       int fd, bool ack)
{
    ack = ack && (c->protocol & BIT(PF_REPLY_ACK));
    vu_send(c, req, ack, payload, size, &fd, fd >= 0);
    if (ack && vu_recv_u64(c, req) != 0)
        die(EXIT_BACKEND, "back-end refused request %u", req);
}

/* QEMU's order: features, protocol features, owner, then SET_FEATURES with what we use.
 * `log`: LOG_ALL and LOG_SHMFD too (exit 2 if the back-end does not offer them).
 * `mem_slots`: CONFIGURE_MEM_SLOTS when offered (--regions). */
static void vu_negotiate(struct vu_conn *c, bool event_idx, bool log, bool mem_slots)
{
    uint64_t offered = vu_get_u64(c, VU_GET_FEATURES);
    uint64_t need = BIT(F_VERSION_1) | BIT(F_NET_CSUM) | BIT(F_NET_HOST_TSO4) | (log ? BIT(F_LOG_ALL) : 0);
    if ((offered & need) != need)
        die(EXIT_SETUP, "back-end does not offer VERSION_1, CSUM and HOST_TSO4%s (features %#" PRIx64 ")",
            log ? " and LOG_ALL" : "", offered);
    if (offered & BIT(F_PROTOCOL_FEATURES)) {
        uint64_t pf = vu_get_u64(c, VU_GET_PROTOCOL_FEATURES);
        if (log && !(pf & BIT(PF_LOG_SHMFD)))
            die(EXIT_SETUP, "--log: back-end does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD "
                "(protocol features %#" PRIx64 ")", pf);
        c->protocol = pf & (BIT(PF_REPLY_ACK) | (log ? BIT(PF_LOG_SHMFD) : 0) |
                            (mem_slots ? BIT(PF_CONFIGURE_MEM_SLOTS) : 0));
        vu_request(c, VU_SET_PROTOCOL_FEATURES, &c->protocol, sizeof(c->protocol), -1, false);
    } else if (log) {
        die(EXIT_SETUP, "--log: back-end offers no protocol features (LOG_SHMFD needs them)");
    }
    vu_request(c, VU_SET_OWNER, NULL, 0, -1, false);
    c->features = need | (offered & BIT(F_PROTOCOL_FEATURES));
    if (event_idx)
        c->features |= offered & BIT(F_RING_EVENT_IDX);
    vu_request(c, VU_SET_FEATURES, &c->features, sizeof(c->features), -1, false);
}

/* --- guest RAM and rings ---------------------------------------------------------------- */

#define GPA_BASE 0x100000ull

struct ram {
    int fd;
    uint8_t *base;
    uint64_t size, used;
};

static void ram_create(struct ram *r, uint64_t size)
{
    r->size = align_up(size, 2u << 20);
    r->fd = memfd_create("tsofe-guest-ram", MFD_CLOEXEC);
    if (r->fd < 0 || ftruncate(r->fd, (off_t)r->size) < 0)
        die(EXIT_SETUP, "memfd of %" PRIu64 " bytes: %s", r->size, strerror(errno));
    r->base = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, 0);
    if (r->base == MAP_FAILED)
        die(EXIT_SETUP, "mmap guest RAM: %s", strerror(errno));
}

static void *ram_alloc(struct ram *r, uint64_t size)
{
    uint64_t off = align_up(r->used, 4096);
    if (off + size > r->size)
        die(EXIT_SETUP, "guest RAM too small");
    r->used = off + size;
    return r->base + off;
}

static uint64_t ram_gpa(const struct ram *r, const void *p)
{
    return GPA_BASE + (uint64_t)((const uint8_t *)p - r->base);
}

/* --regions N: the frame buffers round-robin over N regions (buffer b in region b % N).
 * Region 0 is the RAM above (rings first); regions 1..N-1 are memfds of their own, each at
 * a guest-physical address 2 MiB past the previous region's end. */
#define REGION_GAP (2ull << 20)
#define MAX_REGIONS 509

struct region {
    int fd;
    uint8_t *base;
    uint64_t gpa, size;
};

static void region_create(struct region *g, uint64_t gpa, uint64_t size)
{
    *g = (struct region){ .gpa = gpa, .size = align_up(size, 4096) };
    g->fd = memfd_create("tsofe-guest-ram", MFD_CLOEXEC);
    if (g->fd < 0 || ftruncate(g->fd, (off_t)g->size) < 0)
        die(EXIT_SETUP, "memfd of %" PRIu64 " bytes: %s", g->size, strerror(errno));
    g->base = mmap(NULL, g->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, g->fd, 0);
    if (g->base == MAP_FAILED)
        die(EXIT_SETUP, "mmap guest RAM: %s", strerror(errno));
}

static uint64_t ring_bytes(uint32_t num)
{
    return align_up(16ull * num, 4096) + align_up(6 + 2ull * num, 4096) + align_up(6 + 8ull * num, 4096);
}

struct ring {
    uint16_t index, num;
    bool event_idx;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t *used_event, *avail_event;
    uint16_t avail_idx, kicked_idx, last_used;
    int kick_fd, call_fd, err_fd;
    uint64_t kicks, wakeups;
};

static void ring_layout(struct ring *q, struct ram *ram, uint16_t index, uint32_t num, bool event_idx)
{
    *q = (struct ring){ .index = index, .num = (uint16_t)num, .event_idx = event_idx };
    /* Driver-written and device-written parts on their own pages (no false sharing). */
    q->desc = ram_alloc(ram, 16ull * num);
    q->avail = ram_alloc(ram, 6 + 2ull * num);
    q->used = ram_alloc(ram, 6 + 8ull * num);
    q->used_event = &q->avail->ring[num];
    q->avail_event = (uint16_t *)&q->used->ring[num];
    q->kick_fd = eventfd(0, EFD_CLOEXEC);
    q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    q->err_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->kick_fd < 0 || q->call_fd < 0 || q->err_fd < 0)
        die(EXIT_SETUP, "eventfd: %s", strerror(errno));
}

/* log_used_gpa: the used ring's guest-physical address with --log (VHOST_VRING_F_LOG), or 0. */
static void vu_start_ring(struct vu_conn *c, const struct ring *q, uint64_t log_used_gpa)
{
    struct vu_state num = { q->index, q->num }, base = { q->index, 0 }, enable = { q->index, 1 };
    struct vu_addr addr = { .index = q->index, .flags = log_used_gpa ? VRING_F_LOG : 0,
                            .desc = (uint64_t)(uintptr_t)q->desc,
                            .used = (uint64_t)(uintptr_t)q->used,
                            .avail = (uint64_t)(uintptr_t)q->avail, .log = log_used_gpa };
    uint64_t idx = q->index;
    vu_request(c, VU_SET_VRING_NUM, &num, sizeof(num), -1, false);
    vu_request(c, VU_SET_VRING_BASE, &base, sizeof(base), -1, false);
    vu_request(c, VU_SET_VRING_ADDR, &addr, sizeof(addr), -1, false);
    vu_request(c, VU_SET_VRING_CALL, &idx, sizeof(idx), q->call_fd, false);
    vu_request(c, VU_SET_VRING_ERR, &idx, sizeof(idx), q->err_fd, false);
    vu_request(c, VU_SET_VRING_KICK, &idx, sizeof(idx), q->kick_fd, false);
    if (c->features & BIT(F_PROTOCOL_FEATURES))
        vu_request(c, VU_SET_VRING_ENABLE, &enable, sizeof(enable), -1, true);
}

/* Makes the added chains visible and kicks if the device wants a kick. */
static void ring_publish(struct ring *q)
{
    uint16_t old = q->kicked_idx, new = q->avail_idx;
    if (old == new)
        return;
    __atomic_store_n(&q->avail->idx, new, __ATOMIC_RELEASE);
    q->kicked_idx = new;
    /* Store avail->idx, then load the suppression field: a full barrier, or both sides could
     * miss each other's store (see blkfe.c queue_publish). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick = q->event_idx
                    ? vring_need_event(__atomic_load_n(q->avail_event, __ATOMIC_RELAXED), new, old)
                    : !(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        eventfd_write(q->kick_fd, 1);
        q->kicks++;
    }
}

static void ring_add(struct ring *q, uint16_t head)
{
    q->avail->ring[q->avail_idx & (q->num - 1)] = head;   /* ordered by the release store */
    q->avail_idx++;
}

/* Re-posts every chain the device used; returns how many (their used lengths add to *bytes). */
static uint32_t ring_recycle(struct ring *q, uint64_t *bytes)
{
    uint16_t end = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    uint32_t n = 0;
    for (; q->last_used != end; q->last_used++, n++) {
        const struct vring_used_elem *e = &q->used->ring[q->last_used & (q->num - 1)];
        uint32_t id = __atomic_load_n(&e->id, __ATOMIC_RELAXED);
        if (id >= q->num)
            die(EXIT_BACKEND, "device used id %u of a ring of %u", id, q->num);
        *bytes += __atomic_load_n(&e->len, __ATOMIC_RELAXED);
        ring_add(q, (uint16_t)id);
    }
    return n;
}

/* Asks for an interrupt on the next completion; true if none is pending (sleeping is safe). */
static bool ring_arm_interrupt(struct ring *q)
{
    if (q->event_idx)
        __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&q->avail->flags, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) == q->last_used;
}

static void ring_mask_interrupt(struct ring *q)
{
    if (!q->event_idx)
        __atomic_store_n(&q->avail->flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
}

/* Sleeps until the device signals (or `until`); dies if it broke the ring or hung up. */
static void ring_wait(struct ring *q, int sock, uint64_t until)
{
    struct pollfd p[3] = { { .fd = q->call_fd, .events = POLLIN }, { .fd = q->err_fd, .events = POLLIN },
                           { .fd = sock, .events = POLLIN } };
    uint64_t t = now_ns();
    int ms = t >= until ? 0 : (int)((until - t) / 1000000u) + 1;
    if (poll(p, 3, ms) < 0 && errno != EINTR)
        die(EXIT_BACKEND, "poll: %s", strerror(errno));
    if (p[1].revents)
        die(EXIT_BACKEND, "the back-end signalled a broken ring %u", q->index);
    if (p[2].revents)
        die(EXIT_BACKEND, "the back-end closed the connection");
    eventfd_t v;
    if (p[0].revents && eventfd_read(q->call_fd, &v) == 0)
        q->wakeups++;
}

/* --- frames ----------------------------------------------------------------------------- */

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len)
{
    for (size_t i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    return sum;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

/* One GSO frame at buf: header, then Ethernet/IPv4/TCP and `payload` bytes, sequence `seq`.
 * The TCP checksum field holds the pseudo-header sum, as a driver leaves it for NEEDS_CSUM. */
static uint32_t build_frame(uint8_t *buf, uint32_t payload, uint16_t mss, uint32_t seq)
{
    struct virtio_net_hdr_v1 h = { .flags = NET_HDR_F_NEEDS_CSUM, .gso_type = NET_HDR_GSO_TCPV4,
                                   .hdr_len = HDRS_LEN, .gso_size = mss,
                                   .csum_start = ETH_LEN + IP_LEN, .csum_offset = 16 };
    memcpy(buf, &h, sizeof(h));
    uint8_t *eth = buf + sizeof(h), *ip = eth + ETH_LEN, *tcp = ip + IP_LEN;
    static const uint8_t macs[12] = { 2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1 };
    memcpy(eth, macs, sizeof(macs));
    put16(eth + 12, 0x0800);
    uint8_t src[4] = { 10, 99, 0, 2 }, dst[4] = { 10, 99, 0, 3 };
    memset(ip, 0, IP_LEN);
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)(IP_LEN + TCP_LEN + payload));
    put16(ip + 6, 0x4000);                      /* DF, as TCP sets it */
    ip[8] = 64;
    ip[9] = 6;
    memcpy(ip + 12, src, 4);
    memcpy(ip + 16, dst, 4);
    put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, IP_LEN)));
    memset(tcp, 0, TCP_LEN);
    put16(tcp, 40000);
    put16(tcp + 2, 5201);
    put32(tcp + 4, seq);
    put32(tcp + 8, 1);
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;                              /* PSH|ACK */
    put16(tcp + 14, 65535);
    uint32_t pseudo = csum_add(0, src, 4);
    pseudo = csum_add(pseudo, dst, 4) + 6 + TCP_LEN + payload;
    put16(tcp + 16, csum_fold(pseudo));
    for (uint32_t i = 0; i < payload; i++)
        tcp[TCP_LEN + i] = (uint8_t)(seq + i);
    return (uint32_t)sizeof(h) + HDRS_LEN + payload;
}

/* A plain frame of `len` bytes (Ethernet header, zero payload) behind a zeroed header. */
static uint32_t build_plain_frame(uint8_t *buf, uint32_t len)
{
    static const uint8_t macs[12] = { 2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1 };
    memset(buf, 0, sizeof(struct virtio_net_hdr_v1) + len);
    uint8_t *eth = buf + sizeof(struct virtio_net_hdr_v1);
    memcpy(eth, macs, sizeof(macs));
    put16(eth + 12, 0x0800);
    return (uint32_t)sizeof(struct virtio_net_hdr_v1) + len;
}

/* --- options and the run ---------------------------------------------------------------- */

struct options {
    const char *socket;
    double seconds;
    uint32_t mss, segments, ring, buffers;
    uint32_t frame;                 /* --frame: plain frames of this size; 0: GSO frames */
    uint32_t regions;               /* --regions: 0 = one region, as before */
    int cpu;
    bool sync, event_idx, rx, log;
};

static void usage(FILE *f)
{
    fputs("usage: tsofe --socket PATH [options]\n"
          "  --seconds S      run time (default 5)\n"
          "  --mss N          gso_size (default 1448)\n"
          "  --segments N     MSS-sized segments per frame (default 45: 65160 B of payload)\n"
          "  --ring N         TX ring size, a power of two (default 256)\n"
          "  --buffers N      distinct frame buffers, cycled over the ring (default: ring)\n"
          "  --cpu C          pin to CPU C\n"
          "  --no-event-idx   do not negotiate VIRTIO_F_EVENT_IDX\n"
          "  --sync           READY, wait for a stdin line, run; after the JSON line wait for EOF\n"
          "  --frame N        send plain N-byte frames (no GSO, no checksum offload)\n"
          "  --rx             receive instead: keep the RX ring full of 2 KiB buffers\n"
          "  --log            dirty-page logging on, as during a migration (logged_pages)\n"
          "  --regions N      guest RAM as N regions (1..509), frame buffer b in region b %% N;\n"
          "                   ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS, else\n"
          "                   SET_MEM_TABLE (N <= 8)\n", f);
}

static uint64_t parse_u64(const char *name, const char *s, uint64_t min, uint64_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end || *s == '-' || v < min || v > max)
        die(EXIT_SETUP, "--%s: %s is not an integer in %" PRIu64 "..%" PRIu64, name, s, min, max);
    return v;
}

static void parse_options(struct options *o, int argc, char **argv)
{
    static const struct option longopts[] = {
        { "socket", required_argument, NULL, 'S' },  { "seconds", required_argument, NULL, 't' },
        { "mss", required_argument, NULL, 'm' },     { "segments", required_argument, NULL, 'n' },
        { "ring", required_argument, NULL, 'r' },    { "buffers", required_argument, NULL, 'b' },
        { "cpu", required_argument, NULL, 'c' },     { "sync", no_argument, NULL, 'Y' },
        { "no-event-idx", no_argument, NULL, 'E' },  { "help", no_argument, NULL, 'h' },
        { "frame", required_argument, NULL, 'f' },   { "rx", no_argument, NULL, 'R' },
        { "log", no_argument, NULL, 'L' },           { "regions", required_argument, NULL, 'G' },
        { NULL, 0, NULL, 0 },
    };
    *o = (struct options){ .seconds = 5, .mss = 1448, .segments = 45, .ring = 256, .cpu = -1,
                           .event_idx = true };
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'S': o->socket = optarg; break;
        case 't': {
            char *end;
            o->seconds = strtod(optarg, &end);
            if (end == optarg || *end || !(o->seconds > 0 && o->seconds < 1e6))
                die(EXIT_SETUP, "--seconds: %s is not a positive number", optarg);
            break;
        }
        case 'm': o->mss = (uint32_t)parse_u64("mss", optarg, 88, 9000); break;
        case 'n': o->segments = (uint32_t)parse_u64("segments", optarg, 1, 1000); break;
        case 'r': o->ring = (uint32_t)parse_u64("ring", optarg, 2, 32768); break;
        case 'b': o->buffers = (uint32_t)parse_u64("buffers", optarg, 1, 32768); break;
        case 'c': o->cpu = (int)parse_u64("cpu", optarg, 0, CPU_SETSIZE - 1); break;
        case 'Y': o->sync = true; break;
        case 'E': o->event_idx = false; break;
        case 'f': o->frame = (uint32_t)parse_u64("frame", optarg, ETH_LEN, 1514); break;
        case 'R': o->rx = true; break;
        case 'L': o->log = true; break;
        case 'G': o->regions = (uint32_t)parse_u64("regions", optarg, 1, MAX_REGIONS); break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(EXIT_SETUP);
        }
    }
    if (optind != argc || !o->socket) {
        usage(stderr);
        exit(EXIT_SETUP);
    }
    if (o->ring & (o->ring - 1))
        die(EXIT_SETUP, "--ring: %u is not a power of two", o->ring);
    if (o->buffers == 0 || o->buffers > o->ring)
        o->buffers = o->ring;
    if (IP_LEN + TCP_LEN + (uint64_t)o->mss * o->segments > 65535)
        die(EXIT_SETUP, "--mss x --segments: an IPv4 packet holds at most %u bytes of payload",
            65535 - IP_LEN - TCP_LEN);
}

struct run {
    struct options opt;
    struct vu_conn conn;
    struct ram ram;
    struct ring rx, tx;
    uint32_t payload, frame_len;
    struct vu_log log;              /* --log */
    uint32_t nregions;              /* region 0 is `ram` */
    struct region *reg;
    uint64_t gpa_end, max_mem_slots;
    const char *mem_setup;
};

/* The memory table: one ADD_MEM_REG per region (CONFIGURE_MEM_SLOTS, as QEMU then sends it)
 * or one SET_MEM_TABLE (at most 8 regions). */
struct vu_region_desc {
    uint64_t gpa, size, uva, mmap_offset;
};

static void send_memory(struct run *r)
{
    struct vu_conn *c = &r->conn;
    struct vu_region_desc d[MAX_REGIONS];
    int fds[MAX_REGIONS];
    for (uint32_t k = 0; k < r->nregions; k++) {
        d[k] = (struct vu_region_desc){ r->reg[k].gpa, r->reg[k].size, (uint64_t)(uintptr_t)r->reg[k].base, 0 };
        fds[k] = r->reg[k].fd;
    }
    if (c->protocol & BIT(PF_CONFIGURE_MEM_SLOTS)) {
        for (uint32_t k = 0; k < r->nregions; k++) {
            struct { uint64_t padding; struct vu_region_desc region; } m = { 0, d[k] };
            vu_request(c, VU_ADD_MEM_REG, &m, sizeof(m), fds[k], true);
        }
        r->mem_setup = "add_mem_reg";
        return;
    }
    if (r->nregions > VU_MAX_FDS)
        die(EXIT_SETUP, "--regions %u: the back-end does not offer VHOST_USER_PROTOCOL_F_"
            "CONFIGURE_MEM_SLOTS, and SET_MEM_TABLE carries at most %d regions", r->nregions, VU_MAX_FDS);
    struct { uint32_t nregions, padding; struct vu_region_desc region[VU_MAX_FDS]; } m = { r->nregions, 0, { { 0, 0, 0, 0 } } };
    memcpy(m.region, d, sizeof(d[0]) * r->nregions);
    bool ack = c->protocol & BIT(PF_REPLY_ACK);
    vu_send(c, VU_SET_MEM_TABLE, ack, &m, (uint32_t)(8 + sizeof(d[0]) * r->nregions), fds, (int)r->nregions);
    if (ack && vu_recv_u64(c, VU_SET_MEM_TABLE) != 0)
        die(EXIT_BACKEND, "back-end refused SET_MEM_TABLE");
    r->mem_setup = "set_mem_table";
}

/* Every TX descriptor points at one of the frame buffers; all are posted at once. */
static void setup(struct run *r)
{
    const struct options *o = &r->opt;
    vu_connect(&r->conn, o->socket);
    vu_negotiate(&r->conn, o->event_idx, o->log, o->regions > 0);
    bool event_idx = r->conn.features & BIT(F_RING_EVENT_IDX);
    r->payload = o->rx ? 0 : o->frame ? o->frame : o->mss * o->segments;
    uint64_t buf_size = o->rx ? RX_BUF
                              : align_up(sizeof(struct virtio_net_hdr_v1) + HDRS_LEN + r->payload, o->frame ? 64 : 4096);
    uint32_t N = o->regions ? o->regions : 1;
    if (r->conn.protocol & BIT(PF_CONFIGURE_MEM_SLOTS)) {
        r->max_mem_slots = vu_get_u64(&r->conn, VU_GET_MAX_MEM_SLOTS);
        if (N > r->max_mem_slots)
            die(EXIT_SETUP, "--regions %u: the back-end has %" PRIu64 " memory slots", N, r->max_mem_slots);
    }
    /* Buffer b in region b % N: region k holds ceil((buffers - k) / N) of them. */
    uint64_t per0 = (o->buffers + N - 1) / N;
    ram_create(&r->ram, 2 * ring_bytes(o->ring) + per0 * buf_size + 4096);
    ring_layout(&r->rx, &r->ram, RX_RING, o->ring, event_idx);
    ring_layout(&r->tx, &r->ram, TX_RING, o->ring, event_idx);
    r->nregions = N;
    r->reg = calloc(N, sizeof(*r->reg));
    uint8_t **bufp = calloc(o->buffers, sizeof(*bufp));
    uint64_t *bufg = calloc(o->buffers, sizeof(*bufg));
    if (!r->reg || !bufp || !bufg)
        die(EXIT_SETUP, "out of memory");
    r->reg[0] = (struct region){ r->ram.fd, r->ram.base, GPA_BASE, r->ram.size };
    uint8_t *bufs0 = ram_alloc(&r->ram, per0 * buf_size);
    for (uint32_t k = 1; k < N; k++) {
        uint64_t count = (o->buffers - k + N - 1) / N;
        const struct region *prev = &r->reg[k - 1];
        region_create(&r->reg[k], align_up(prev->gpa + prev->size + REGION_GAP, 2u << 20),
                      count ? count * buf_size : 4096);
    }
    for (uint32_t b = 0; b < o->buffers; b++) {
        uint32_t k = b % N;
        uint8_t *p = k == 0 ? bufs0 + (uint64_t)(b / N) * buf_size : r->reg[k].base + (uint64_t)(b / N) * buf_size;
        bufp[b] = p;
        bufg[b] = k == 0 ? ram_gpa(&r->ram, p) : r->reg[k].gpa + (uint64_t)(b / N) * buf_size;
    }
    r->gpa_end = r->reg[N - 1].gpa + r->reg[N - 1].size;
    if (o->rx) {
        /* Device-writable buffers, one per descriptor (the RX ring); the TX ring stays empty. */
        for (uint32_t i = 0; i < o->ring; i++) {
            r->rx.desc[i] = (struct vring_desc){ bufg[i % o->buffers], RX_BUF, VRING_DESC_F_WRITE, 0 };
            ring_add(&r->rx, (uint16_t)i);
        }
    } else {
        for (uint32_t b = 0; b < o->buffers; b++)
            r->frame_len = o->frame ? build_plain_frame(bufp[b], o->frame)
                                    : build_frame(bufp[b], r->payload, (uint16_t)o->mss, b * r->payload);
        for (uint32_t i = 0; i < o->ring; i++) {
            r->tx.desc[i] = (struct vring_desc){ bufg[i % o->buffers], r->frame_len, 0, 0 };
            ring_add(&r->tx, (uint16_t)i);
        }
    }
    free(bufp);
    free(bufg);
    send_memory(r);
    if (o->log) {
        /* Over every region and the holes between them. */
        vu_log_create(&r->log, GPA_BASE, r->gpa_end - GPA_BASE);
        vu_log_set_base(&r->conn, &r->log);
    }
    vu_start_ring(&r->conn, &r->rx, o->log ? ram_gpa(&r->ram, r->rx.used) : 0);
    vu_start_ring(&r->conn, &r->tx, o->log ? ram_gpa(&r->ram, r->tx.used) : 0);
    if (!(r->conn.protocol & BIT(PF_REPLY_ACK)))
        vu_get_u64(&r->conn, VU_GET_FEATURES);   /* any reply: the setup before it was served */
}

/* Keeps the TX ring (--rx: the RX ring) full until the deadline; returns the frames the
 * device used, and their used lengths in *bytes. */
static uint64_t send_loop(struct run *r, uint64_t deadline, uint64_t *bytes)
{
    struct ring *q = r->opt.rx ? &r->rx : &r->tx;
    uint64_t frames = 0;
    ring_publish(q);
    while (now_ns() < deadline) {
        uint32_t n = ring_recycle(q, bytes);
        if (n == 0) {
            if (ring_arm_interrupt(q))
                ring_wait(q, r->conn.sock, deadline);
            ring_mask_interrupt(q);
            continue;
        }
        frames += n;
        ring_publish(q);
    }
    return frames;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        die(EXIT_SETUP, "pinning to CPU %d: %s", cpu, strerror(errno));
}

static bool wait_stdin_line(void)
{
    char line[64];
    return fgets(line, sizeof(line), stdin) != NULL;
}

int main(int argc, char **argv)
{
    static struct run r;
    parse_options(&r.opt, argc, argv);
    pin(r.opt.cpu);
    setup(&r);
    if (r.opt.sync) {
        puts("READY");
        fflush(stdout);
        if (!wait_stdin_line())
            die(EXIT_SETUP, "--sync: stdin closed before the go line");
    }
    if (r.opt.log)
        vu_log_start(&r.log);
    uint64_t t0 = now_ns(), used_bytes = 0;
    uint64_t frames = send_loop(&r, t0 + (uint64_t)(r.opt.seconds * 1e9), &used_bytes);
    double secs = (double)(now_ns() - t0) / 1e9, n = frames ? (double)frames : 1;
    if (r.opt.log)
        vu_log_stop(&r.log);
    const struct ring *q = r.opt.rx ? &r.rx : &r.tx;
    /* RX: the bytes the device wrote, virtio-net header included. */
    uint64_t payload = r.opt.rx ? used_bytes : frames * r.payload;
    uint32_t frame_len = r.opt.rx ? 0 : r.frame_len - (uint32_t)sizeof(struct virtio_net_hdr_v1);
    printf("{\"mode\": \"%s\", \"frames\": %" PRIu64 ", \"payload_bytes\": %" PRIu64
           ", \"frame_len\": %u, \"mss\": %u, \"segments\": %u, \"ring\": %u, \"buffers\": %u, "
           "\"event_idx\": %s, \"seconds\": %.4f, \"mpps\": %.4f, \"gbps\": %.3f, "
           "\"kicks_per_frame\": %.4f, \"wakeups_per_frame\": %.4f",
           r.opt.rx ? "rx" : r.opt.frame ? "tx-plain" : "tx-gso", frames, payload, frame_len,
           r.opt.mss, r.opt.segments, r.opt.ring, r.opt.buffers, q->event_idx ? "true" : "false",
           secs, (double)frames / secs / 1e6, (double)payload * 8 / secs / 1e9,
           (double)q->kicks / n, (double)q->wakeups / n);
    if (r.opt.log)
        vu_log_print_json(&r.log);
    if (r.opt.regions)
        printf(", \"regions\": %u, \"mem_setup\": \"%s\", \"max_mem_slots\": %" PRIu64,
               r.nregions, r.mem_setup, r.max_mem_slots);
    printf("}\n");
    fflush(stdout);
    if (r.opt.sync)
        while (wait_stdin_line())
            ;
    close(r.conn.sock);
    return 0;
}
