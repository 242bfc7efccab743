/* Virtqueue processing, device side: the vhd_vring_* interface devices use,
 * and its split implementation (virtio 1.2 section 2.7).  Each entry point
 * chooses the layout once, on vr->packed; the packed implementation is in
 * vring_packed.c.  Devices never test the layout.
 *
 * Memory ordering with the driver, which runs concurrently on another CPU:
 * - avail->idx is loaded with acquire: the driver writes the ring entry and
 *   descriptors before a release/wmb of avail->idx, so they are visible to
 *   every load that follows.
 * - used->idx is stored with release: used elements and the data written
 *   into guest buffers are visible before the driver sees the new index.
 * - A full fence separates "publish used idx / re-enable kicks" from
 *   "read the driver's suppression fields / re-check avail->idx"; without
 *   it the store can be reordered after the load (store-load on x86) and a
 *   notification or a kick is lost.
 * Every guest-written field is read with one untorn load into a local and
 * only the local is used afterwards (no double fetch). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "vhd.h"

vhd_vring *vhd_vring_new(void)
{
    vhd_vring *vr = calloc(1, sizeof(*vr));
    if (vr) {
        vr->call_fd = -1;
        vr->err_fd = -1;
        vr->broken_fd = -1;
    }
    return vr;
}

static void free_inflight_lists(vhd_vring *vr)
{
    free(vr->unpublished);
    free(vr->resubmit);
    vr->unpublished = vr->resubmit = NULL;
    vr->n_unpublished = vr->n_resubmit = vr->resubmit_pos = 0;
}

/* The settings both layouts take from SET_VRING_* as they are. */
void vhd_vring_take_options(vhd_vring *vr, const struct vhd_vring_config *cfg)
{
    vr->event_idx = cfg->event_idx != 0;
    vr->indirect = cfg->indirect != 0;
    vr->call_fd = cfg->call_fd;
    vr->err_fd = cfg->err_fd;
    vr->broken_fd = cfg->broken_fd;
    vr->log = cfg->log;
    vr->log_used = cfg->log != NULL && cfg->log_used;
    vr->log_used_gpa = cfg->log_used_gpa;
}

void vhd_vring_free(vhd_vring *vr)
{
    if (vr) {
        free_inflight_lists(vr);
        vhd_packed_release(vr);
    }
    free(vr);
}

/* What both layouts' setup does first: counters survive (a memory table
 * swap re-sets a ring up); a broken mark does not (the front-end
 * re-initialised the ring); everything else starts from zero. */
void vhd_vring_reset(vhd_vring *vr, const vhd_mem *mem)
{
    struct vhd_vring_stats stats = vr->stats;
    free_inflight_lists(vr);
    vhd_packed_release(vr);
    memset(vr, 0, sizeof(*vr));
    vr->stats = stats;
    vr->stats.broken = 0;
    vr->published_bytes = stats.bytes_read + stats.bytes_written;
    vr->mem = mem;
}

uint64_t vhd_inflight_queue_size(uint32_t queue_size)
{
    uint64_t n = sizeof(struct vhd_inflight_region) + (uint64_t)queue_size * sizeof(struct vhd_inflight_desc);
    return (n + 63) & ~(uint64_t)63;
}

static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct vhd_inflight_desc *d = arg;
    uint64_t x = d[*(const uint16_t *)a].counter, y = d[*(const uint16_t *)b].counter;
    return x < y ? -1 : x > y;
}

/* Brings the inflight region in line with the used ring after a restart
 * and lists what was in flight, in pop order.  A crash can fall between
 * publishing used->idx and clearing the completed heads' flags: the used
 * ring itself says which heads those were (entries from the region's
 * used_idx up to used->idx), so batches need no extra bookkeeping. */
