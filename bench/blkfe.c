/* blkfe: a small, fast vhost-user-blk front-end (the driver side), without a VM.
 *
 * It plays a guest's virtio-blk driver against any vhost-user-blk back-end (vhostd,
 * qemu-storage-daemon): it connects to the back-end's socket, negotiates, lays split rings
 * out in guest RAM it shares through a memfd, and keeps QD requests in flight on each of Q
 * queues, one thread per queue.  Completions are interrupt-driven like a guest's: a thread
 * sleeps on its queue's call eventfd, reaps what the device used, resubmits at once and kicks
 * once per batch, honouring the device's kick suppression (VRING_USED_F_NO_NOTIFY or, with
 * EVENT_IDX, avail_event) and suppressing interrupts it does not need (used_event /
 * VRING_AVAIL_F_NO_INTERRUPT).
 *
 *   blkfe --socket PATH [--rw randread|randwrite|seqread|seqwrite] [--bs BYTES] [--qd N]
 *         [--queues N] [--seconds S] [--cpus LIST] [--offset-mib M] [--size-mib M] [--sync]
 *   blkfe --socket PATH --verify|--check [--queues N] [--bs BYTES] [--size-mib M] [--seed N]
 *   (either with --log: dirty-page logging on, as while QEMU migrates the guest)
 *
 * A run prints one JSON line (iops, mib_s, p50_us, p99_us, requests, seconds, ...).
 * --verify writes a pattern that names each sector through queue i, flushes, reads it back
 * through queue (i+1) % Q and compares; the exit status is 0 only if every byte matched.
 * --check only reads and compares: the data an earlier --verify with the same seed left.
 * --sync is for a caller that samples the back-end's CPU time around the measured window
 * alone: after setup blkfe prints "READY" and waits for a line on stdin; after the run it
 * prints the JSON line and waits for stdin to close before it disconnects.
 *
 * --log negotiates VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD (exit 2 if the back-end
 * does not offer them), shares a memfd bitmap over its guest RAM (SET_LOG_BASE, whose u64
 * reply is read), sets VHOST_VRING_F_LOG with the used ring's guest-physical address, and a
 * thread takes the bitmap every 100 ms as QEMU's migration sync does (atomic exchange with 0,
 * counted in the JSON as logged_pages, summed over syncs).
 *
 * --regions N splits guest RAM into N memfd regions of equal size (guest-physical ranges with
 * 2 MiB holes between them) and places the rings' parts and every request's header, data and
 * status round-robin over them, so each translation must find its region among N.  With
 * CONFIGURE_MEM_SLOTS they go as QEMU sends them (GET_MAX_MEM_SLOTS, then one ADD_MEM_REG per
 * region, acknowledged); without it (or with --set-mem-table) as one SET_MEM_TABLE (N <= 8).
 * --add-regions-every MS adds regions (ADD_MEM_REG, fresh memfds) and removes them
 * (REM_MEM_REG) from a thread while the queues run, and reports the latency of the requests
 * in flight during each kind of change (add_p99_us, rem_p99_us, ...) and of the rest (quiet_*).
 *
 * Exit status: 0 ok, 1 data mismatch or I/O error status, 2 usage or setup failure,
 * 3 the back-end stopped answering or signalled a broken ring.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -pthread blkfe.c -o blkfe
 * Layouts and numbers: virtio 1.2 (2.7 split virtqueues, 5.2 block device) and QEMU's
 * docs/interop/vhost-user.rst.  x86-64 (little-endian) hosts only, like the back-ends. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
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

#define PROG "blkfe"
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
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24,
    VU_GET_MAX_MEM_SLOTS = 36,
    VU_ADD_MEM_REG = 37,
    VU_REM_MEM_REG = 38,
};


#define F_BLK_FLUSH 9
#define F_BLK_MQ 12
#define PF_MQ 0
#define PF_CONFIG 9
#define PF_CONFIGURE_MEM_SLOTS 15
#define BIT(n) (1ull << (n))

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_DISCARD 11u
#define BLK_T_WRITE_ZEROES 13u
#define BLK_T_FLUSH 4u
#define BLK_S_OK 0
#define SECTOR 512u
/* struct virtio_blk_config up to num_queues: every back-end since QEMU 5.x answers this much. */
#define BLK_CONFIG_SIZE 60u

/* --- small helpers ---------------------------------------------------------------------- */

#define EXIT_MISMATCH 1

static uint32_t pow2_ceil(uint32_t x)
{
    uint32_t p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

/* Guest-shared 16-bit fields are written concurrently by the other side: every access is one
 * untorn access.  Ordering comes from the explicit acquire/release/fences at the call sites. */
static uint16_t load16(const uint16_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void store16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* virtio 1.2, 2.7.10.2: notify iff new_idx passed event_idx since old_idx. */
/* xorshift64*: cheap, good enough to spread offsets; one per queue thread. */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

/* --- latency histogram: log-linear, 32 sub-buckets per power of two (< 3.2% error) ------- */

#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

struct hist {
    uint64_t count[HIST_BUCKETS];
    uint64_t n, sum, max;
};

static unsigned hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);            /* >= HIST_SUB_BITS */
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

/* Midpoint of bucket i's value range. */
static double hist_value(unsigned i)
{
    if (i < HIST_SUB)
        return i;
    unsigned e = i / HIST_SUB + HIST_SUB_BITS - 1, sub = i % HIST_SUB;
    double lo = (double)((uint64_t)(HIST_SUB + sub) << (e - HIST_SUB_BITS));
    return lo + (double)(1ull << (e - HIST_SUB_BITS)) / 2;
}

static void hist_add(struct hist *h, uint64_t v)
{
    h->count[hist_index(v)]++;
    h->n++;
    h->sum += v;
    if (v > h->max)
        h->max = v;
}

static void hist_merge(struct hist *into, const struct hist *h)
{
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        into->count[i] += h->count[i];
    into->n += h->n;
    into->sum += h->sum;
    if (h->max > into->max)
        into->max = h->max;
}

static double hist_percentile(const struct hist *h, double p)
{
    if (h->n == 0)
        return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)h->n);
    if (rank >= h->n)
        rank = h->n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->count[i];
        if (seen > rank)
            return hist_value(i);
    }
    return (double)h->max;
}

/* --- vhost-user connection -------------------------------------------------------------- */

struct vu_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
    uint8_t data[BLK_CONFIG_SIZE];
};

/* The reply to req; returns its payload size (at most cap bytes are kept). */
static uint32_t vu_recv_reply(struct vu_conn *c, uint32_t req, void *payload, uint32_t cap)
{
    struct vu_hdr h;
    recv_exact(c->sock, &h, sizeof(h));
    if (h.request != req || !(h.flags & VU_FLAG_REPLY))
        die(EXIT_BACKEND, "expected a reply to request %u, got request %u flags %#x", req,
            h.request, h.flags);
    char sink[512];
    if (h.size > sizeof(sink))
        die(EXIT_BACKEND, "reply to request %u too large (%u bytes)", req, h.size);
    recv_exact(c->sock, sink, h.size);
    memcpy(payload, sink, h.size < cap ? h.size : cap);
    return h.size;
}

static uint64_t vu_get_u64(struct vu_conn *c, uint32_t req)
{
    uint64_t v = 0;
    vu_send(c, req, false, NULL, 0, NULL, 0);
    if (vu_recv_reply(c, req, &v, sizeof(v)) != sizeof(v))
        die(EXIT_BACKEND, "reply to request %u is not a u64", req);
    return v;
}

/* A request without a reply of its own.  With REPLY_ACK and `ack` the back-end confirms it
 * (and, since it serves requests in order, everything sent before it). */
static void vu_request(struct vu_conn *c, uint32_t req, const void *payload, uint32_t size,
                       const int *fds, int nfds, bool ack)
{
    ack = ack && (c->protocol & BIT(PF_REPLY_ACK));
    vu_send(c, req, ack, payload, size, fds, nfds);
    if (!ack)
        return;
    uint64_t status = 1;
    vu_recv_reply(c, req, &status, sizeof(status));
    if (status != 0)
        die(EXIT_BACKEND, "back-end refused request %u (status %" PRIu64 ")", req, status);
}

/* GET/SET_FEATURES, protocol features and ownership, in QEMU's order.  Returns the offered
 * virtio features.  The features themselves are acked later (SET_FEATURES) by the caller.
 * `log`: dirty-page logging as during a migration, which needs LOG_ALL and LOG_SHMFD. */
