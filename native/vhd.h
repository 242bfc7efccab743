/* Internal header for the C data plane: system headers, the public API and
 * the full definitions of the structures Python only sees as opaque. */
#ifndef VHD_H
#define VHD_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vhd_api.h"

_Static_assert(sizeof(((struct vhd_chain *)0)->iov) / sizeof(struct iovec) == VHD_MAX_IOV,
               "vhd_chain.iov must hold VHD_MAX_IOV entries");

struct vhd_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *hva;        /* host address of gpa (mapping base + mmap_offset) */
    void *map_base;      /* what mmap() returned, for munmap(); NULL: not ours */
    size_t map_len;
};

struct vhd_mem {
    uint32_t nregions;
    struct vhd_mem_region regions[VHD_MAX_MEM_REGIONS];   /* sorted by gpa */
    uint64_t gpa_start[VHD_MAX_MEM_REGIONS];              /* regions[i].gpa, dense for the search */
    uint16_t by_hva[VHD_MAX_MEM_REGIONS];                 /* indexes, sorted by hva */
};

/* Split ring layout (virtio 1.2, 2.7). Little-endian: x86-64 only host. */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];     /* then used_event, with EVENT_IDX */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[]; /* then avail_event, with EVENT_IDX */
};

/* Inflight tracking, split ring (vhost-user.rst "Inflight I/O tracking").
 * The front-end keeps this memory across back-end restarts. */
struct vhd_inflight_desc {
    uint8_t inflight;         /* 1 from pop until the used idx covering it is published */
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;         /* pop order, to resubmit in the same order */
};

struct vhd_inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;        /* used->idx whose completions are reflected in desc[] */
    struct vhd_inflight_desc desc[];
};

/* Packed ring layout (virtio 1.2, 2.8). */
struct vring_packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define VRING_PACKED_EVENT_F_ENABLE 0
#define VRING_PACKED_EVENT_F_DISABLE 1
#define VRING_PACKED_EVENT_F_DESC 2
#define VRING_PACKED_EVENT_WRAP (1u << 15)

/* Driver and device event suppression areas. */
struct vring_packed_event {
    uint16_t off_wrap;
    uint16_t flags;
};

/* Inflight tracking, packed ring (vhost-user.rst "Inflight I/O tracking",
 * QueueRegionPacked / DescStatePacked).  Entries are allocated per ring
 * descriptor from a free list; a chain's head entry holds its state. */