static int inflight_setup(vhd_vring *vr, struct vhd_inflight_region *reg)
{
    vr->unpublished = calloc(vr->num, sizeof(uint16_t));
    vr->resubmit = calloc(vr->num, sizeof(uint16_t));
    if (!vr->unpublished || !vr->resubmit)
        return -ENOMEM;
    vr->inflight = reg;
    if (reg->version != 1 || reg->desc_num != vr->num) {
        /* New region (zeroed by the back-end that created it) or a ring
         * resized by the front-end: nothing can be in flight. */
        memset(reg->desc, 0, vr->num * sizeof(reg->desc[0]));
        reg->desc_num = (uint16_t)vr->num;
        reg->used_idx = vr->used_idx;
        __atomic_store_n(&reg->version, 1, __ATOMIC_RELEASE);
        return 0;
    }
    for (uint16_t i = reg->used_idx; i != vr->used_idx; i++) {
        uint32_t id = __atomic_load_n(&vr->used->ring[i & vr->mask].id, __ATOMIC_RELAXED);
        if (id < vr->num)
            reg->desc[id].inflight = 0;
    }
    reg->used_idx = vr->used_idx;
    uint64_t max_counter = 0;
    for (uint32_t i = 0; i < vr->num; i++) {
        if (reg->desc[i].inflight != 1)
            continue;
        vr->resubmit[vr->n_resubmit++] = (uint16_t)i;
        if (reg->desc[i].counter > max_counter)
            max_counter = reg->desc[i].counter;
    }
    qsort_r(vr->resubmit, vr->n_resubmit, sizeof(uint16_t), cmp_counter, reg->desc);
    vr->inflight_counter = max_counter;
    /* Every popped request is either used or in flight: the next avail
     * entry to pop follows them all. */
    vr->last_avail_idx = (uint16_t)(vr->used_idx + vr->n_resubmit);
    vr->stats.resubmitted += vr->n_resubmit;
    return 0;
}

bool vhd_ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