static uint64_t vu_negotiate(struct vu_conn *c, uint32_t queues, bool log, bool mem_slots)
{
    uint64_t offered = vu_get_u64(c, VU_GET_FEATURES);
    if (!(offered & BIT(F_VERSION_1)))
        die(EXIT_SETUP, "back-end does not offer VIRTIO_F_VERSION_1 (features %#" PRIx64 ")", offered);
    if (log && !(offered & BIT(F_LOG_ALL)))
        die(EXIT_SETUP, "--log: back-end does not offer VHOST_F_LOG_ALL (features %#" PRIx64 ")",
            offered);
    if (offered & BIT(F_PROTOCOL_FEATURES)) {
        uint64_t want = BIT(PF_MQ) | BIT(PF_REPLY_ACK) | BIT(PF_CONFIG) | (log ? BIT(PF_LOG_SHMFD) : 0) |
                        (mem_slots ? BIT(PF_CONFIGURE_MEM_SLOTS) : 0);
        uint64_t pf = vu_get_u64(c, VU_GET_PROTOCOL_FEATURES);
        if (log && !(pf & BIT(PF_LOG_SHMFD)))
            die(EXIT_SETUP, "--log: back-end does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD "
                "(protocol features %#" PRIx64 ")", pf);
        c->protocol = pf & want;
        vu_request(c, VU_SET_PROTOCOL_FEATURES, &c->protocol, sizeof(c->protocol), NULL, 0, false);
    } else if (log) {
        die(EXIT_SETUP, "--log: back-end offers no protocol features (LOG_SHMFD needs them)");
    }
    if (queues > 1) {
        uint64_t n = c->protocol & BIT(PF_MQ) ? vu_get_u64(c, VU_GET_QUEUE_NUM) : 1;
        if (n < queues || !(offered & BIT(F_BLK_MQ)))
            die(EXIT_SETUP, "back-end serves %" PRIu64 " queue(s), %u asked", n, queues);
    }
    vu_request(c, VU_SET_OWNER, NULL, 0, NULL, 0, false);
    return offered;
}

static uint64_t vu_capacity_sectors(struct vu_conn *c)
{
    if (!(c->protocol & BIT(PF_CONFIG)))
        die(EXIT_SETUP, "back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG: no capacity");
    struct vu_config cfg = { 0, BLK_CONFIG_SIZE, 0, { 0 } };
    vu_send(c, VU_GET_CONFIG, false, &cfg, sizeof(cfg), NULL, 0);
    uint32_t n = vu_recv_reply(c, VU_GET_CONFIG, &cfg, sizeof(cfg));
    if (n != sizeof(cfg) || cfg.size != BLK_CONFIG_SIZE)
        die(EXIT_BACKEND, "GET_CONFIG failed (reply of %u bytes)", n);
    uint64_t capacity;
    memcpy(&capacity, cfg.data, sizeof(capacity));   /* virtio_blk_config.capacity */
    return capacity;
}

/* --- guest RAM ------------------------------------------------------------------------- */

/* Guest "physical" addresses start here, as on a PC; the rings are passed by our own
 * (front-end) virtual addresses, as QEMU passes its own. */
#define GPA_BASE 0x100000ull
/* --regions: a hole between two regions' guest-physical ranges, so an address that a
 * back-end resolves in the wrong region lands in no region at all. */
#define REGION_GAP (2ull << 20)
#define MAX_REGIONS 509       /* vhost-user's largest GET_MAX_MEM_SLOTS (QEMU's ACPI slots) */

struct ram_region {
    int fd;
    uint8_t *base;
    uint64_t gpa, size, used;
};

/* Guest RAM.  By default one memfd, one region, allocated in order.  With --regions N: N
 * memfds of equal size, each its own region (mmap_offset 0, as QEMU's memfd DIMMs), and
 * every allocation goes to the next region in turn (round-robin), so a request's header,
 * data and status, and consecutive requests, sit in different regions. */
struct ram {
    uint32_t n;
    bool spread;              /* --regions: round-robin over the regions */
    bool dry;                 /* planning: only count what each region needs */
    uint32_t next;            /* round-robin cursor */
    struct ram_region *reg;
    uint64_t size;            /* all regions, bytes */
    uint64_t gpa_end;         /* end of the last region's guest-physical range */
};

static void ram_init(struct ram *r, uint32_t n, bool spread, bool dry)
{
    *r = (struct ram){ .n = n, .spread = spread, .dry = dry, .reg = calloc(n, sizeof(*r->reg)) };
    if (!r->reg)
        die(EXIT_SETUP, "out of memory");
}

/* The largest amount any region was asked for (after a dry run). */
static uint64_t ram_max_used(const struct ram *r)
{
    uint64_t m = 0;
    for (uint32_t k = 0; k < r->n; k++)
        m = r->reg[k].used > m ? r->reg[k].used : m;
    return m;
}

/* Creates every region, `region_size` bytes each (a multiple of 4 KiB), populated. */
static void ram_create(struct ram *r, uint64_t region_size)
{
    uint64_t stride = r->spread ? align_up(region_size, 1u << 20) + REGION_GAP : region_size;
    r->size = 0;
    for (uint32_t k = 0; k < r->n; k++) {
        struct ram_region *g = &r->reg[k];
        *g = (struct ram_region){ .gpa = GPA_BASE + k * stride, .size = region_size };
        g->fd = memfd_create("blkfe-guest-ram", MFD_CLOEXEC);
        if (g->fd < 0 || ftruncate(g->fd, (off_t)region_size) < 0)
            die(EXIT_SETUP, "memfd of %" PRIu64 " bytes: %s", region_size, strerror(errno));
        g->base = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, g->fd, 0);
        if (g->base == MAP_FAILED)
            die(EXIT_SETUP, "mmap guest RAM: %s", strerror(errno));
        r->size += region_size;
        r->gpa_end = g->gpa + region_size;
    }
}

/* `size` bytes aligned to `align` in the next region; its guest-physical address in *gpa.
 * A dry run returns NULL and only counts. */
static void *ram_alloc(struct ram *r, uint64_t size, uint64_t align, uint64_t *gpa)
{
    struct ram_region *g = &r->reg[r->spread ? r->next++ % r->n : 0];
    uint64_t off = align_up(g->used, align);
    if (!r->dry && off + size > g->size)
        die(EXIT_SETUP, "guest RAM too small (%" PRIu64 " MiB in %u region(s)): raise --ram-mib",
            r->size >> 20, r->n);
    g->used = off + size;
    *gpa = g->gpa + off;
    return r->dry ? NULL : g->base + off;
}

/* The memory table, as QEMU sends it: one SET_MEM_TABLE (at most 8 regions), or with
 * CONFIGURE_MEM_SLOTS one ADD_MEM_REG per region (each acknowledged with REPLY_ACK). */
struct vu_mem_table {
    uint32_t nregions;
    uint32_t padding;
    struct vu_mem_region {
        uint64_t gpa;
        uint64_t size;
        uint64_t uva;
        uint64_t mmap_offset;
    } region[VU_MAX_FDS];
};

struct vu_mem_reg {
    uint64_t padding;
    struct vu_mem_region region;
};

static struct vu_mem_region mem_region(const struct ram_region *g)
{
    return (struct vu_mem_region){ g->gpa, g->size, (uint64_t)(uintptr_t)g->base, 0 };
}

static void vu_set_mem_table(struct vu_conn *c, const struct ram *r)
{
    struct vu_mem_table m = { .nregions = r->n };
    int fds[VU_MAX_FDS];
    if (r->n > VU_MAX_FDS)
        die(EXIT_SETUP, "SET_MEM_TABLE carries at most %d regions, not %u", VU_MAX_FDS, r->n);
    for (uint32_t k = 0; k < r->n; k++) {
        m.region[k] = mem_region(&r->reg[k]);
        fds[k] = r->reg[k].fd;
    }
    uint32_t size = (uint32_t)(8 + sizeof(m.region[0]) * r->n);
    vu_request(c, VU_SET_MEM_TABLE, &m, size, fds, (int)r->n, true);
}

/* --- split virtqueue, driver side -------------------------------------------------------- */

struct blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

/* Each request slot owns a fixed three-descriptor chain: header, data, status. */
#define DESCS_PER_REQ 3

/* --add-regions-every: seqlock-like change counters, odd while an ADD_MEM_REG (add_seq) or
 * REM_MEM_REG (rem_seq) window is open, so that a request can tell whether it was in flight
 * during one.  Written by the region thread only. */
static bool track_changes;
static uint64_t add_seq, rem_seq;