struct vhd_inflight_desc_packed {
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;            /* free list, or the chain's next entry */
    uint16_t last;            /* head entry: the chain's last entry */
    uint16_t num;             /* head entry: ring descriptors in the chain */
    uint64_t counter;         /* head entry: pop order */
    uint16_t id;              /* copy of the ring descriptor */
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct vhd_inflight_region_packed {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct vhd_inflight_desc_packed desc[];
};

_Static_assert(sizeof(struct vhd_inflight_desc_packed) == 32, "DescStatePacked is 32 bytes");
_Static_assert(offsetof(struct vhd_inflight_region_packed, desc) == 32, "QueueRegionPacked header is 32 bytes");

/* Pops net RX may give back (vhd_vring_unpop) on a packed ring: one frame's
 * chains (1 + MAX_MERGE in net.c). */
#define VHD_PACKED_UNPOP_MAX 128
#define VHD_PACKED_PUSHED (1u << 31)

struct vhd_pop_rec {
    uint16_t pos;             /* last_avail_idx before the pop */
    uint16_t id;
    bool wrap;
};

/* Packed-only state, allocated at setup (sized by the ring). */
struct vhd_packed {
    struct vring_packed_desc *desc;
    struct vring_packed_event *driver;   /* driver event suppression (the "avail" address) */
    struct vring_packed_event *device;   /* device event suppression (the "used" address) */
    bool avail_wrap;                     /* wrap counter of last_avail_idx */
    bool used_wrap;                      /* wrap counter of used_idx */
    uint32_t device_flags;               /* last value stored to device->flags (UINT32_MAX: unknown) */
    uint32_t batch_n;                    /* used descriptors pushed since the last flush */
    uint16_t batch_pos;                  /* the first of them: its flags are stored at flush */
    uint16_t batch_flags;
    uint32_t *id_ndesc;                  /* per buffer id: ring descriptors of its chain in flight, 0: free;
                                          * | VHD_PACKED_PUSHED once used, until the batch is published */
    uint16_t *batch_ids;                 /* ids pushed since the last flush */
    uint16_t *id_entry;                  /* per buffer id: inflight region head entry */
    struct vhd_inflight_region_packed *inflight;
    uint32_t hist_n, hist_head;          /* last pops, for unpop */
    struct vhd_pop_rec hist[VHD_PACKED_UNPOP_MAX];
};

struct vhd_vring {
    const vhd_mem *mem;
    uint64_t desc_uva, avail_uva, used_uva;   /* SET_VRING_ADDR: re-translated on a memory change */
    uint32_t num;
    uint32_t mask;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;   /* next avail entry to pop */
    uint16_t used_idx;         /* shadow of used->idx including unpublished pushes */
    uint16_t published_idx;    /* last value stored to used->idx */
    uint64_t published_bytes;  /* stats.bytes_read + bytes_written at the last flush */
    uint16_t signalled_used;   /* used->idx at the last notification check */
    bool signalled_used_valid;
    bool event_idx;
    bool indirect;
    int call_fd;
    int err_fd;
    int broken_fd;
    struct vhd_inflight_region *inflight;
    uint64_t inflight_counter;
    uint16_t *unpublished;     /* heads pushed since the last flush (inflight only) */
    uint32_t n_unpublished;
    uint16_t *resubmit;        /* heads to hand out again before new avail entries */
    uint32_t n_resubmit;
    uint32_t resubmit_pos;
    bool more;                 /* a drain stopped at its budget: run again */
    bool packed;               /* VIRTIO_F_RING_PACKED: the vhd_vring_* entry points go to vring_packed.c */
    struct vhd_packed *pk;     /* packed only; last_avail_idx and used_idx are then ring positions */
    vhd_log *log;              /* VHOST_F_LOG_ALL: where writes to guest memory are logged */
    bool log_used;             /* VHOST_VRING_F_LOG: used ring writes too, at log_used_gpa */
    uint64_t log_used_gpa;
    struct vhd_vring_stats stats;
    vhd_qos_gate *qos;         /* QoS limits (qos.c), NULL: unlimited; set after setup */
};

/* Relaxed loads/stores of guest-shared 16-bit fields: the guest writes them
 * concurrently, so every access must be a single, untorn access. */
static inline uint16_t vhd_load16(const uint16_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void vhd_store16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* Dirty logging of device writes into guest memory (log.c does the bits).
 * Called after the write; free when logging is off. */
void vhd_vring_log_hva_slow(vhd_vring *vr, const void *hva, size_t len);
void vhd_vring_log_iov_slow(vhd_vring *vr, const struct iovec *iov, int n, size_t len);

static inline void vhd_vring_log_hva(vhd_vring *vr, const void *hva, size_t len)
{
    if (__builtin_expect(vr->log != NULL, 0))
        vhd_vring_log_hva_slow(vr, hva, len);
}

/* What a chain walk has gathered so far (both ring layouts). */
struct vhd_walk_buffers {
    int niov;
    uint64_t out_len;
    uint64_t in_len;
};

/* One descriptor's buffer joins the chain: the one place where a buffer's
 * guest address and length are checked (inside guest memory, room in the
 * iovec, readable before writable, totals below 4 GiB), for split and
 * packed rings alike.  Returns 0 or a VHD_ERR_*. */
static inline int vhd_chain_add_buffer(const vhd_vring *vr, struct vhd_walk_buffers *b, struct vhd_chain *c,
                                       uint64_t addr, uint32_t len, bool writable)
{
    if (!writable && c->n_in > 0)
        return VHD_ERR_ORDER;
    int n = vhd_mem_gpa_to_iov(vr->mem, addr, len, &c->iov[b->niov], VHD_MAX_IOV - b->niov);
    if (n == -ENOBUFS)
        return VHD_ERR_IOV;
    if (n < 0)
        return VHD_ERR_ADDR;
    b->niov += n;
    if (writable) {
        c->n_in += (uint16_t)n;
        b->in_len += len;
    } else {
        c->n_out += (uint16_t)n;
        b->out_len += len;
    }
    if (b->in_len > UINT32_MAX || b->out_len > UINT32_MAX)
        return VHD_ERR_LEN;
    return 0;
}

/* Copies n bytes the guest may be writing meanwhile, each read once (an
 * unaligned descriptor cannot be read with atomic loads). */
static inline void vhd_read_guest_bytes(void *dst, const void *src, size_t n)
{
    const volatile uint8_t *s = (const volatile uint8_t *)src;
    uint8_t *d = dst;
    for (size_t i = 0; i < n; i++)
        d[i] = s[i];
}

/* The first len bytes of iov[0..n). */
static inline void vhd_vring_log_iov(vhd_vring *vr, const struct iovec *iov, int n, size_t len)
{
    if (__builtin_expect(vr->log != NULL, 0))
        vhd_vring_log_iov_slow(vr, iov, n, len);
}

/* QoS (qos.c): one gate per limited ring.  Owned by the ring's worker
 * while it runs; the stats are read racily by the control plane. */
struct vhd_qos_gate {
    vhd_qos *q;
    uint64_t op_size;          /* q's size_iops_sec, 0: none (copied: counted inline) */
    uint32_t classes;
    bool leasing;              /* net: lets a lease of frames through per look at the buckets */
    uint32_t lease;            /* requests let through without a look at the buckets (>= 1) */
    uint32_t n;                /* requests counted, not yet charged */
    uint64_t max_bytes;        /* the largest request counted: what the lease assumes each costs */
    uint64_t bytes[2];         /* ... per class: [0] READ, [1] WRITE */
    uint64_t ops[2];
    uint64_t until;            /* throttled: the clock value the buckets open at; 0: not */
    struct vhd_qos_gate_stats stats;
};

bool vhd_qos_gate_admit(vhd_qos_gate *g, const vhd_vring *vr);
/* Charges what the turn counted (the worker, after each turn). */
void vhd_qos_gate_end_turn(vhd_qos_gate *g);

/* May the ring pop a request now?  False: a limit holds it; the ring's
 * processing returns with kicks off and the worker wakes it on a timer. */
static inline bool vhd_qos_may_pop(vhd_vring *vr)
{
    vhd_qos_gate *g = vr->qos;
    if (__builtin_expect(g == NULL, 1))
        return true;
    /* Within a lease (net: frames charged at once, many while the buckets
     * are far from their limit, one near it) only the first pop looks at
     * the buckets. */
    if (g->n > 0 && g->n < g->lease && !g->until)
        return true;
    return vhd_qos_gate_admit(g, vr);
}

/* True if the last vhd_qos_may_pop() said no. */
static inline bool vhd_qos_throttled(const vhd_vring *vr)
{
    return vr->qos != NULL && vr->qos->until != 0;
}

/* What a request of `bytes` costs in 1/2^VHD_QOS_OPS_SHIFT ops: one op, or
 * with size_iops_sec (op_size) bytes / op_size if that is more. */
static inline uint64_t vhd_qos_op_cost_of(uint64_t op_size, uint64_t bytes)
{
    if (op_size && bytes > op_size) {
        unsigned __int128 v = ((unsigned __int128)bytes << VHD_QOS_OPS_SHIFT) / op_size;
        return v > UINT64_MAX / 2 ? UINT64_MAX / 2 : (uint64_t)v;
    }
    return (uint64_t)1 << VHD_QOS_OPS_SHIFT;
}

/* Counts one popped request of class VHD_QOS_READ or VHD_QOS_WRITE. */
static inline void vhd_qos_count(vhd_vring *vr, uint32_t cls, uint64_t bytes)
{
    vhd_qos_gate *g = vr->qos;
    if (__builtin_expect(g == NULL, 1))
        return;
    int c = cls == VHD_QOS_WRITE;
    if (bytes > g->max_bytes)
        g->max_bytes = bytes;
    g->bytes[c] += bytes;
    g->ops[c] += vhd_qos_op_cost_of(g->op_size, bytes);
    g->n++;
}

/* mem.c: the guest-physical address of a host address inside a region
 * (the reverse of vhd_mem_gpa_to_iov, for the dirty log); 0 if found. */
int vhd_mem_hva_to_gpa(const vhd_mem *mem, const void *hva, uint64_t *gpa, uint64_t *room);

/* vring_packed.c: the packed implementations of the vhd_vring_* entry
 * points (vring.c chooses once per call on vr->packed; devices never do). */
int vhd_packed_setup(vhd_vring *vr, const vhd_mem *mem, const struct vhd_vring_config *cfg);
void vhd_vring_take_options(vhd_vring *vr, const struct vhd_vring_config *cfg);
int vhd_packed_set_mem(vhd_vring *vr, const vhd_mem *mem);
void vhd_packed_release(vhd_vring *vr);
int vhd_packed_pop(vhd_vring *vr, struct vhd_chain *c);
void vhd_packed_push(vhd_vring *vr, uint16_t id, uint32_t len);
void vhd_packed_unpop(vhd_vring *vr, uint16_t n);
void vhd_packed_flush(vhd_vring *vr);
void vhd_packed_disable_notify(vhd_vring *vr);
int vhd_packed_enable_notify(vhd_vring *vr);
int vhd_packed_pending(const vhd_vring *vr);
/* vring.c helpers both layouts use. */
void vhd_vring_reset(vhd_vring *vr, const vhd_mem *mem);
bool vhd_ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen);
void vhd_vring_log_used(vhd_vring *vr, const void *field, size_t len);

/* vring.c: the pop / handle / publish loop shared by the synchronous
 * back-ends.  handler pushes one used element per chain.  Publishes and
 * notifies once per batch of at most batch_max chains; returns chains handled. */
typedef void (*vhd_chain_handler)(void *ctx, vhd_vring *vr, struct vhd_chain *c);
int vhd_vring_drain(vhd_vring *vr, vhd_chain_handler handler, void *ctx, int batch_max);
/* Publishes what was pushed once VHD_FLUSH_BYTES of data moved since the
 * last flush: a batch of large requests handled inline must not hold back
 * the first completions until the last is done. */
void vhd_vring_flush_if_big(vhd_vring *vr);
bool vhd_vring_over_budget(vhd_vring *vr, int done);

/* blk.c: shared by the sync and io_uring engines. */
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20

struct vhd_blk {
    int fd;                   /* may be O_DIRECT */
    int buffered_fd;          /* same file without O_DIRECT (== fd if not direct) */
    uint64_t capacity;        /* in 512-byte sectors; atomic: changed by an online resize */
    bool readonly;
    bool writethrough;        /* atomic: the guest toggles it (CONFIG_WCE) */
    struct vhd_blk_trim trim; /* set before any worker runs */
    char serial[VIRTIO_BLK_ID_BYTES];
};

enum {
    VHD_BLK_OP_DONE, VHD_BLK_OP_READ, VHD_BLK_OP_WRITE, VHD_BLK_OP_FLUSH,
    VHD_BLK_OP_FALLOCATE,     /* DISCARD / WRITE_ZEROES: one fallocate per segment */
};

/* One DISCARD / WRITE_ZEROES segment, validated, in bytes. */
struct vhd_blk_seg {
    uint64_t offset;
    uint64_t len;
    int mode;                 /* fallocate mode */
};

struct vhd_blk_req {
    uint16_t head;
    uint8_t op;
    uint8_t result;           /* status, for VHD_BLK_OP_DONE */
    uint8_t *status;          /* the guest's status byte, NULL if it gave none */
    uint32_t done_len;        /* data bytes written to guest memory on success */
    uint64_t offset;
    size_t len;
    size_t moved;             /* data bytes transferred so far (short transfers) */
    struct iovec *iov;        /* data segments not yet transferred (inside the chain) */
    int niov;
    int rw_flags;             /* RWF_DSYNC for a write in write-through mode */
    uint32_t nseg;            /* VHD_BLK_OP_FALLOCATE: copied from the guest once */
    uint32_t seg_done;        /* ... and done one after the other */
    struct vhd_blk_seg seg[VHD_BLK_MAX_SEG];
};

void vhd_blk_parse(const vhd_blk *blk, struct vhd_chain *c, struct vhd_blk_req *r);
uint8_t vhd_blk_execute_sync(const vhd_blk *blk, vhd_vring *vr, struct vhd_blk_req *r);
int vhd_blk_fallocate_result(const struct vhd_blk_seg *seg, int res);
void vhd_blk_qos_count(vhd_vring *vr, const struct vhd_blk_req *r);
void vhd_blk_advance(vhd_vring *vr, struct vhd_blk_req *r, size_t bytes);
void vhd_blk_complete(vhd_vring *vr, struct vhd_blk_req *r, uint8_t status);

/* iov.c */
size_t vhd_iov_to_buf(const struct iovec *iov, int n, void *dst, size_t len);
size_t vhd_buf_to_iov(const struct iovec *iov, int n, const void *src, size_t len);
/* Copies up to len bytes of iov, from byte skip on, into dst; returns bytes copied. */
size_t vhd_iov_copy_from(const struct iovec *iov, int n, size_t skip, void *dst, size_t len);
int vhd_iov_skip(struct iovec *iov, int n, size_t skip);

#endif