static bool aligned(const void *p, uintptr_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

int vhd_vring_setup(vhd_vring *vr, const vhd_mem *mem, const struct vhd_vring_config *cfg)
{
    if (cfg->packed)
        return vhd_packed_setup(vr, mem, cfg);
    uint64_t n = cfg->num;
    if (n == 0 || n > VHD_MAX_QUEUE_SIZE || (n & (n - 1)) != 0)
        return -EINVAL;
    /* Sizes include used_event / avail_event; the ring must be wholly mapped. */
    void *desc = vhd_mem_uva_to_hva(mem, cfg->desc_uva, 16 * n);
    void *avail = vhd_mem_uva_to_hva(mem, cfg->avail_uva, 6 + 2 * n);
    void *used = vhd_mem_uva_to_hva(mem, cfg->used_uva, 6 + 8 * n);
    if (!desc || !avail || !used)
        return -EFAULT;
    if (!aligned(desc, 16) || !aligned(avail, 2) || !aligned(used, 4))
        return -EINVAL;
    /* The device writes the used ring: laid over the avail ring or the
     * descriptors it would feed itself new work forever. */
    uint64_t dsz = 16 * n, asz = 6 + 2 * n, usz = 6 + 8 * n;
    bool bad_layout = vhd_ranges_overlap(cfg->used_uva, usz, cfg->avail_uva, asz) ||
                      vhd_ranges_overlap(cfg->used_uva, usz, cfg->desc_uva, dsz);
    vhd_vring_reset(vr, mem);
    vr->desc_uva = cfg->desc_uva;
    vr->avail_uva = cfg->avail_uva;
    vr->used_uva = cfg->used_uva;
    vr->num = (uint32_t)n;
    vr->mask = (uint32_t)n - 1;
    vr->desc = desc;
    vr->avail = avail;
    vr->used = used;
    vr->last_avail_idx = cfg->last_avail_idx;
    /* The used index in guest memory is the truth after a reconnect. */
    vr->used_idx = vhd_load16(&vr->used->idx);
    vr->published_idx = vr->used_idx;
    vhd_vring_take_options(vr, cfg);
    if (bad_layout) {
        vhd_vring_set_broken(vr, VHD_ERR_LAYOUT);   /* the guest's doing: NEEDS_RESET, not a protocol error */
        return 0;
    }
    if (cfg->inflight)
        return inflight_setup(vr, cfg->inflight);
    return 0;
}

int vhd_vring_set_mem(vhd_vring *vr, const vhd_mem *mem)
{
    if (vr->packed)
        return vhd_packed_set_mem(vr, mem);
    uint64_t n = vr->num;
    if (vhd_mem_uva_to_hva(mem, vr->desc_uva, 16 * n) != (void *)vr->desc ||
        vhd_mem_uva_to_hva(mem, vr->avail_uva, 6 + 2 * n) != (void *)vr->avail ||
        vhd_mem_uva_to_hva(mem, vr->used_uva, 6 + 8 * n) != (void *)vr->used)
        return -EFAULT;
    vr->mem = mem;
    return 0;
}

struct set_mem {
    const vhd_mem *mem;
    int rc;
};

static void set_mem_on_worker(vhd_task *t, void *arg)
{
    struct set_mem *a = arg;
    a->rc = vhd_vring_set_mem(vhd_task_vring(t), a->mem);
}

int vhd_task_set_mem(vhd_task *t, const vhd_mem *mem)
{
    struct set_mem a = { mem, 0 };
    vhd_task_call(t, set_mem_on_worker, &a);
    return a.rc;
}

void vhd_vring_set_broken(vhd_vring *vr, int reason)
{
    if (vr->stats.broken)
        return;
    vr->stats.broken = reason;
    if (vr->err_fd >= 0)
        eventfd_write(vr->err_fd, 1);
    if (vr->broken_fd >= 0)
        eventfd_write(vr->broken_fd, 1);
}

/* One untorn read of each field.  Descriptor tables in the ring are 16-byte
 * aligned (checked at setup); indirect tables may not be, and are read with
 * a volatile byte copy, which is equally single-fetch. */
static void read_desc(const struct vring_desc *src, struct vring_desc *d)
{
    if (aligned(src, 8)) {
        d->addr = __atomic_load_n(&src->addr, __ATOMIC_RELAXED);
        d->len = __atomic_load_n(&src->len, __ATOMIC_RELAXED);
        d->flags = __atomic_load_n(&src->flags, __ATOMIC_RELAXED);
        d->next = __atomic_load_n(&src->next, __ATOMIC_RELAXED);
        return;
    }
    vhd_read_guest_bytes(d, src, sizeof(*d));
}

struct walk {
    const struct vring_desc *table;
    uint32_t table_size;
    uint32_t count;      /* descriptors visited in this table */
    bool in_indirect;
    struct vhd_walk_buffers buf;
};

static int enter_indirect(const vhd_vring *vr, struct walk *w, const struct vring_desc *d)
{
    if (!vr->indirect || w->in_indirect || (d->flags & VRING_DESC_F_NEXT))
        return VHD_ERR_INDIRECT;
    if (d->len == 0 || d->len % sizeof(struct vring_desc) != 0)
        return VHD_ERR_INDIRECT;
    const struct vring_desc *table = vhd_mem_gpa_to_hva(vr->mem, d->addr, d->len);
    if (!table)
        return VHD_ERR_ADDR;
    w->table = table;
    w->table_size = d->len / sizeof(struct vring_desc);
    w->count = 0;
    w->in_indirect = true;
    return 0;
}

static int walk_chain(const vhd_vring *vr, struct vhd_chain *c, uint16_t head)
{
    struct walk w = { .table = vr->desc, .table_size = vr->num };
    uint32_t i = head;
    c->n_out = c->n_in = 0;
    for (;;) {
        /* A chain can visit each table entry at most once: more is a loop. */
        if (++w.count > w.table_size)
            return VHD_ERR_CHAIN_LEN;
        struct vring_desc d;
        read_desc(&w.table[i], &d);
        int rc;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            rc = enter_indirect(vr, &w, &d);
            if (rc < 0)
                return rc;
            i = 0;
            continue;
        }
        rc = vhd_chain_add_buffer(vr, &w.buf, c, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
        if (rc < 0)
            return rc;
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        i = d.next;
        if (i >= w.table_size)
            return VHD_ERR_NEXT;
    }
    c->out_len = (uint32_t)w.buf.out_len;
    c->in_len = (uint32_t)w.buf.in_len;
    return 0;
}

/* Requests in flight when the previous back-end died come first. */
static int pop_resubmit(vhd_vring *vr, struct vhd_chain *c)
{
    uint16_t head = vr->resubmit[vr->resubmit_pos++];
    c->head = head;
    int rc = walk_chain(vr, c, head);
    if (rc < 0) {
        vhd_vring_set_broken(vr, rc);
        return rc;
    }
    return VHD_POP_OK;
}

int vhd_vring_pop(vhd_vring *vr, struct vhd_chain *c)
{
    if (vr->packed)
        return vhd_packed_pop(vr, c);
    if (vr->stats.broken)
        return (int)vr->stats.broken;
    if (vr->resubmit_pos < vr->n_resubmit)
        return pop_resubmit(vr, c);
    uint16_t avail_idx = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(avail_idx - vr->last_avail_idx);
    if (pending == 0)
        return VHD_POP_EMPTY;
    if (pending > vr->num) {
        vhd_vring_set_broken(vr, VHD_ERR_AVAIL_IDX);
        return VHD_ERR_AVAIL_IDX;
    }
    uint16_t head = vhd_load16(&vr->avail->ring[vr->last_avail_idx & vr->mask]);
    if (head >= vr->num) {
        vhd_vring_set_broken(vr, VHD_ERR_HEAD);
        return VHD_ERR_HEAD;
    }
    c->head = head;
    int rc = walk_chain(vr, c, head);
    if (rc < 0) {
        vhd_vring_set_broken(vr, rc);
        return rc;
    }
    if (vr->inflight) {
        struct vhd_inflight_desc *d = &vr->inflight->desc[head];
        d->counter = ++vr->inflight_counter;
        __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
    }
    vr->last_avail_idx++;
    return VHD_POP_OK;
}

/* Every pointer a device logs came from this ring's translation of guest
 * addresses, so it lies in a region; one that does not is a bug, logged as
 * refused rather than ignored. */
void vhd_vring_log_hva_slow(vhd_vring *vr, const void *hva, size_t len)
{
    const uint8_t *p = hva;
    while (len > 0) {
        uint64_t gpa, room;
        if (vhd_mem_hva_to_gpa(vr->mem, p, &gpa, &room) < 0) {
            vhd_log_write(vr->log, UINT64_MAX, 1);   /* counted as refused */
            return;
        }
        size_t n = room < len ? (size_t)room : len;
        vhd_log_write(vr->log, gpa, n);
        p += n;
        len -= n;
    }
}

void vhd_vring_log_iov_slow(vhd_vring *vr, const struct iovec *iov, int n, size_t len)
{
    for (int i = 0; i < n && len > 0; i++) {
        size_t k = iov[i].iov_len < len ? iov[i].iov_len : len;
        vhd_vring_log_hva_slow(vr, iov[i].iov_base, k);
        len -= k;
    }
}

/* Used ring writes are logged at log_guest_addr (SET_VRING_ADDR), which
 * may differ from where our translation of the ring's address points. */
static inline void log_used(vhd_vring *vr, const void *field, size_t len)
{
    if (__builtin_expect(vr->log_used, 0))
        vhd_log_write(vr->log, vr->log_used_gpa + (uint64_t)((const uint8_t *)field - (const uint8_t *)vr->used), len);
}

/* The same for the packed ring's device area (vr->used points to it). */
void vhd_vring_log_used(vhd_vring *vr, const void *field, size_t len)
{
    log_used(vr, field, len);
}

void vhd_vring_push(vhd_vring *vr, uint16_t head, uint32_t len)
{
    if (vr->packed) {
        vhd_packed_push(vr, head, len);
        return;
    }
    /* Resubmitted chains plus a full ring of new ones can exceed the list
     * between two flushes: publish what came before this head rather than
     * overflow.  (Before it: a flush after it would clear the marks of the
     * heads listed so far but not of this one, and leave it marked in
     * flight though published.) */
    if (vr->inflight && vr->n_unpublished == vr->num)
        vhd_vring_flush(vr);
    struct vring_used_elem *e = &vr->used->ring[vr->used_idx & vr->mask];
    __atomic_store_n(&e->id, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n(&e->len, len, __ATOMIC_RELAXED);
    log_used(vr, e, sizeof(*e));
    vr->used_idx++;
    if (vr->inflight)
        vr->unpublished[vr->n_unpublished++] = head;
}

/* After used->idx covers them, the heads are no longer in flight. */
static void inflight_published(vhd_vring *vr)
{
    struct vhd_inflight_region *reg = vr->inflight;
    for (uint32_t i = 0; i < vr->n_unpublished; i++)
        __atomic_store_n(&reg->desc[vr->unpublished[i]].inflight, 0, __ATOMIC_RELEASE);
    vr->n_unpublished = 0;
    __atomic_store_n(&reg->used_idx, vr->used_idx, __ATOMIC_RELEASE);
}

/* Not for rings with inflight tracking (only net RX gives chains back). */
void vhd_vring_unpop(vhd_vring *vr, uint16_t n)
{
    if (vr->packed) {
        vhd_packed_unpop(vr, n);
        return;
    }
    vr->last_avail_idx = (uint16_t)(vr->last_avail_idx - n);
}

/* virtio 1.2 2.7.10: notify iff new_idx passed event_idx since old_idx. */
static bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static bool need_call(vhd_vring *vr)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vr->event_idx)
        return !(vhd_load16(&vr->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t used_event = vhd_load16(&vr->avail->ring[vr->num]);
    uint16_t old = vr->signalled_used;
    bool valid = vr->signalled_used_valid;
    vr->signalled_used = vr->used_idx;
    vr->signalled_used_valid = true;
    return !valid || vring_need_event(used_event, vr->used_idx, old);
}

void vhd_vring_flush(vhd_vring *vr)
{
    if (vr->packed) {
        vhd_packed_flush(vr);
        return;
    }
    vr->published_bytes = vr->stats.bytes_read + vr->stats.bytes_written;
    if (vr->published_idx == vr->used_idx)
        return;
    __atomic_store_n(&vr->used->idx, vr->used_idx, __ATOMIC_RELEASE);
    log_used(vr, &vr->used->idx, sizeof(vr->used->idx));
    vr->published_idx = vr->used_idx;
    if (vr->inflight)
        inflight_published(vr);
    vr->stats.batches++;
    if (vr->call_fd >= 0 && need_call(vr)) {
        eventfd_write(vr->call_fd, 1);
        vr->stats.calls++;
    }
}

/* 128 KiB: ~10 us of copying here.  A QD8 stream of 128 KiB reads from the
 * page cache went from 58k to ~80k IOPS (front-end no longer idle while the
 * worker copied the whole batch); 4 KiB batches are flushed as before. */
#define VHD_FLUSH_BYTES (128u * 1024u)

void vhd_vring_flush_if_big(vhd_vring *vr)
{
    if (vr->stats.bytes_read + vr->stats.bytes_written - vr->published_bytes >= VHD_FLUSH_BYTES)
        vhd_vring_flush(vr);
}

static uint16_t *avail_event(vhd_vring *vr)
{
    return (uint16_t *)&vr->used->ring[vr->num];
}

void vhd_vring_disable_notify(vhd_vring *vr)
{
    if (vr->packed) {
        vhd_packed_disable_notify(vr);
        return;
    }
    if (!vr->event_idx) {
        vhd_store16(&vr->used->flags, VRING_USED_F_NO_NOTIFY);
        log_used(vr, &vr->used->flags, sizeof(uint16_t));
        return;
    }
    /* The driver kicks when its new avail idx passes avail_event: one
     * behind what we have seen means no publish of ours can trigger a kick
     * (vring_need_event is false for every new idx until it wraps). */
    vhd_store16(avail_event(vr), (uint16_t)(vr->last_avail_idx - 1));
    log_used(vr, avail_event(vr), sizeof(uint16_t));
}

int vhd_vring_enable_notify(vhd_vring *vr)
{
    if (vr->packed)
        return vhd_packed_enable_notify(vr);
    if (vr->event_idx) {
        vhd_store16(avail_event(vr), vr->last_avail_idx);
        log_used(vr, avail_event(vr), sizeof(uint16_t));
    } else {
        vhd_store16(&vr->used->flags, 0);
        log_used(vr, &vr->used->flags, sizeof(uint16_t));
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

/* A busy (or hostile) driver can keep a drain loop going forever; the
 * worker must still see its stop request.  After this many chains in one
 * call the loop returns with vr->more set, and the worker comes back to
 * it after checking for stop (without sleeping). */
/* One turn: four rings' worth for small rings (a turn then drains a ring
 * and its re-pops), one ring's worth past 1024 entries, so that a flooded
 * large ring holds a shared worker no longer than its neighbours need. */
bool vhd_vring_over_budget(vhd_vring *vr, int done)
{
    uint32_t budget = vr->num <= 256 ? 4 * vr->num : (vr->num > 1024 ? vr->num : 1024);
    if ((uint32_t)done < budget)
        return false;
    vr->more = true;
    return true;
}

int vhd_vring_pending(const vhd_vring *vr)
{
    if (vr->packed)
        return vhd_packed_pending(vr);
    /* Resubmits count: a back-end whose slots were full when it stopped
     * must come back for them even if the driver adds nothing new. */
    return vr->resubmit_pos < vr->n_resubmit ||
           __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

uint16_t vhd_vring_last_avail_idx(const vhd_vring *vr)
{
    if (vr->packed)
        return (uint16_t)(vr->last_avail_idx | (vr->pk->avail_wrap ? VRING_PACKED_EVENT_WRAP : 0));
    return vr->last_avail_idx;
}

uint16_t vhd_vring_used_idx(const vhd_vring *vr)
{
    if (vr->packed)
        return (uint16_t)(vr->used_idx | (vr->pk->used_wrap ? VRING_PACKED_EVENT_WRAP : 0));
    return vr->used_idx;
}

uint32_t vhd_vring_base(const vhd_vring *vr)
{
    if (vr->packed)
        return vhd_vring_last_avail_idx(vr) | (uint32_t)vhd_vring_used_idx(vr) << 16;
    return vr->last_avail_idx;
}

int vhd_vring_is_packed(const vhd_vring *vr)
{
    return vr->packed;
}

const struct vhd_vring_stats *vhd_vring_stats(const vhd_vring *vr)
{
    return &vr->stats;
}

int vhd_vring_drain(vhd_vring *vr, vhd_chain_handler handler, void *ctx, int batch_max)
{
    struct vhd_chain chain;
    int total = 0;
    for (;;) {
        if (vhd_vring_over_budget(vr, total))
            return total;
        vhd_vring_disable_notify(vr);
        int batch = 0;
        int rc = VHD_POP_OK;
        bool throttled = false;
        while (batch < batch_max && !(throttled = !vhd_qos_may_pop(vr)) &&
               (rc = vhd_vring_pop(vr, &chain)) == VHD_POP_OK) {
            handler(ctx, vr, &chain);
            batch++;
        }
        total += batch;
        vhd_vring_flush(vr);
        if (rc < 0 || throttled)
            return total;   /* broken: err_fd was signalled, stay quiet; throttled: kicks stay off */
        if (batch == batch_max)
            continue;
        if (!vhd_vring_enable_notify(vr))
            return total;   /* idle until the next kick (lost-wake-up checked) */
    }
}

int vhd_vring_take_more(vhd_vring *vr)
{
    bool more = vr->more;
    vr->more = false;
    return more;
}