struct slot {
    uint64_t t_submit;
    uint64_t sector;
    uint64_t add_seq, rem_seq;   /* --add-regions-every: the change counters at submission */
    uint32_t type;
    bool busy;
};

/* Where a slot's header, data and status live (in one region, or three with --regions). */
struct slot_mem {
    struct blk_outhdr *hdr;   /* the driver writes it */
    uint8_t *data;            /* bs bytes */
    uint8_t *status;          /* the device writes it (never on a line the driver writes) */
    uint64_t hdr_gpa, data_gpa, status_gpa;
};

/* What a queue's thread does in one phase. */
struct job {
    uint32_t type;            /* BLK_T_IN, BLK_T_OUT or BLK_T_FLUSH */
    bool random;
    bool fill_pattern;        /* writes: the verify pattern of each sector */
    bool check_pattern;       /* reads: compare with it */
    uint64_t first, count;    /* blocks of bs: the range this queue covers */
    uint64_t issued;          /* untimed jobs end after `count` requests */
    uint64_t deadline;        /* timed jobs (ns, CLOCK_MONOTONIC); 0: untimed */
};

struct queue {
    /* The ring, in guest RAM. */
    uint16_t index, num;
    bool event_idx;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t *used_event;     /* &avail->ring[num] */
    uint16_t *avail_event;    /* &used->ring[num] */
    uint16_t avail_idx;       /* next avail slot; published to avail->idx per batch */
    uint16_t kicked_idx;      /* avail->idx at the last kick decision */
    uint16_t last_used;       /* next used entry to reap */
    int kick_fd, call_fd, err_fd;
    /* Requests. */
    uint32_t qd, bs;
    struct slot *slots;
    uint32_t *free_slots, nfree;
    struct slot_mem *mem;     /* per slot */
    uint64_t used_gpa;        /* for VHOST_VRING_F_LOG */
    /* Workload. */
    struct job job;
    uint64_t rng;
    uint64_t seed;
    int cpu;
    pthread_t thread;
    /* Results. */
    struct hist lat;
    /* --add-regions-every: requests in flight during an ADD_MEM_REG / REM_MEM_REG window,
     * and those that overlapped none. */
    struct hist lat_add, lat_rem, lat_quiet;
    uint64_t completed;       /* read by the watchdog (relaxed atomics) */
    uint64_t errors, mismatches, kicks, wakeups, t_start, t_end;
};

static struct vring_desc *slot_chain(struct queue *q, uint32_t s)
{
    return &q->desc[s * DESCS_PER_REQ];
}

static uint8_t *slot_data(struct queue *q, uint32_t s)
{
    return q->mem[s].data;
}

/* The queue's guest memory: the ring's three parts, then the slots' headers, status bytes
 * and data, either as three arrays (one region, the layout of old) or, with --regions,
 * each item in the next region in turn.  A dry run (ram->dry) only counts. */
static void queue_alloc(struct queue *q, struct ram *ram, uint32_t num, uint32_t qd, uint32_t bs)
{
    uint64_t desc_gpa, avail_gpa;
    /* Each part on its own pages: the driver writes desc/avail, the device writes used;
     * sharing a cache line would bounce it between the two CPUs for nothing. */
    q->desc = ram_alloc(ram, 16ull * num, 4096, &desc_gpa);
    q->avail = ram_alloc(ram, 6 + 2ull * num, 4096, &avail_gpa);
    q->used = ram_alloc(ram, 6 + 8ull * num, 4096, &q->used_gpa);
    q->mem = calloc(qd, sizeof(*q->mem));
    if (!q->mem)
        die(EXIT_SETUP, "out of memory");
    if (!ram->spread) {
        uint64_t hg, sg, dg;
        struct blk_outhdr *h = ram_alloc(ram, sizeof(*h) * qd, 4096, &hg);
        uint8_t *st = ram_alloc(ram, qd, 4096, &sg);
        uint8_t *d = ram_alloc(ram, (uint64_t)qd * bs, 4096, &dg);
        if (ram->dry)
            return;
        for (uint32_t s = 0; s < qd; s++)
            q->mem[s] = (struct slot_mem){ h + s, d + (uint64_t)s * bs, st + s,
                                           hg + s * sizeof(*h), dg + (uint64_t)s * bs, sg + s };
        return;
    }
    /* A cache line each for headers and status bytes, so that the device's status writes
     * never share a line with the driver's header writes, whatever the region count. */
    for (uint32_t s = 0; s < qd; s++) {
        struct slot_mem *m = &q->mem[s];
        m->hdr = ram_alloc(ram, sizeof(*m->hdr), 64, &m->hdr_gpa);
        m->data = ram_alloc(ram, bs, 4096, &m->data_gpa);
        m->status = ram_alloc(ram, 1, 64, &m->status_gpa);
    }
}

static void queue_layout(struct queue *q, struct ram *ram, uint16_t index, uint32_t num,
                         uint32_t qd, uint32_t bs, bool event_idx)
{
    q->index = index;
    q->num = (uint16_t)num;
    q->event_idx = event_idx;
    queue_alloc(q, ram, num, qd, bs);
    q->used_event = &q->avail->ring[num];
    q->avail_event = (uint16_t *)&q->used->ring[num];
    q->qd = qd;
    q->bs = bs;
    q->slots = calloc(qd, sizeof(*q->slots));
    q->free_slots = calloc(qd, sizeof(*q->free_slots));
    if (!q->slots || !q->free_slots)
        die(EXIT_SETUP, "out of memory");
    /* Hand out slots low first (LIFO below): a small QD touches few data pages. */
    for (uint32_t s = 0; s < qd; s++)
        q->free_slots[s] = qd - 1 - s;
    q->nfree = qd;
    q->kick_fd = eventfd(0, EFD_CLOEXEC);
    q->call_fd = eventfd(0, EFD_CLOEXEC);
    q->err_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->kick_fd < 0 || q->call_fd < 0 || q->err_fd < 0)
        die(EXIT_SETUP, "eventfd: %s", strerror(errno));
}

/* The usual QEMU sequence for one ring; the kick fd last, as it starts the ring.  `log`:
 * the device logs its used ring writes at the used ring's guest-physical address. */
static void vu_start_queue(struct vu_conn *c, const struct queue *q, bool log)
{
    struct vu_state num = { q->index, q->num }, base = { q->index, 0 }, enable = { q->index, 1 };
    struct vu_addr addr = {
        .index = q->index,
        .flags = log ? VRING_F_LOG : 0,
        .desc = (uint64_t)(uintptr_t)q->desc,
        .used = (uint64_t)(uintptr_t)q->used,
        .avail = (uint64_t)(uintptr_t)q->avail,
        .log = log ? q->used_gpa : 0,
    };
    uint64_t idx = q->index;
    vu_request(c, VU_SET_VRING_NUM, &num, sizeof(num), NULL, 0, false);
    vu_request(c, VU_SET_VRING_BASE, &base, sizeof(base), NULL, 0, false);
    vu_request(c, VU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0, false);
    vu_request(c, VU_SET_VRING_CALL, &idx, sizeof(idx), &q->call_fd, 1, false);
    vu_request(c, VU_SET_VRING_ERR, &idx, sizeof(idx), &q->err_fd, 1, false);
    vu_request(c, VU_SET_VRING_KICK, &idx, sizeof(idx), &q->kick_fd, 1, false);
    if (c->features & BIT(F_PROTOCOL_FEATURES))
        vu_request(c, VU_SET_VRING_ENABLE, &enable, sizeof(enable), NULL, 0, true);
}

/* The verify pattern: every 8-byte word names its sector, its place and the seed, so a
 * sector read from the wrong offset, a stale one or a torn one all show. */
static uint64_t pattern_word(uint64_t seed, uint64_t sector, unsigned word)
{
    return (sector << 8 | word) ^ (seed * 0x9E3779B97F4A7C15ull);
}

static void fill_pattern(uint8_t *buf, uint32_t len, uint64_t sector, uint64_t seed)
{
    for (uint32_t off = 0; off < len; off += SECTOR, sector++)
        for (unsigned w = 0; w < SECTOR / 8; w++) {
            uint64_t v = pattern_word(seed, sector, w);
            memcpy(buf + off + 8 * w, &v, 8);
        }
}

