/* Packed virtqueue processing (virtio 1.2 section 2.8), device side: the
 * packed implementations behind the vhd_vring_* entry points (vring.c).
 *
 * One ring of 16-byte descriptors is shared both ways.  The driver makes a
 * chain available by writing its descriptors in ring order (NEXT links to
 * the following slot, wrapping) and storing the head's flags last, with
 * AVAIL = its wrap counter and USED = the opposite.  The device writes one
 * used descriptor per buffer (id of the chain, bytes written) at its own
 * used position, with AVAIL = USED = its used wrap counter, and moves that
 * position on by the number of ring descriptors the chain took (the driver
 * does the same when it reads the used descriptor).  Buffers may complete
 * in any order: the buffer id says which.
 *
 * Memory ordering, as in vring.c:
 * - The head descriptor's flags are loaded with acquire; the rest of the
 *   chain (written before them) is read after.
 * - A batch of used descriptors is published by one release store of its
 *   first descriptor's flags; the others (id, len, flags) are written before
 *   it, so the driver, which reads used descriptors in ring order, sees
 *   all of them complete once it sees the first.
 * - A full fence separates "publish / re-enable kicks" from "read the
 *   driver's event suppression / re-check the next descriptor".
 * Every guest field is read once into a local (the head's flags exactly
 * once, at the availability check).
 *
 * Hardening, as for split rings: a chain is at most one ring long, buffer
 * ids are below the ring size and unique among buffers in flight, every
 * address goes through the memory table, and a guest breaking a rule gets
 * the ring broken with a VHD_ERR_* reason.
 *
 * Dirty logging: used descriptors are written into the descriptor ring,
 * which is not where VHOST_VRING_F_LOG's log_guest_addr points (QEMU gives
 * the device area there), so they are logged by address translation;
 * device area writes are logged at log_guest_addr like a split used ring.
 *
 * Inflight tracking follows vhost-user.rst's packed procedure: each popped
 * ring descriptor is copied into a DescStatePacked entry taken from the
 * region's free list (a packed ring slot may be overwritten by another
 * buffer's used descriptor while its own chain is still in flight), and a
 * batch of completions is committed by the same release store that
 * publishes it, with old_* recording the state before the batch. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "vhd.h"

#define F_AVAIL VRING_PACKED_DESC_F_AVAIL
#define F_USED VRING_PACKED_DESC_F_USED

uint64_t vhd_inflight_queue_size_packed(uint32_t queue_size)
{
    uint64_t n = sizeof(struct vhd_inflight_region_packed) +
                 (uint64_t)queue_size * sizeof(struct vhd_inflight_desc_packed);
    return (n + 63) & ~(uint64_t)63;
}

/* Available in the driver's lap `wrap`: AVAIL == wrap, USED != wrap. */
static inline bool desc_avail(uint16_t flags, bool wrap)
{
    return ((flags & F_AVAIL) != 0) == wrap && ((flags & F_USED) != 0) != wrap;
}

/* AVAIL == USED == the driver's wrap counter: "used in this lap" where the
 * device has not been yet.  Neither the driver (which always writes the two
 * bits opposite) nor the device (whose used descriptors there are a lap
 * behind) leaves this; a driver that flipped a wrap counter does. */
static inline bool desc_used_ahead(uint16_t flags, bool wrap)
{
    return ((flags & F_AVAIL) != 0) == wrap && ((flags & F_USED) != 0) == wrap;
}

static inline uint16_t used_flags(bool wrap)
{
    return wrap ? (uint16_t)(F_AVAIL | F_USED) : 0;
}

void vhd_packed_release(vhd_vring *vr)
{
    if (!vr->pk)
        return;
    free(vr->pk->id_ndesc);
    free(vr->pk->id_entry);
    free(vr->pk->batch_ids);
    free(vr->pk);
    vr->pk = NULL;
}