/* Returns the number of mismatching sectors; reports the first one if `report`. */
static uint64_t check_pattern(const uint8_t *buf, uint32_t len, uint64_t sector, uint64_t seed,
                              unsigned queue, bool report)
{
    uint64_t bad = 0;
    for (uint32_t off = 0; off < len; off += SECTOR, sector++)
        for (unsigned w = 0; w < SECTOR / 8; w++) {
            uint64_t v, want = pattern_word(seed, sector, w);
            memcpy(&v, buf + off + 8 * w, 8);
            if (v == want)
                continue;
            if (report && bad == 0)
                fprintf(stderr, "blkfe: queue %u: sector %" PRIu64 " word %u: got %#" PRIx64
                        ", expected %#" PRIx64 "\n", queue, sector, w, v, want);
            bad++;
            break;
        }
    return bad;
}

/* Puts a request in slot s on the ring.  Not visible to the device until queue_publish(). */
static void queue_add(struct queue *q, uint32_t s, uint32_t type, uint64_t sector, uint64_t now)
{
    struct vring_desc *d = slot_chain(q, s);
    uint16_t head = (uint16_t)(s * DESCS_PER_REQ);
    const struct slot_mem *m = &q->mem[s];
    struct blk_outhdr *h = m->hdr;
    h->type = type;
    h->ioprio = 0;
    h->sector = sector;
    /* Not a valid status: a completion that never wrote one is caught. */
    *m->status = 0xff;
    d[0] = (struct vring_desc){ m->hdr_gpa, sizeof(*h), VRING_DESC_F_NEXT,
                                (uint16_t)(head + (type == BLK_T_FLUSH ? 2 : 1)) };
    if (type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES) {
        /* One segment of bs bytes (virtio 1.2 5.2.6: sector, num_sectors, flags). */
        struct { uint64_t sector; uint32_t num_sectors, flags; } seg = { sector, q->bs / SECTOR, 0 };
        memcpy(m->data, &seg, sizeof(seg));
        h->sector = 0;
        d[1] = (struct vring_desc){ m->data_gpa, sizeof(seg), VRING_DESC_F_NEXT, (uint16_t)(head + 2) };
    } else if (type != BLK_T_FLUSH) {
        d[1] = (struct vring_desc){ m->data_gpa, q->bs,
                                    (uint16_t)(VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0)),
                                    (uint16_t)(head + 2) };
    }
    d[2] = (struct vring_desc){ m->status_gpa, 1, VRING_DESC_F_WRITE, 0 };
    /* A plain store: the release store of avail->idx in queue_publish() orders it (and the
     * descriptors and header above) before the device can see the new index. */
    q->avail->ring[q->avail_idx & (q->num - 1)] = head;
    q->avail_idx++;
    q->slots[s] = (struct slot){ .t_submit = now, .sector = sector, .type = type, .busy = true };
    if (track_changes) {
        q->slots[s].add_seq = __atomic_load_n(&add_seq, __ATOMIC_ACQUIRE);
        q->slots[s].rem_seq = __atomic_load_n(&rem_seq, __ATOMIC_ACQUIRE);
    }
}

/* Makes the added requests visible and kicks if the device wants a kick. */
static void queue_publish(struct queue *q)
{
    uint16_t old = q->kicked_idx, new = q->avail_idx;
    if (old == new)
        return;
    __atomic_store_n(&q->avail->idx, new, __ATOMIC_RELEASE);
    q->kicked_idx = new;
    /* The device re-enables kicks (clears NO_NOTIFY / writes avail_event) and then re-reads
     * avail->idx; we publish avail->idx and then read its suppression field.  Without a full
     * barrier both loads could see the old values (store-load reordering) and the requests
     * would sit unseen with nobody kicking. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick = q->event_idx ? vring_need_event(load16(q->avail_event), new, old)
                             : !(load16(&q->used->flags) & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        eventfd_write(q->kick_fd, 1);
        q->kicks++;
    }
}

/* The next request of the job, or false when the job issues no more. */
static bool job_next(struct job *j, uint64_t *rng, uint64_t now, uint64_t *block)
{
    if (j->deadline ? now >= j->deadline : j->issued == j->count)
        return false;
    uint64_t i = j->random ? rng_next(rng) % j->count : j->issued % j->count;
    j->issued++;
    *block = j->first + i;
    return true;
}

/* Fills free slots with the job's next requests (they are published by the caller). */
static void queue_refill(struct queue *q, uint64_t now)
{
    uint64_t block;
    while (q->nfree > 0 && job_next(&q->job, &q->rng, now, &block)) {
        uint32_t s = q->free_slots[--q->nfree];
        uint64_t sector = block * (q->bs / SECTOR);
        if (q->job.fill_pattern)
            fill_pattern(slot_data(q, s), q->bs, sector, q->seed);
        queue_add(q, s, q->job.type, sector, now);
    }
}

static void queue_complete(struct queue *q, uint32_t s, uint64_t now)
{
    struct slot *sl = &q->slots[s];
    hist_add(&q->lat, now - sl->t_submit);
    if (track_changes) {
        /* Odd: a change was under way at submission; changed: one began since. */
        bool in_add = (sl->add_seq & 1) || __atomic_load_n(&add_seq, __ATOMIC_ACQUIRE) != sl->add_seq;
        bool in_rem = (sl->rem_seq & 1) || __atomic_load_n(&rem_seq, __ATOMIC_ACQUIRE) != sl->rem_seq;
        if (in_add)
            hist_add(&q->lat_add, now - sl->t_submit);
        if (in_rem)
            hist_add(&q->lat_rem, now - sl->t_submit);
        if (!in_add && !in_rem)
            hist_add(&q->lat_quiet, now - sl->t_submit);
    }
    uint8_t status = *q->mem[s].status;
    if (status != BLK_S_OK) {
        if (q->errors == 0)
            fprintf(stderr, "blkfe: queue %u: request type %u sector %" PRIu64 ": status %u\n",
                    q->index, sl->type, sl->sector, status);
        q->errors++;
    } else if (q->job.check_pattern && sl->type == BLK_T_IN) {
        q->mismatches += check_pattern(slot_data(q, s), q->bs, sl->sector, q->seed, q->index,
                                        q->mismatches == 0);
    }
    sl->busy = false;
    q->free_slots[q->nfree++] = s;
}

/* Reaps every used entry the device published; returns how many. */
static uint32_t queue_reap(struct queue *q, uint64_t now)
{
    /* Acquire: the used entries, status bytes and read data the device wrote before its
     * release store of used->idx are visible to the loads below. */
    uint16_t end = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    uint32_t n = 0;
    for (; q->last_used != end; q->last_used++, n++) {
        const struct vring_used_elem *e = &q->used->ring[q->last_used & (q->num - 1)];
        uint32_t id = __atomic_load_n(&e->id, __ATOMIC_RELAXED);
        uint32_t s = id / DESCS_PER_REQ;
        if (id % DESCS_PER_REQ != 0 || s >= q->qd || !q->slots[s].busy)
            die(EXIT_BACKEND, "queue %u: device used id %u, which is not in flight", q->index, id);
        queue_complete(q, s, now);
    }
    if (n)
        __atomic_store_n(&q->completed, q->completed + n, __ATOMIC_RELAXED);
    return n;
}

/* Asks for an interrupt on the next completion; true if none is pending, so sleeping is safe. */
static bool queue_arm_interrupt(struct queue *q)
{
    if (q->event_idx)
        store16(q->used_event, q->last_used);
    else
        store16(&q->avail->flags, 0);
    /* Mirror of queue_publish(): the device publishes used->idx and then reads used_event /
     * flags; we write those and then re-read used->idx.  A full barrier keeps one of the two
     * sides from missing the other's store, which would leave us asleep with work done. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) == q->last_used;
}

/* While we reap anyway, interrupts are wasted work for the device.  With EVENT_IDX nothing
 * to do: used_event stays behind, so the device does not notify again until it is re-armed. */
static void queue_mask_interrupt(struct queue *q)
{
    if (!q->event_idx)
        store16(&q->avail->flags, VRING_AVAIL_F_NO_INTERRUPT);
}

/* Sleeps until the device signals the call eventfd.  poll() first because the fd's open file
 * description is shared with the back-end, and some (QEMU's event loop) make it O_NONBLOCK;
 * every back-end then costs the front-end the same two system calls per interrupt. */
static void queue_wait_interrupt(struct queue *q)
{
    struct pollfd p = { .fd = q->call_fd, .events = POLLIN };
    eventfd_t v;
    while (poll(&p, 1, -1) < 0 || eventfd_read(q->call_fd, &v) < 0) {
        if (errno != EINTR && errno != EAGAIN)
            die(EXIT_BACKEND, "queue %u: call eventfd: %s", q->index, strerror(errno));
    }
    q->wakeups++;
}

/* Runs q->job to its end: every request issued and completed. */
static void queue_run_job(struct queue *q)
{
    uint64_t now = now_ns();
    queue_refill(q, now);
    queue_publish(q);
    while (q->nfree < q->qd) {
        now = now_ns();   /* one clock read stamps every completion and submission of a batch */
        if (queue_reap(q, now) == 0) {
            if (queue_arm_interrupt(q))
                queue_wait_interrupt(q);
            queue_mask_interrupt(q);
            continue;
        }
        queue_refill(q, now);
        queue_publish(q);
    }
}

/* --- options and the run ------------------------------------------------------------------ */

enum mode { RANDREAD, RANDWRITE, SEQREAD, SEQWRITE, RANDDISCARD, RANDZEROES };

struct options {
    const char *socket;
    enum mode mode;
    uint32_t bs, qd, queues, ring;
    double seconds;
    uint64_t offset_mib, size_mib;   /* size 0: to the end of the disk */
    uint64_t ram_mib;
    uint64_t seed;
    bool event_idx, verify, check_only, sync, log;
    int cpus[64];
    int ncpus;
    uint32_t regions;                /* --regions N; 0: one region, the layout of old */
    uint64_t add_every_ms;           /* --add-regions-every MS; 0: no region changes */
    uint32_t add_max;                /* --add-regions-max K */
    bool add_grow;                   /* --add-regions-mode grow (else cycle) */
    bool set_mem_table;              /* --set-mem-table: never ask for CONFIGURE_MEM_SLOTS */
    uint64_t add_region_mib;         /* --add-region-mib */
    uint64_t change_window_ms;       /* --change-window-ms */
};

/* --add-regions-every: a thread that, while the queues run, adds a region every MS ms
 * (ADD_MEM_REG, a fresh memfd each time, as QEMU for a DIMM) up to K at once, then (cycle)
 * removes them one per MS ms (REM_MEM_REG) and starts over.  After setup nothing else uses
 * the socket, so this thread owns it. */
struct hotplug {
    struct vu_conn *c;
    uint64_t every_ns, window_ns, size, gpa0, stride;
    uint32_t max, present;
    bool grow, removing, stop;      /* stop: atomic */
    struct ram_region *slot;        /* max entries; fd < 0: free */
    pthread_t thread;
    uint64_t adds, rems;
    struct hist add_ack, rem_ack;   /* request sent to ack received */
};

struct run {
    struct options opt;
    struct vu_conn conn;
    struct ram ram;
    uint64_t capacity;           /* bytes */
    uint64_t range_first, range_blocks;   /* blocks of bs */
    bool flush;                  /* VIRTIO_BLK_F_FLUSH negotiated */
    struct queue *q;
    struct vu_log log;           /* --log */
    struct hotplug hp;           /* --add-regions-every */
    const char *mem_setup;       /* how the table was sent: set_mem_table / add_mem_reg */
    uint64_t max_mem_slots;      /* GET_MAX_MEM_SLOTS, 0 if not asked */
    pthread_barrier_t start, phase;
    uint32_t finished;           /* queue threads done (atomic) */
};

static const char *mode_name(enum mode m)
{
    static const char *names[] = { "randread", "randwrite", "seqread", "seqwrite", "randdiscard",
                                   "randwrite-zeroes" };
    return names[m];
}

/* Queue i's share of the range, in blocks. */
static void range_share(const struct run *r, uint32_t i, uint64_t *first, uint64_t *count)
{
    uint64_t n = r->range_blocks, qn = r->opt.queues;
    *first = r->range_first + n * i / qn;
    *count = n * (i + 1) / qn - n * i / qn;
}

static void pin_thread(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    if (rc != 0)
        die(EXIT_SETUP, "pinning to CPU %d: %s", cpu, strerror(rc));
}

static void bench_phase(struct run *r, struct queue *q)
{
    const struct options *o = &r->opt;
    static const uint32_t types[] = { BLK_T_IN, BLK_T_OUT, BLK_T_IN, BLK_T_OUT, BLK_T_DISCARD, BLK_T_WRITE_ZEROES };
    q->job = (struct job){ .type = types[o->mode],
                           .random = o->mode != SEQREAD && o->mode != SEQWRITE };
    range_share(r, q->index, &q->job.first, &q->job.count);
    q->t_start = now_ns();
    q->job.deadline = q->t_start + (uint64_t)(o->seconds * 1e9);
    queue_run_job(q);
    q->t_end = now_ns();
}

/* Write own share, flush, then (after every queue wrote) read the next queue's share: data
 * must be visible across queues, not just echoed back by the queue that wrote it. */
static void verify_phases(struct run *r, struct queue *q)
{
    uint32_t Q = r->opt.queues;
    q->t_start = now_ns();
    if (!r->opt.check_only) {
        q->job = (struct job){ .type = BLK_T_OUT, .fill_pattern = true };
        range_share(r, q->index, &q->job.first, &q->job.count);
        queue_run_job(q);
        if (r->flush) {
            q->job = (struct job){ .type = BLK_T_FLUSH, .count = 1 };
            queue_run_job(q);
        }
        pthread_barrier_wait(&r->phase);
    }
    q->job = (struct job){ .type = BLK_T_IN, .check_pattern = true };
    range_share(r, (q->index + 1) % Q, &q->job.first, &q->job.count);
    queue_run_job(q);
    q->t_end = now_ns();
}

struct thread_arg {
    struct run *run;
    struct queue *q;
};

static void *queue_main(void *arg)
{
    struct thread_arg *a = arg;
    pin_thread(a->q->cpu);
    pthread_barrier_wait(&a->run->start);
    if (a->run->opt.verify)
        verify_phases(a->run, a->q);
    else
        bench_phase(a->run, a->q);
    __atomic_add_fetch(&a->run->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* --- --add-regions-every: regions added and removed while the queues run ---------------- */

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* One ADD_MEM_REG or REM_MEM_REG with NEED_REPLY, inside a window the queue threads see
 * (*seq odd).  The window stays open window_ns after the ack: work a back-end defers past
 * its ack still counts.  Returns the round trip, request sent to ack received (ns). */
static uint64_t hp_change(struct hotplug *h, uint32_t req, const struct ram_region *g, uint64_t *seq)
{
    struct vu_mem_reg m = { 0, mem_region(g) };
    __atomic_add_fetch(seq, 1, __ATOMIC_ACQ_REL);
    uint64_t t0 = now_ns();
    /* REM_MEM_REG carries the region's fd too, as QEMU 7.2 sends it: libvhost-user 7.2
     * (qemu-storage-daemon) closes one fd unconditionally, and vhost-user.rst lets a back-end
     * accept one and close it unused. */
    vu_send(h->c, req, true, &m, sizeof(m), &g->fd, 1);
    uint64_t status = 1;
    vu_recv_reply(h->c, req, &status, sizeof(status));
    uint64_t rtt = now_ns() - t0;
    if (status != 0)
        die(EXIT_BACKEND, "back-end refused %s of gpa %#" PRIx64 " (status %" PRIu64 ")",
            req == VU_ADD_MEM_REG ? "ADD_MEM_REG" : "REM_MEM_REG", g->gpa, status);
    sleep_ns(h->window_ns);
    __atomic_add_fetch(seq, 1, __ATOMIC_ACQ_REL);
    return rtt;
}

static void hp_add(struct hotplug *h)
{
    uint32_t j = 0;
    while (h->slot[j].fd >= 0)
        j++;
    struct ram_region *g = &h->slot[j];
    /* A fresh memfd, not populated, as QEMU's memory-backend-memfd for a DIMM. */
    *g = (struct ram_region){ .gpa = h->gpa0 + j * h->stride, .size = h->size };
    g->fd = memfd_create("blkfe-hotplug", MFD_CLOEXEC);
    if (g->fd < 0 || ftruncate(g->fd, (off_t)h->size) < 0)
        die(EXIT_SETUP, "memfd of %" PRIu64 " bytes: %s", h->size, strerror(errno));
    g->base = mmap(NULL, h->size, PROT_READ | PROT_WRITE, MAP_SHARED, g->fd, 0);
    if (g->base == MAP_FAILED)
        die(EXIT_SETUP, "mmap a hot-added region: %s", strerror(errno));
    hist_add(&h->add_ack, hp_change(h, VU_ADD_MEM_REG, g, &add_seq));
    h->adds++;
    if (++h->present == h->max && !h->grow)
        h->removing = true;
}

/* Removes the oldest region (cycle mode adds slots 0..K-1 in order, then removes them so). */
static void hp_remove(struct hotplug *h)
{
    uint32_t j = 0;
    while (h->slot[j].fd < 0)
        j++;
    struct ram_region *g = &h->slot[j];
    hist_add(&h->rem_ack, hp_change(h, VU_REM_MEM_REG, g, &rem_seq));
    munmap(g->base, g->size);
    close(g->fd);
    g->fd = -1;
    h->rems++;
    if (--h->present == 0)
        h->removing = false;
}

static void *hp_main(void *arg)
{
    struct hotplug *h = arg;
    uint64_t next = now_ns() + h->every_ns;
    while (!__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE)) {
        uint64_t t = now_ns();
        if (t < next) {
            sleep_ns(next - t < 10000000u ? next - t : 10000000u);
            continue;
        }
        next += h->every_ns;
        if (h->removing)
            hp_remove(h);
        else if (h->present < h->max)
            hp_add(h);
    }
    return NULL;
}

/* While the queue threads run: a back-end that breaks a ring (err eventfd), hangs up or stops
 * completing requests ends the run with a message instead of hanging it. */
#define STALL_NS (10 * 1000000000ull)
#define MAX_QUEUES 16

static void watch_run(struct run *r)
{
    uint32_t Q = r->opt.queues;
    struct pollfd pfd[MAX_QUEUES + 1];
    for (uint32_t i = 0; i < Q; i++)
        pfd[i] = (struct pollfd){ .fd = r->q[i].err_fd, .events = POLLIN };
    /* The back-end never writes to this socket unasked: readable means it hung up.  With
     * --add-regions-every its replies arrive here too: then only a hang-up counts. */
    pfd[Q] = (struct pollfd){ .fd = r->conn.sock, .events = r->opt.add_every_ms ? POLLRDHUP : POLLIN };
    uint64_t last_total = 0, last_change = now_ns();
    while (__atomic_load_n(&r->finished, __ATOMIC_ACQUIRE) < Q) {
        if (poll(pfd, Q + 1, 100) > 0) {
            for (uint32_t i = 0; i < Q; i++)
                if (pfd[i].revents)
                    die(EXIT_BACKEND, "queue %u: the back-end signalled a broken ring", i);
            if (pfd[Q].revents)
                die(EXIT_BACKEND, "the back-end closed the connection during the run");
        }
        uint64_t total = 0;
        for (uint32_t i = 0; i < Q; i++)
            total += __atomic_load_n(&r->q[i].completed, __ATOMIC_RELAXED);
        uint64_t t = now_ns();
        if (total != last_total) {
            last_total = total;
            last_change = t;
        } else if (t - last_change > STALL_NS) {
            die(EXIT_BACKEND, "no request completed for %llu s", STALL_NS / 1000000000ull);
        }
    }
}

static void usage(FILE *f)
{
    fputs("usage: blkfe --socket PATH [options]\n"
          "  --rw MODE        randread | randwrite | seqread | seqwrite | randdiscard |\n"
          "                   randwrite-zeroes (one bs-sized segment per request; default randread)\n"
          "  --bs BYTES       request size, a multiple of 512 (default 4096)\n"
          "  --qd N           requests in flight per queue (default 32)\n"
          "  --queues N       request queues, one thread each (default 1)\n"
          "  --ring N         ring size, a power of two >= 3*qd (default max(256, that))\n"
          "  --seconds S      run time (default 5)\n"
          "  --offset-mib M   start of the disk range used (default 0)\n"
          "  --size-mib M     its size (default: to the end of the disk)\n"
          "  --cpus LIST      pin queue thread i to CPU LIST[i %% n], e.g. 1 or 0,1\n"
          "  --no-event-idx   do not negotiate VIRTIO_F_EVENT_IDX\n"
          "  --ram-mib M      guest RAM (default: 64, or more if the requests need it)\n"
          "  --seed N         offsets and verify pattern (default 1)\n"
          "  --verify         write a pattern over the range, flush, read back and compare\n"
          "  --check          only read the range back and compare (after a --verify)\n"
          "  --sync           print READY and wait for a stdin line before the run; after the\n"
          "                   JSON line wait for stdin EOF before disconnecting\n"
          "  --log            dirty-page logging as during a migration: negotiate LOG_ALL and\n"
          "                   LOG_SHMFD, share a bitmap (SET_LOG_BASE), log used rings, and\n"
          "                   clear the bitmap every 100 ms (counted as logged_pages)\n"
          "  --regions N      guest RAM as N memfd regions of equal size (1..509), the rings'\n"
          "                   parts and each request's header, data and status placed\n"
          "                   round-robin over them; sent with ADD_MEM_REG if the back-end\n"
          "                   offers CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE (N <= 8)\n"
          "  --set-mem-table  send the --regions with SET_MEM_TABLE even if the back-end offers\n"
          "                   CONFIGURE_MEM_SLOTS (N <= 8)\n"
          "  --add-regions-every MS\n"
          "                   while the queues run, a thread adds a region (ADD_MEM_REG, a\n"
          "                   fresh memfd) every MS ms, up to --add-regions-max at once, then\n"
          "                   removes them (REM_MEM_REG) one per MS ms and starts over; the\n"
          "                   JSON gets latency of requests in flight during a change\n"
          "  --add-regions-max K        regions added at once (default 8)\n"
          "  --add-regions-mode M       cycle (default) or grow (add K, then keep them)\n"
          "  --add-region-mib M         size of an added region (default 64)\n"
          "  --change-window-ms W       a change's window lasts until W ms after its ack\n"
          "                             (default 25, less than MS)\n", f);
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

static void parse_cpus(struct options *o, const char *s)
{
    o->ncpus = 0;
    for (const char *p = s; *p;) {
        char *end;
        long cpu = strtol(p, &end, 10);
        if (end == p || cpu < 0 || cpu >= CPU_SETSIZE || o->ncpus == 64 || (*end && *end != ','))
            die(EXIT_SETUP, "--cpus: bad list %s", s);
        o->cpus[o->ncpus++] = (int)cpu;
        p = *end ? end + 1 : end;
    }
}

static void parse_options(struct options *o, int argc, char **argv)
{
    static const struct option longopts[] = {
        { "socket", required_argument, NULL, 'S' }, { "rw", required_argument, NULL, 'w' },
        { "bs", required_argument, NULL, 'b' },     { "qd", required_argument, NULL, 'd' },
        { "queues", required_argument, NULL, 'q' }, { "ring", required_argument, NULL, 'r' },
        { "seconds", required_argument, NULL, 't' }, { "offset-mib", required_argument, NULL, 'o' },
        { "size-mib", required_argument, NULL, 'z' }, { "cpus", required_argument, NULL, 'c' },
        { "no-event-idx", no_argument, NULL, 'E' }, { "ram-mib", required_argument, NULL, 'm' },
        { "seed", required_argument, NULL, 's' },   { "verify", no_argument, NULL, 'V' },
        { "sync", no_argument, NULL, 'Y' },         { "help", no_argument, NULL, 'h' },
        { "check", no_argument, NULL, 'C' },         { "log", no_argument, NULL, 'L' },
        { "regions", required_argument, NULL, 'R' },
        { "add-regions-every", required_argument, NULL, 'A' },
        { "add-regions-max", required_argument, NULL, 'K' },
        { "add-regions-mode", required_argument, NULL, 'M' },
        { "add-region-mib", required_argument, NULL, 'Z' },
        { "change-window-ms", required_argument, NULL, 'W' },
        { "set-mem-table", no_argument, NULL, 'T' },
        { NULL, 0, NULL, 0 },
    };
    *o = (struct options){ .mode = RANDREAD, .bs = 4096, .qd = 32, .queues = 1, .seconds = 5,
                           .seed = 1, .event_idx = true, .add_max = 8, .add_region_mib = 64,
                           .change_window_ms = 25 };
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'S': o->socket = optarg; break;
        case 'w':
            for (o->mode = RANDREAD; o->mode <= RANDZEROES; o->mode++)
                if (strcmp(optarg, mode_name(o->mode)) == 0)
                    break;
            if (o->mode > RANDZEROES)
                die(EXIT_SETUP, "--rw: unknown mode %s", optarg);
            break;
        case 'b': o->bs = (uint32_t)parse_u64("bs", optarg, SECTOR, 4u << 20); break;
        case 'd': o->qd = (uint32_t)parse_u64("qd", optarg, 1, 4096); break;
        case 'q': o->queues = (uint32_t)parse_u64("queues", optarg, 1, MAX_QUEUES); break;
        case 'r': o->ring = (uint32_t)parse_u64("ring", optarg, 1, 32768); break;
        case 't': {
            char *end;
            o->seconds = strtod(optarg, &end);
            if (end == optarg || *end || !(o->seconds > 0 && o->seconds < 1e6))
                die(EXIT_SETUP, "--seconds: %s is not a positive number", optarg);
            break;
        }
        case 'o': o->offset_mib = parse_u64("offset-mib", optarg, 0, 1ull << 40); break;
        case 'z': o->size_mib = parse_u64("size-mib", optarg, 1, 1ull << 40); break;
        case 'c': parse_cpus(o, optarg); break;
        case 'E': o->event_idx = false; break;
        case 'm': o->ram_mib = parse_u64("ram-mib", optarg, 1, 1ull << 20); break;
        case 's': o->seed = parse_u64("seed", optarg, 0, UINT64_MAX); break;
        case 'V': o->verify = true; break;
        case 'C': o->verify = o->check_only = true; break;
        case 'Y': o->sync = true; break;
        case 'L': o->log = true; break;
        case 'R': o->regions = (uint32_t)parse_u64("regions", optarg, 1, MAX_REGIONS); break;
        case 'A': o->add_every_ms = parse_u64("add-regions-every", optarg, 1, 3600000); break;
        case 'K': o->add_max = (uint32_t)parse_u64("add-regions-max", optarg, 1, MAX_REGIONS - 1); break;
        case 'M':
            if (strcmp(optarg, "grow") != 0 && strcmp(optarg, "cycle") != 0)
                die(EXIT_SETUP, "--add-regions-mode: %s is neither grow nor cycle", optarg);
            o->add_grow = strcmp(optarg, "grow") == 0;
            break;
        case 'Z': o->add_region_mib = parse_u64("add-region-mib", optarg, 1, 1u << 20); break;
        case 'T': o->set_mem_table = true; break;
        case 'W': o->change_window_ms = parse_u64("change-window-ms", optarg, 0, 3600000); break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(EXIT_SETUP);
        }
    }
    if (optind != argc || !o->socket) {
        usage(stderr);
        exit(EXIT_SETUP);
    }
    if (o->bs % SECTOR)
        die(EXIT_SETUP, "--bs: %u is not a multiple of %u", o->bs, SECTOR);
    uint32_t need = DESCS_PER_REQ * o->qd;
    if (o->ring == 0)
        o->ring = pow2_ceil(need < 256 ? 256 : need);
    if (o->ring & (o->ring - 1) || o->ring < need || o->ring > 32768)
        die(EXIT_SETUP, "--ring: %u is not a power of two in %u..32768", o->ring, need);
    if (o->add_every_ms && o->change_window_ms >= o->add_every_ms)
        die(EXIT_SETUP, "--change-window-ms %" PRIu64 " must be less than --add-regions-every %" PRIu64,
            o->change_window_ms, o->add_every_ms);
}

/* The disk range in blocks of bs, checked against the capacity the back-end reported. */
static void set_range(struct run *r)
{
    const struct options *o = &r->opt;
    uint64_t off = o->offset_mib << 20;
    uint64_t size = o->size_mib ? o->size_mib << 20 : (off < r->capacity ? r->capacity - off : 0);
    if (off > r->capacity || size > r->capacity - off)
        die(EXIT_SETUP, "range %" PRIu64 "+%" PRIu64 " MiB is beyond the disk (%" PRIu64 " bytes)",
            off >> 20, size >> 20, r->capacity);
    if (off % o->bs)
        die(EXIT_SETUP, "--offset-mib is not a multiple of --bs");
    r->range_first = off / o->bs;
    r->range_blocks = size / o->bs;
    if (r->range_blocks < o->queues)
        die(EXIT_SETUP, "the range holds %" PRIu64 " blocks of %u bytes: fewer than the queues",
            r->range_blocks, o->bs);
}

static uint64_t ram_needed(const struct options *o)
{
    uint64_t per_queue = align_up(16ull * o->ring, 4096) + align_up(6 + 2ull * o->ring, 4096) +
                         align_up(6 + 8ull * o->ring, 4096) + align_up(16ull * o->qd, 4096) +
                         align_up(o->qd, 4096) + align_up((uint64_t)o->qd * o->bs, 4096);
    return align_up(per_queue * o->queues, 2u << 20);
}

static void setup(struct run *r)
{
    const struct options *o = &r->opt;
    struct vu_conn *c = &r->conn;
    vu_connect(c, o->socket);
    uint64_t offered = vu_negotiate(c, o->queues, o->log,
                                    (o->regions || o->add_every_ms) && !o->set_mem_table);
    bool slots = c->protocol & BIT(PF_CONFIGURE_MEM_SLOTS);
    if (o->add_every_ms && (!slots || !(c->protocol & BIT(PF_REPLY_ACK))))
        die(EXIT_SETUP, "--add-regions-every: the back-end does not offer %s (protocol features "
            "%#" PRIx64 ")", slots ? "REPLY_ACK" : "CONFIGURE_MEM_SLOTS", c->protocol);
    if (o->regions > VU_MAX_FDS && !slots)
        die(EXIT_SETUP, "--regions %u: %s, and SET_MEM_TABLE carries at most %d regions", o->regions,
            o->set_mem_table ? "--set-mem-table"
                             : "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
            VU_MAX_FDS);
    if (slots) {
        /* As QEMU: the slot count first; regions then go one by one (ADD_MEM_REG). */
        r->max_mem_slots = vu_get_u64(c, VU_GET_MAX_MEM_SLOTS);
        uint64_t want = (o->regions ? o->regions : 1) + (o->add_every_ms ? o->add_max : 0);
        if (want > r->max_mem_slots)
            die(EXIT_SETUP, "the back-end has %" PRIu64 " memory slots (GET_MAX_MEM_SLOTS); "
                "--regions and --add-regions-max need %" PRIu64, r->max_mem_slots, want);
    }
    r->capacity = vu_capacity_sectors(c) * SECTOR;
    set_range(r);

    c->features = BIT(F_VERSION_1) | (offered & (BIT(F_PROTOCOL_FEATURES) | BIT(F_BLK_FLUSH)));
    if (o->event_idx)
        c->features |= offered & BIT(F_RING_EVENT_IDX);
    if (o->queues > 1)
        c->features |= BIT(F_BLK_MQ);
    if (o->log)
        c->features |= BIT(F_LOG_ALL);
    r->flush = c->features & BIT(F_BLK_FLUSH);
    vu_request(c, VU_SET_FEATURES, &c->features, sizeof(c->features), NULL, 0, false);

    uint64_t size = o->ram_mib ? o->ram_mib << 20 : 64u << 20;
    if (!o->regions) {
        if (size < ram_needed(o)) {
            if (o->ram_mib)
                die(EXIT_SETUP, "--ram-mib: the rings and buffers need %" PRIu64 " MiB", ram_needed(o) >> 20);
            size = ram_needed(o);
        }
        ram_init(&r->ram, 1, false, false);
        ram_create(&r->ram, size);
    } else {
        /* A dry run of the layout says what the fullest region needs. */
        struct ram plan;
        ram_init(&plan, o->regions, true, true);
        for (uint32_t i = 0; i < o->queues; i++) {
            struct queue scratch = { 0 };
            queue_alloc(&scratch, &plan, o->ring, o->qd, o->bs);
            free(scratch.mem);
        }
        uint64_t per = align_up((size + o->regions - 1) / o->regions, 4096);
        uint64_t need = align_up(ram_max_used(&plan), 4096);
        free(plan.reg);
        if (need > per) {
            if (o->ram_mib)
                die(EXIT_SETUP, "--ram-mib: with %u regions the rings and buffers need %" PRIu64
                    " MiB", o->regions, (need * o->regions) >> 20);
            per = need;
        }
        ram_init(&r->ram, o->regions, true, false);
        ram_create(&r->ram, per);
    }
    r->q = calloc(o->queues, sizeof(*r->q));
    if (!r->q)
        die(EXIT_SETUP, "out of memory");
    for (uint32_t i = 0; i < o->queues; i++) {
        struct queue *q = &r->q[i];
        queue_layout(q, &r->ram, (uint16_t)i, o->ring, o->qd, o->bs,
                     c->features & BIT(F_RING_EVENT_IDX));
        q->seed = o->seed;
        q->rng = (o->seed + 1) * 0x9E3779B97F4A7C15ull + i;   /* never zero for xorshift */
        q->cpu = o->ncpus ? o->cpus[i % (uint32_t)o->ncpus] : -1;
        for (uint32_t s = 0; s < q->qd; s++)   /* benchmark writes carry data, not zeros */
            fill_pattern(slot_data(q, s), q->bs, s, o->seed);
    }
    if (slots) {
        for (uint32_t k = 0; k < r->ram.n; k++) {
            struct vu_mem_reg m = { 0, mem_region(&r->ram.reg[k]) };
            vu_request(c, VU_ADD_MEM_REG, &m, sizeof(m), &r->ram.reg[k].fd, 1, true);
        }
        r->mem_setup = "add_mem_reg";
    } else {
        vu_set_mem_table(c, &r->ram);
        r->mem_setup = "set_mem_table";
    }
    if (o->add_every_ms) {
        struct hotplug *h = &r->hp;
        *h = (struct hotplug){ .c = c, .every_ns = o->add_every_ms * 1000000u,
                               .window_ns = o->change_window_ms * 1000000u,
                               .size = o->add_region_mib << 20, .max = o->add_max, .grow = o->add_grow };
        h->gpa0 = align_up(r->ram.gpa_end + REGION_GAP, 1u << 30);
        h->stride = align_up(h->size, 1u << 20) + REGION_GAP;
        h->slot = calloc(h->max, sizeof(*h->slot));
        if (!h->slot)
            die(EXIT_SETUP, "out of memory");
        for (uint32_t j = 0; j < h->max; j++)
            h->slot[j].fd = -1;
        track_changes = true;
    }
    if (o->log) {
        /* The bitmap covers the base regions (and the holes between them), not added ones:
         * no request ever uses those. */
        vu_log_create(&r->log, GPA_BASE, r->ram.gpa_end - GPA_BASE);
        vu_log_set_base(c, &r->log);
    }
    for (uint32_t i = 0; i < o->queues; i++)
        vu_start_queue(c, &r->q[i], o->log);
    /* Without REPLY_ACK nothing confirmed the ring setup: any reply does, since the back-end
     * serves requests in order. */
    if (!(c->protocol & BIT(PF_REPLY_ACK)))
        vu_get_u64(c, VU_GET_FEATURES);
}

/* A latency histogram as PREFIX_requests, PREFIX_p50_us ... PREFIX_max_us. */
static void print_hist_json(const char *prefix, const struct hist *h)
{
    printf(", \"%s_requests\": %" PRIu64 ", \"%s_p50_us\": %.2f, \"%s_p99_us\": %.2f"
           ", \"%s_p999_us\": %.2f, \"%s_max_us\": %.2f", prefix, h->n, prefix,
           hist_percentile(h, 50) / 1e3, prefix, hist_percentile(h, 99) / 1e3, prefix,
           hist_percentile(h, 99.9) / 1e3, prefix, (double)h->max / 1e3);
}

static bool report(const struct run *r)
{
    const struct options *o = &r->opt;
    static struct hist lat;
    uint64_t t0 = UINT64_MAX, t1 = 0, errors = 0, mismatches = 0, kicks = 0, wakeups = 0;
    for (uint32_t i = 0; i < o->queues; i++) {
        const struct queue *q = &r->q[i];
        hist_merge(&lat, &q->lat);
        t0 = q->t_start < t0 ? q->t_start : t0;
        t1 = q->t_end > t1 ? q->t_end : t1;
        errors += q->errors;
        mismatches += q->mismatches;
        kicks += q->kicks;
        wakeups += q->wakeups;
    }
    double secs = (double)(t1 - t0) / 1e9, n = lat.n ? (double)lat.n : 1;
    printf("{\"rw\": \"%s\", \"bs\": %u, \"qd\": %u, \"queues\": %u, \"ring\": %u, "
           "\"event_idx\": %s, \"seconds\": %.4f, \"requests\": %" PRIu64 ", \"iops\": %.1f, "
           "\"mib_s\": %.2f, \"p50_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"mean_us\": %.2f, \"max_us\": %.2f, \"kicks_per_req\": %.4f, "
           "\"wakeups_per_req\": %.4f, \"errors\": %" PRIu64,
           o->check_only ? "check" : o->verify ? "verify" : mode_name(o->mode), o->bs, o->qd, o->queues, o->ring,
           r->q[0].event_idx ? "true" : "false", secs, lat.n, (double)lat.n / secs,
           (double)lat.n * o->bs / secs / (1 << 20), hist_percentile(&lat, 50) / 1e3,
           hist_percentile(&lat, 99) / 1e3, hist_percentile(&lat, 99.9) / 1e3,
           (double)lat.sum / n / 1e3, (double)lat.max / 1e3, (double)kicks / n,
           (double)wakeups / n, errors);
    if (o->log)
        vu_log_print_json(&r->log);
    if (o->regions || o->add_every_ms)
        printf(", \"regions\": %u, \"mem_setup\": \"%s\", \"max_mem_slots\": %" PRIu64,
               r->ram.n, r->mem_setup, r->max_mem_slots);
    if (o->add_every_ms) {
        static struct hist add, rem, quiet;
        for (uint32_t i = 0; i < o->queues; i++) {
            hist_merge(&add, &r->q[i].lat_add);
            hist_merge(&rem, &r->q[i].lat_rem);
            hist_merge(&quiet, &r->q[i].lat_quiet);
        }
        const struct hotplug *h = &r->hp;
        printf(", \"region_changes\": %" PRIu64 ", \"regions_added\": %" PRIu64
               ", \"regions_removed\": %" PRIu64 ", \"change_window_ms\": %" PRIu64,
               h->adds + h->rems, h->adds, h->rems, o->change_window_ms);
        print_hist_json("add", &add);
        print_hist_json("rem", &rem);
        print_hist_json("quiet", &quiet);
        printf(", \"add_ack_p50_us\": %.2f, \"add_ack_max_us\": %.2f, \"rem_ack_p50_us\": %.2f"
               ", \"rem_ack_max_us\": %.2f", hist_percentile(&h->add_ack, 50) / 1e3,
               (double)h->add_ack.max / 1e3, hist_percentile(&h->rem_ack, 50) / 1e3,
               (double)h->rem_ack.max / 1e3);
    }
    if (o->verify)
        printf(", \"verify\": \"%s\", \"bytes_verified\": %" PRIu64 ", \"mismatched_sectors\": %" PRIu64,
               errors || mismatches ? "failed" : "ok", r->range_blocks * o->bs, mismatches);
    printf("}\n");
    fflush(stdout);
    return errors == 0 && mismatches == 0;
}

/* --sync: blocks until the caller writes a line (true) or closes stdin (false). */
static bool wait_stdin_line(void)
{
    char line[64];
    return fgets(line, sizeof(line), stdin) != NULL;
}

int main(int argc, char **argv)
{
    static struct run r;
    parse_options(&r.opt, argc, argv);
    setup(&r);

    uint32_t Q = r.opt.queues;
    pthread_barrier_init(&r.start, NULL, Q + 1);
    pthread_barrier_init(&r.phase, NULL, Q);
    struct thread_arg args[MAX_QUEUES];
    for (uint32_t i = 0; i < Q; i++) {
        args[i] = (struct thread_arg){ &r, &r.q[i] };
        int rc = pthread_create(&r.q[i].thread, NULL, queue_main, &args[i]);
        if (rc != 0)
            die(EXIT_SETUP, "pthread_create: %s", strerror(rc));
    }
    if (r.opt.sync) {
        puts("READY");
        fflush(stdout);
        if (!wait_stdin_line())
            die(EXIT_SETUP, "--sync: stdin closed before the go line");
    }
    if (r.opt.log)
        vu_log_start(&r.log);
    pthread_barrier_wait(&r.start);
    if (r.opt.add_every_ms) {
        int rc = pthread_create(&r.hp.thread, NULL, hp_main, &r.hp);
        if (rc != 0)
            die(EXIT_SETUP, "pthread_create: %s", strerror(rc));
    }
    watch_run(&r);
    for (uint32_t i = 0; i < Q; i++)
        pthread_join(r.q[i].thread, NULL);
    if (r.opt.add_every_ms) {
        __atomic_store_n(&r.hp.stop, true, __ATOMIC_RELEASE);
        pthread_join(r.hp.thread, NULL);
    }
    if (r.opt.log)
        vu_log_stop(&r.log);
    bool ok = report(&r);
    if (r.opt.sync)
        while (wait_stdin_line())
            ;
    close(r.conn.sock);
    return ok ? 0 : EXIT_MISMATCH;
}