static bool aligned(const void *p, uintptr_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

static int inflight_setup(vhd_vring *vr, struct vhd_inflight_region_packed *reg, uint16_t used_base);

int vhd_packed_setup(vhd_vring *vr, const vhd_mem *mem, const struct vhd_vring_config *cfg)
{
    uint64_t n = cfg->num;
    if (n == 0 || n > VHD_MAX_QUEUE_SIZE)
        return -EINVAL;
    uint16_t avail_pos = cfg->last_avail_idx & 0x7fff, used_pos = cfg->used_base & 0x7fff;
    if (avail_pos >= n || used_pos >= n)
        return -EINVAL;
    void *desc = vhd_mem_uva_to_hva(mem, cfg->desc_uva, 16 * n);
    void *driver = vhd_mem_uva_to_hva(mem, cfg->avail_uva, sizeof(struct vring_packed_event));
    void *device = vhd_mem_uva_to_hva(mem, cfg->used_uva, sizeof(struct vring_packed_event));
    if (!desc || !driver || !device)
        return -EFAULT;
    if (!aligned(desc, 16) || !aligned(driver, 4) || !aligned(device, 4))
        return -EINVAL;
    /* Our event suppression writes laid over the descriptors could make
     * descriptors available: the device would feed itself work. */
    bool bad_layout = vhd_ranges_overlap(cfg->used_uva, 4, cfg->desc_uva, 16 * n) ||
                      vhd_ranges_overlap(cfg->used_uva, 4, cfg->avail_uva, 4);
    struct vhd_packed *pk = calloc(1, sizeof(*pk));
    uint32_t *id_ndesc = calloc(n, sizeof(uint32_t));
    uint16_t *id_entry = calloc(n, sizeof(uint16_t));
    uint16_t *batch_ids = calloc(n, sizeof(uint16_t));
    if (!pk || !id_ndesc || !id_entry || !batch_ids) {
        free(pk);
        free(id_ndesc);
        free(id_entry);
        free(batch_ids);
        return -ENOMEM;
    }
    vhd_vring_reset(vr, mem);
    vr->packed = true;
    vr->pk = pk;
    pk->id_ndesc = id_ndesc;
    pk->id_entry = id_entry;
    pk->batch_ids = batch_ids;
    pk->desc = desc;
    pk->driver = driver;
    pk->device = device;
    pk->device_flags = UINT32_MAX;
    vr->used = device;             /* log_used() offsets are from here */
    vr->desc_uva = cfg->desc_uva;
    vr->avail_uva = cfg->avail_uva;
    vr->used_uva = cfg->used_uva;
    vr->num = (uint32_t)n;
    vr->mask = (uint32_t)n - 1;   /* unused: n need not be a power of two */
    vr->last_avail_idx = avail_pos;
    pk->avail_wrap = cfg->last_avail_idx >> 15;
    vr->used_idx = used_pos;
    pk->used_wrap = cfg->used_base >> 15;
    vr->published_idx = vr->used_idx;
    vhd_vring_take_options(vr, cfg);
    if (bad_layout) {
        vhd_vring_set_broken(vr, VHD_ERR_LAYOUT);
        return 0;
    }
    if (cfg->inflight)
        return inflight_setup(vr, cfg->inflight, cfg->used_base);
    return 0;
}

int vhd_packed_set_mem(vhd_vring *vr, const vhd_mem *mem)
{
    struct vhd_packed *pk = vr->pk;
    if (vhd_mem_uva_to_hva(mem, vr->desc_uva, 16 * (uint64_t)vr->num) != (void *)pk->desc ||
        vhd_mem_uva_to_hva(mem, vr->avail_uva, sizeof(struct vring_packed_event)) != (void *)pk->driver ||
        vhd_mem_uva_to_hva(mem, vr->used_uva, sizeof(struct vring_packed_event)) != (void *)pk->device)
        return -EFAULT;
    vr->mem = mem;
    return 0;
}

/* --- popping ------------------------------------------------------------------ */

/* An indirect table entry, read once (tables need not be aligned). */
static void read_indirect(const struct vring_packed_desc *src, struct vring_packed_desc *d)
{
    if (aligned(src, 8)) {
        d->addr = __atomic_load_n(&src->addr, __ATOMIC_RELAXED);
        d->len = __atomic_load_n(&src->len, __ATOMIC_RELAXED);
        d->flags = __atomic_load_n(&src->flags, __ATOMIC_RELAXED);
        return;
    }
    vhd_read_guest_bytes(d, src, sizeof(*d));
}

/* One ring-level descriptor (already read): a buffer, or an indirect table
 * (virtio 1.2 2.8.19: entries follow each other, the table's length says
 * how many; only WRITE counts in them, NEXT and the id are ignored). */
static int take_desc(const vhd_vring *vr, struct vhd_walk_buffers *w, struct vhd_chain *c, const struct vring_packed_desc *d)
{
    if (!(d->flags & VRING_DESC_F_INDIRECT))
        return vhd_chain_add_buffer(vr, w, c, d->addr, d->len, d->flags & VRING_DESC_F_WRITE);
    if (!vr->indirect || (d->flags & VRING_DESC_F_NEXT))
        return VHD_ERR_INDIRECT;
    if (d->len == 0 || d->len % sizeof(struct vring_packed_desc) != 0)
        return VHD_ERR_INDIRECT;
    const struct vring_packed_desc *table = vhd_mem_gpa_to_hva(vr->mem, d->addr, d->len);
    if (!table)
        return VHD_ERR_ADDR;
    uint32_t n = d->len / sizeof(struct vring_packed_desc);
    for (uint32_t i = 0; i < n; i++) {
        struct vring_packed_desc e;
        read_indirect(&table[i], &e);
        if (e.flags & VRING_DESC_F_INDIRECT)
            return VHD_ERR_INDIRECT;    /* nested */
        int rc = vhd_chain_add_buffer(vr, w, c, e.addr, e.len, e.flags & VRING_DESC_F_WRITE);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int fail(vhd_vring *vr, int rc)
{
    vhd_vring_set_broken(vr, rc);
    return rc;
}

/* The buffer id of a chain of ndesc ring descriptors becomes in flight.
 * An id stays taken until the driver can have seen it used (the batch is
 * published): a driver cannot know before that it may reuse it. */
static int claim_id(vhd_vring *vr, uint16_t id, uint32_t ndesc)
{
    if (id >= vr->num)
        return VHD_ERR_HEAD;
    if (vr->pk->id_ndesc[id])
        return VHD_ERR_ID;
    vr->pk->id_ndesc[id] = ndesc;
    return 0;
}

static void remember_pop(struct vhd_packed *pk, uint16_t pos, bool wrap, uint16_t id)
{
    pk->hist[pk->hist_head] = (struct vhd_pop_rec){ .pos = pos, .id = id, .wrap = wrap };
    pk->hist_head = (pk->hist_head + 1) % VHD_PACKED_UNPOP_MAX;
    if (pk->hist_n < VHD_PACKED_UNPOP_MAX)
        pk->hist_n++;
}

static int pop_resubmit(vhd_vring *vr, struct vhd_chain *c);

int vhd_packed_pop(vhd_vring *vr, struct vhd_chain *c)
{
    struct vhd_packed *pk = vr->pk;
    if (vr->stats.broken)
        return (int)vr->stats.broken;
    if (vr->resubmit_pos < vr->n_resubmit)
        return pop_resubmit(vr, c);
    uint16_t pos = (uint16_t)vr->last_avail_idx;
    bool wrap = pk->avail_wrap;
    uint16_t flags = __atomic_load_n(&pk->desc[pos].flags, __ATOMIC_ACQUIRE);
    if (!desc_avail(flags, wrap))
        return desc_used_ahead(flags, wrap) ? fail(vr, VHD_ERR_WRAP) : VHD_POP_EMPTY;
    struct vhd_inflight_region_packed *reg = pk->inflight;
    uint16_t entry = 0, last = 0, cursor = reg ? reg->free_head : 0;
    struct vhd_walk_buffers w = { 0 };
    c->n_out = c->n_in = 0;
    uint32_t ndesc = 0;
    uint16_t id = 0;
    for (;;) {
        /* A chain takes at most every slot of the ring once. */
        if (++ndesc > vr->num)
            return fail(vr, VHD_ERR_CHAIN_LEN);
        const struct vring_packed_desc *s = &pk->desc[pos];
        struct vring_packed_desc d;
        d.addr = __atomic_load_n(&s->addr, __ATOMIC_RELAXED);
        d.len = __atomic_load_n(&s->len, __ATOMIC_RELAXED);
        d.id = __atomic_load_n(&s->id, __ATOMIC_RELAXED);
        d.flags = ndesc == 1 ? flags : __atomic_load_n(&s->flags, __ATOMIC_RELAXED);
        int rc = take_desc(vr, &w, c, &d);
        if (rc < 0)
            return fail(vr, rc);
        if (reg) {
            /* Copied as read, into the free list's next entry. */
            if (cursor >= vr->num)
                return fail(vr, VHD_ERR_INFLIGHT);
            struct vhd_inflight_desc_packed *e = &reg->desc[cursor];
            if (ndesc > 1)
                e->inflight = 0;
            e->addr = d.addr;
            e->len = d.len;
            e->id = d.id;
            e->flags = d.flags;
            if (ndesc == 1)
                entry = cursor;
            last = cursor;
            cursor = e->next;
        }
        id = d.id;    /* the buffer id is the last descriptor's */
        if (++pos == vr->num) {
            pos = 0;
            wrap = !wrap;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
    }
    int rc = claim_id(vr, id, ndesc);
    if (rc < 0)
        return fail(vr, rc);
    c->head = id;
    c->out_len = (uint32_t)w.out_len;
    c->in_len = (uint32_t)w.in_len;
    if (reg) {
        struct vhd_inflight_desc_packed *h = &reg->desc[entry];
        h->num = (uint16_t)ndesc;
        h->last = last;
        h->counter = ++vr->inflight_counter;
        reg->free_head = cursor;
        __atomic_store_n(&h->inflight, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&reg->old_free_head, cursor, __ATOMIC_RELEASE);
        pk->id_entry[id] = entry;
    }
    remember_pop(pk, (uint16_t)vr->last_avail_idx, pk->avail_wrap, id);
    vr->last_avail_idx = pos;
    pk->avail_wrap = wrap;
    return VHD_POP_OK;
}

/* Requests in flight when the previous back-end died, from their copies in
 * the inflight region (their ring slots may hold other descriptors now). */
static int pop_resubmit(vhd_vring *vr, struct vhd_chain *c)
{
    struct vhd_packed *pk = vr->pk;
    struct vhd_inflight_region_packed *reg = pk->inflight;
    uint16_t entry = vr->resubmit[vr->resubmit_pos++];
    uint16_t ndesc = reg->desc[entry].num;
    struct vhd_walk_buffers w = { 0 };
    c->n_out = c->n_in = 0;
    uint16_t cur = entry, id = 0;
    for (uint16_t k = 0; k < ndesc; k++) {
        if (cur >= vr->num)
            return fail(vr, VHD_ERR_INFLIGHT);
        const struct vhd_inflight_desc_packed *e = &reg->desc[cur];
        struct vring_packed_desc d = { .addr = e->addr, .len = e->len, .id = e->id, .flags = e->flags };
        int rc = take_desc(vr, &w, c, &d);
        if (rc < 0)
            return fail(vr, rc);
        id = d.id;
        cur = e->next;
    }
    int rc = claim_id(vr, id, ndesc);
    if (rc < 0)
        return fail(vr, rc);
    pk->id_entry[id] = entry;
    c->head = id;
    c->out_len = (uint32_t)w.out_len;
    c->in_len = (uint32_t)w.in_len;
    return VHD_POP_OK;
}

/* Not for rings with inflight tracking (only net RX gives chains back). */
void vhd_packed_unpop(vhd_vring *vr, uint16_t n)
{
    struct vhd_packed *pk = vr->pk;
    if (n > pk->hist_n)
        n = (uint16_t)pk->hist_n;    /* a device bug: give back what we know */
    for (uint16_t k = 0; k < n; k++) {
        pk->hist_head = (pk->hist_head + VHD_PACKED_UNPOP_MAX - 1) % VHD_PACKED_UNPOP_MAX;
        const struct vhd_pop_rec *r = &pk->hist[pk->hist_head];
        pk->id_ndesc[r->id] = 0;
        vr->last_avail_idx = r->pos;
        pk->avail_wrap = r->wrap;
    }
    pk->hist_n -= n;
}

/* --- completing ---------------------------------------------------------------- */

static inline void log_desc(vhd_vring *vr, const void *p, size_t len)
{
    vhd_vring_log_hva(vr, p, len);
}

void vhd_packed_push(vhd_vring *vr, uint16_t id, uint32_t len)
{
    struct vhd_packed *pk = vr->pk;
    if (id >= vr->num || pk->id_ndesc[id] == 0 || (pk->id_ndesc[id] & VHD_PACKED_PUSHED))
        return;    /* not in flight: a device bug, never the guest's doing */
    uint16_t pos = (uint16_t)vr->used_idx;
    struct vring_packed_desc *d = &pk->desc[pos];
    __atomic_store_n(&d->id, id, __ATOMIC_RELAXED);
    __atomic_store_n(&d->len, len, __ATOMIC_RELAXED);
    uint16_t flags = used_flags(pk->used_wrap);
    if (pk->batch_n == 0) {
        pk->batch_pos = pos;         /* its flags go last, at flush */
        pk->batch_flags = flags;
    } else {
        __atomic_store_n(&d->flags, flags, __ATOMIC_RELAXED);
    }
    pk->batch_ids[pk->batch_n++] = id;
    log_desc(vr, d, sizeof(*d));
    uint32_t next = pos + pk->id_ndesc[id];
    pk->id_ndesc[id] |= VHD_PACKED_PUSHED;
    if (next >= vr->num) {
        next -= vr->num;
        pk->used_wrap = !pk->used_wrap;
    }
    vr->used_idx = (uint16_t)next;
    if (pk->inflight)
        vr->unpublished[vr->n_unpublished++] = id;
}

/* vhost-user.rst, "When supplying used buffers": steps 1-5 before the
 * batch is published (the chains' entries go back to the free list, the
 * region's used index moves), 7-8 after (inflight cleared, old_* = now).
 * A restart between the two finds used_idx != old_used_idx and decides by
 * the ring whether the publish happened (inflight_setup). */
static void inflight_complete_begin(vhd_vring *vr)
{
    struct vhd_packed *pk = vr->pk;
    struct vhd_inflight_region_packed *reg = pk->inflight;
    for (uint32_t i = 0; i < vr->n_unpublished; i++) {
        uint16_t e = pk->id_entry[vr->unpublished[i]];
        reg->desc[reg->desc[e].last].next = reg->free_head;
        reg->free_head = e;
    }
    reg->used_idx = (uint16_t)vr->used_idx;
    reg->used_wrap_counter = pk->used_wrap;
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void inflight_complete_end(vhd_vring *vr)
{
    struct vhd_packed *pk = vr->pk;
    struct vhd_inflight_region_packed *reg = pk->inflight;
    for (uint32_t i = 0; i < vr->n_unpublished; i++)
        __atomic_store_n(&reg->desc[pk->id_entry[vr->unpublished[i]]].inflight, 0, __ATOMIC_RELEASE);
    vr->n_unpublished = 0;
    reg->old_free_head = reg->free_head;
    reg->old_used_wrap_counter = reg->used_wrap_counter;
    __atomic_store_n(&reg->old_used_idx, reg->used_idx, __ATOMIC_RELEASE);
}

/* virtio 1.2 2.8.10 with EVENT_IDX: notify iff the used position passed
 * the driver's event offset since the last notification check (positions
 * are below the ring size; a wrap counter tells the laps apart). */
static bool need_call(vhd_vring *vr)
{
    struct vhd_packed *pk = vr->pk;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = __atomic_load_n((const uint32_t *)pk->driver, __ATOMIC_RELAXED);
    uint16_t off_wrap = (uint16_t)ev, flags = (uint16_t)(ev >> 16);
    uint16_t old = vr->signalled_used, new = (uint16_t)vr->used_idx;
    bool valid = vr->signalled_used_valid;
    vr->signalled_used = new;
    vr->signalled_used_valid = true;
    if (flags == VRING_PACKED_EVENT_F_DISABLE)
        return false;
    if (flags != VRING_PACKED_EVENT_F_DESC || !vr->event_idx)
        return true;
    if (!valid)
        return true;
    int32_t o = old, n = new, off = off_wrap & 0x7fff;
    if (n <= o)
        o -= (int32_t)vr->num;
    if ((bool)(off_wrap >> 15) != pk->used_wrap)
        off -= (int32_t)vr->num;
    /* vring_need_event(off, n, o), in ints: n - off - 1 < n - o. */
    return (uint16_t)(n - off - 1) < (uint16_t)(n - o);
}

void vhd_packed_flush(vhd_vring *vr)
{
    struct vhd_packed *pk = vr->pk;
    vr->published_bytes = vr->stats.bytes_read + vr->stats.bytes_written;
    if (pk->batch_n == 0)
        return;
    if (pk->inflight)
        inflight_complete_begin(vr);
    struct vring_packed_desc *first = &pk->desc[pk->batch_pos];
    __atomic_store_n(&first->flags, pk->batch_flags, __ATOMIC_RELEASE);
    log_desc(vr, &first->flags, sizeof(first->flags));
    if (pk->inflight)
        inflight_complete_end(vr);
    for (uint32_t i = 0; i < pk->batch_n; i++)
        pk->id_ndesc[pk->batch_ids[i]] = 0;     /* the driver may reuse them now */
    pk->batch_n = 0;
    vr->published_idx = vr->used_idx;
    vr->stats.batches++;
    if (vr->call_fd >= 0 && need_call(vr)) {
        eventfd_write(vr->call_fd, 1);
        vr->stats.calls++;
    }
}

/* --- notifications -------------------------------------------------------------- */

static void set_device_event(vhd_vring *vr, uint16_t flags)
{
    struct vhd_packed *pk = vr->pk;
    if (vr->stats.broken)
        return;    /* a broken ring is left alone (its layout may be why) */
    if (pk->device_flags == flags && flags != VRING_PACKED_EVENT_F_DESC)
        return;
    if (flags == VRING_PACKED_EVENT_F_DESC) {
        uint16_t off = (uint16_t)(vr->last_avail_idx | (pk->avail_wrap ? VRING_PACKED_EVENT_WRAP : 0));
        vhd_store16(&pk->device->off_wrap, off);
        vhd_vring_log_used(vr, &pk->device->off_wrap, sizeof(uint16_t));
    }
    if (pk->device_flags != flags) {
        vhd_store16(&pk->device->flags, flags);
        vhd_vring_log_used(vr, &pk->device->flags, sizeof(uint16_t));
        pk->device_flags = flags;
    }
}

void vhd_packed_disable_notify(vhd_vring *vr)
{
    set_device_event(vr, VRING_PACKED_EVENT_F_DISABLE);
}

int vhd_packed_enable_notify(vhd_vring *vr)
{
    /* With EVENT_IDX: a kick once the driver makes the next descriptor
     * available (the one at last_avail_idx in this lap). */
    set_device_event(vr, vr->event_idx ? VRING_PACKED_EVENT_F_DESC : VRING_PACKED_EVENT_F_ENABLE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vhd_packed_pending(vr);
}

int vhd_packed_pending(const vhd_vring *vr)
{
    const struct vhd_packed *pk = vr->pk;
    if (vr->resubmit_pos < vr->n_resubmit)
        return 1;
    uint16_t flags = __atomic_load_n(&pk->desc[vr->last_avail_idx].flags, __ATOMIC_ACQUIRE);
    /* A flipped wrap counter counts as pending: the pop breaks the ring. */
    return desc_avail(flags, pk->avail_wrap) || desc_used_ahead(flags, pk->avail_wrap);
}

/* --- inflight tracking ----------------------------------------------------------- */

static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct vhd_inflight_desc_packed *d = arg;
    uint64_t x = d[*(const uint16_t *)a].counter, y = d[*(const uint16_t *)b].counter;
    return x < y ? -1 : x > y;
}

static void inflight_init(struct vhd_inflight_region_packed *reg, uint32_t num, uint16_t used_pos, bool used_wrap)
{
    memset(reg->desc, 0, num * sizeof(reg->desc[0]));
    for (uint32_t i = 0; i < num; i++)
        reg->desc[i].next = (uint16_t)(i + 1);
    reg->desc_num = (uint16_t)num;
    reg->free_head = reg->old_free_head = 0;
    reg->used_idx = reg->old_used_idx = used_pos;
    reg->used_wrap_counter = reg->old_used_wrap_counter = used_wrap;
    __atomic_store_n(&reg->version, 1, __ATOMIC_RELEASE);
}

/* vhost-user.rst, "When reconnecting" (packed): commit or roll back the
 * batch a crash interrupted, clear the marks of free entries, and list the
 * chains still in flight in pop order.  The region, not SET_VRING_BASE, is
 * the truth after a crash: QEMU cannot know where a packed ring stood
 * (nothing in guest memory says) and sends what it last knew. */
static int inflight_setup(vhd_vring *vr, struct vhd_inflight_region_packed *reg, uint16_t used_base)
{
    struct vhd_packed *pk = vr->pk;
    uint32_t num = vr->num;
    vr->unpublished = calloc(num, sizeof(uint16_t));
    vr->resubmit = calloc(num, sizeof(uint16_t));
    uint8_t *free_entry = calloc(num, 1);
    if (!vr->unpublished || !vr->resubmit || !free_entry) {
        free(free_entry);
        return -ENOMEM;
    }
    pk->inflight = reg;
    bool sane = reg->version == 1 && reg->desc_num == num && reg->free_head <= num &&
                reg->old_free_head <= num && reg->used_idx < num && reg->old_used_idx < num &&
                reg->used_wrap_counter <= 1 && reg->old_used_wrap_counter <= 1;
    if (!sane) {
        /* A new region (zeroed), or one for another ring size: nothing in flight. */
        inflight_init(reg, num, (uint16_t)(used_base & 0x7fff), used_base >> 15);
        free(free_entry);
        return 0;
    }
    if (reg->used_idx != reg->old_used_idx) {
        /* A batch was being published: did its first descriptor's flags go out? */
        uint16_t f = __atomic_load_n(&pk->desc[reg->old_used_idx].flags, __ATOMIC_ACQUIRE);
        if (!desc_avail(f, reg->old_used_wrap_counter)) {
            reg->old_free_head = reg->free_head;
            reg->old_used_idx = reg->used_idx;
            reg->old_used_wrap_counter = reg->used_wrap_counter;
        }
    }
    reg->free_head = reg->old_free_head;
    reg->used_idx = reg->old_used_idx;
    reg->used_wrap_counter = reg->old_used_wrap_counter;
    /* Free entries are not in flight (an interrupted pop or a committed batch). */
    uint16_t i = reg->free_head;
    for (uint32_t k = 0; k < num && i < num && !free_entry[i]; k++) {
        free_entry[i] = 1;
        __atomic_store_n(&reg->desc[i].inflight, 0, __ATOMIC_RELAXED);
        i = reg->desc[i].next;
    }
    uint64_t max_counter = 0, total = 0;
    bool consistent = true;
    for (uint32_t e = 0; e < num; e++) {
        if (free_entry[e] || reg->desc[e].inflight != 1)
            continue;
        vr->resubmit[vr->n_resubmit++] = (uint16_t)e;
        total += reg->desc[e].num;
        if (reg->desc[e].counter > max_counter)
            max_counter = reg->desc[e].counter;
        /* Its entries: 1..num of them, none free or another chain's. */
        uint16_t n = reg->desc[e].num, cur = (uint16_t)e, last = cur;
        consistent &= n >= 1 && n <= num;
        for (uint16_t k = 0; consistent && k < n; k++) {
            consistent = cur < num && free_entry[cur] != 1 && free_entry[cur] != 2;
            if (consistent) {
                free_entry[cur] = 2;
                /* Only heads carry the mark: a stale one on a member would
                 * outlive the chain's completion (it frees the head's only). */
                if (k > 0)
                    __atomic_store_n(&reg->desc[cur].inflight, 0, __ATOMIC_RELAXED);
                last = cur;
                cur = reg->desc[cur].next;
            }
        }
        reg->desc[e].last = last;     /* where its completion links the free list on */
    }
    free(free_entry);
    qsort_r(vr->resubmit, vr->n_resubmit, sizeof(uint16_t), cmp_counter, reg->desc);
    vr->inflight_counter = max_counter;
    vr->used_idx = reg->used_idx;
    pk->used_wrap = reg->used_wrap_counter;
    vr->published_idx = vr->used_idx;
    vr->stats.resubmitted += vr->n_resubmit;
    if (total > num || !consistent) {
        vhd_vring_set_broken(vr, VHD_ERR_INFLIGHT);
        return 0;
    }
    /* Every popped chain is used or in flight: the next to pop follows them all. */
    uint32_t pos = vr->used_idx + (uint32_t)total;
    bool wrap = pk->used_wrap;
    if (pos >= num) {
        pos -= num;
        wrap = !wrap;
    }
    vr->last_avail_idx = (uint16_t)pos;
    pk->avail_wrap = wrap;
    return 0;
}
