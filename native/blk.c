/* virtio-blk requests (virtio 1.2 section 5.2.6) on a file or block device.
 *
 * A request is: a 16-byte device-readable header, data, and a one-byte
 * device-writable status at the very end of the chain.  The header may be
 * split over several buffers; the data go straight between guest memory
 * and the file with preadv/pwritev (no copy in user space). */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhd.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1u
#define SECTOR_SIZE 512u

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

/* DISCARD / WRITE_ZEROES payload: an array of these (virtio 1.2 5.2.6). */
struct virtio_blk_discard_write_zeroes {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

vhd_blk *vhd_blk_new(int fd, int buffered_fd, uint64_t capacity_sectors, int readonly,
                     const char *serial, uint32_t serial_len)
{
    vhd_blk *blk = calloc(1, sizeof(*blk));
    if (!blk)
        return NULL;
    blk->fd = fd;
    blk->buffered_fd = buffered_fd >= 0 ? buffered_fd : fd;
    blk->capacity = capacity_sectors;
    blk->readonly = readonly != 0;
    memcpy(blk->serial, serial, serial_len < VIRTIO_BLK_ID_BYTES ? serial_len : VIRTIO_BLK_ID_BYTES);
    return blk;
}

void vhd_blk_free(vhd_blk *blk)
{
    free(blk);
}

void vhd_blk_set_trim(vhd_blk *blk, const struct vhd_blk_trim *trim)
{
    blk->trim = *trim;
    if (blk->trim.max_discard_seg > VHD_BLK_MAX_SEG)
        blk->trim.max_discard_seg = VHD_BLK_MAX_SEG;
    if (blk->trim.max_zeroes_seg > VHD_BLK_MAX_SEG)
        blk->trim.max_zeroes_seg = VHD_BLK_MAX_SEG;
}

void vhd_blk_set_capacity(vhd_blk *blk, uint64_t capacity_sectors)
{
    __atomic_store_n(&blk->capacity, capacity_sectors, __ATOMIC_RELEASE);
}

uint64_t vhd_blk_capacity(const vhd_blk *blk)
{
    return __atomic_load_n(&blk->capacity, __ATOMIC_ACQUIRE);
}

void vhd_blk_set_writethrough(vhd_blk *blk, int writethrough)
{
    __atomic_store_n(&blk->writethrough, writethrough != 0, __ATOMIC_RELEASE);
}

/* preadv/pwritev until the whole request moved, from where it stands. */
static int rw_full(int fd, vhd_vring *vr, struct vhd_blk_req *r)
{
    bool write = r->op == VHD_BLK_OP_WRITE;
    while (r->moved < r->len) {
        off_t off = (off_t)(r->offset + r->moved);
        ssize_t n = write ? pwritev2(fd, r->iov, r->niov, off, r->rw_flags)
                          : preadv(fd, r->iov, r->niov, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;   /* EOF: the file shrank under us */
        vhd_blk_advance(vr, r, (size_t)n);
    }
    return 0;
}

/* Moves past bytes transferred by a short read or write.  A read's bytes are
 * in guest memory now: they are logged before their iovecs are dropped (the
 * rest is logged when the request completes). */
void vhd_blk_advance(vhd_vring *vr, struct vhd_blk_req *r, size_t bytes)
{
    if (r->op == VHD_BLK_OP_READ)
        vhd_vring_log_iov(vr, r->iov, r->niov, bytes);
    r->niov = vhd_iov_skip(r->iov, r->niov, bytes);
    r->moved += bytes;
}

static bool in_range(const vhd_blk *blk, uint64_t sector, uint64_t bytes)
{
    if (bytes % SECTOR_SIZE != 0)
        return false;
    uint64_t sectors = bytes / SECTOR_SIZE, capacity = vhd_blk_capacity(blk);
    return sector <= capacity && sectors <= capacity - sector;
}

/* DISCARD / WRITE_ZEROES: the segments are copied out of guest memory once
 * and checked here (virtio 1.2 5.2.6.2): more segments than offered, a
 * segment over its sector limit, reserved flag bits, or unmap on DISCARD
 * are UNSUPP; a segment past the end, or a read-only disk, is IOERR. */
static void parse_fallocate(const vhd_blk *blk, bool zeroes, const struct vhd_chain *c, size_t out_data,
                            struct vhd_blk_req *r)
{
    const struct vhd_blk_trim *t = &blk->trim;
    int mode = zeroes ? t->zeroes : t->discard;
    uint32_t max_seg = zeroes ? t->max_zeroes_seg : t->max_discard_seg;
    uint32_t max_sectors = zeroes ? t->max_zeroes_sectors : t->max_discard_sectors;
    r->result = VIRTIO_BLK_S_UNSUPP;
    if (mode == VHD_BLK_DISCARD_OFF)
        return;
    if (out_data == 0 || out_data % sizeof(struct virtio_blk_discard_write_zeroes) != 0 ||
        out_data / sizeof(struct virtio_blk_discard_write_zeroes) > max_seg)
        return;
    uint32_t n = (uint32_t)(out_data / sizeof(struct virtio_blk_discard_write_zeroes));
    struct virtio_blk_discard_write_zeroes segs[VHD_BLK_MAX_SEG];
    vhd_iov_copy_from(c->iov, c->n_out, sizeof(struct virtio_blk_outhdr), segs, out_data);
    for (uint32_t i = 0; i < n; i++) {
        const struct virtio_blk_discard_write_zeroes *d = &segs[i];
        bool unmap = d->flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        if ((d->flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) || (unmap && !zeroes) || d->num_sectors > max_sectors)
            return;
    }
    r->result = VIRTIO_BLK_S_IOERR;
    if (blk->readonly)
        return;
    for (uint32_t i = 0; i < n; i++) {
        const struct virtio_blk_discard_write_zeroes *d = &segs[i];
        if (d->sector > UINT64_MAX / SECTOR_SIZE ||
            !in_range(blk, d->sector, (uint64_t)d->num_sectors * SECTOR_SIZE))
            return;
    }
    r->nseg = 0;
    if (!zeroes && mode == VHD_BLK_DISCARD_IGNORE) {
        r->result = VIRTIO_BLK_S_OK;      /* acknowledged, nothing done */
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        const struct virtio_blk_discard_write_zeroes *d = &segs[i];
        if (d->num_sectors == 0)
            continue;
        bool punch = !zeroes || mode == VHD_BLK_ZEROES_PUNCH ||
                     (t->may_unmap && (d->flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        r->seg[r->nseg++] = (struct vhd_blk_seg){
            .offset = d->sector * SECTOR_SIZE,
            .len = (uint64_t)d->num_sectors * SECTOR_SIZE,
            .mode = punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
        };
    }
    if (r->nseg == 0) {
        r->result = VIRTIO_BLK_S_OK;      /* only empty segments */
        return;
    }
    r->op = VHD_BLK_OP_FALLOCATE;
    r->len = 0;
    r->seg_done = 0;
}

/* A DISCARD the file system cannot do is still a success: discard is a hint
 * (virtio 1.2 5.2.6.2); WRITE_ZEROES must zero. */
int vhd_blk_fallocate_result(const struct vhd_blk_seg *seg, int res)
{
    if (res == -EOPNOTSUPP && seg->mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        return 0;
    return res;
}

/* Finishes a request: status byte, counters, used element. */
void vhd_blk_complete(vhd_vring *vr, struct vhd_blk_req *r, uint8_t status)
{
    uint32_t used_len = r->status ? 1 : 0;
    if (status == VIRTIO_BLK_S_OK) {
        used_len += r->done_len;
        if (r->op == VHD_BLK_OP_READ)
            vr->stats.bytes_written += r->len;
        else if (r->op == VHD_BLK_OP_WRITE)
            vr->stats.bytes_read += r->len;
    } else {
        vr->stats.errors++;
    }
    /* What is left of a read's buffers; a failed read may still have
     * written part of them. */
    if (r->op == VHD_BLK_OP_READ)
        vhd_vring_log_iov(vr, r->iov, r->niov, r->len - r->moved);
    else if (status == VIRTIO_BLK_S_OK && r->done_len > 0)
        vhd_vring_log_iov(vr, r->iov, r->niov, r->done_len);
    if (r->status) {
        __atomic_store_n(r->status, status, __ATOMIC_RELAXED);
        vhd_vring_log_hva(vr, r->status, 1);
    }
    vhd_vring_push(vr, r->head, used_len);
}

/* Turns a chain into a request.  Requests that need no I/O (errors,
 * GET_ID) come back as VHD_BLK_OP_DONE with r->result set.  The chain's
 * iovecs are reused in place for the data, so it must outlive r. */
void vhd_blk_parse(const vhd_blk *blk, struct vhd_chain *c, struct vhd_blk_req *r)
{
    memset(r, 0, offsetof(struct vhd_blk_req, seg));   /* the segments only if needed */
    r->head = c->head;
    r->op = VHD_BLK_OP_DONE;
    r->result = VIRTIO_BLK_S_IOERR;
    if (c->in_len == 0)
        return;   /* no device-writable status byte: complete it empty */
    /* Writable iovecs are never empty (zero-length buffers add none), so the
     * status byte is the last byte of the last one. */
    struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    r->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    struct iovec *in = &c->iov[c->n_out];
    int n_in = c->n_in;
    last->iov_len--;
    if (last->iov_len == 0)
        n_in--;
    size_t in_data = c->in_len - 1u;

    struct virtio_blk_outhdr h;
    if (vhd_iov_to_buf(c->iov, c->n_out, &h, sizeof(h)) < sizeof(h))
        return;   /* short header */
    switch (h.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
        bool write = h.type == VIRTIO_BLK_T_OUT;
        size_t len = write ? c->out_len - sizeof(h) : in_data;
        if ((write && blk->readonly) || !in_range(blk, h.sector, len))
            return;
        r->op = write ? VHD_BLK_OP_WRITE : VHD_BLK_OP_READ;
        r->offset = h.sector * SECTOR_SIZE;
        r->len = len;
        if (write && __atomic_load_n(&blk->writethrough, __ATOMIC_RELAXED))
            r->rw_flags = RWF_DSYNC;
        r->done_len = write ? 0 : (uint32_t)len;
        if (write) {
            r->iov = c->iov;
            r->niov = vhd_iov_skip(c->iov, c->n_out, sizeof(h));
        } else {
            r->iov = in;
            r->niov = n_in;
        }
        return;
    }
    case VIRTIO_BLK_T_FLUSH:
        r->op = VHD_BLK_OP_FLUSH;
        return;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        parse_fallocate(blk, h.type == VIRTIO_BLK_T_WRITE_ZEROES, c, c->out_len - sizeof(h), r);
        return;
    case VIRTIO_BLK_T_GET_ID:
        r->iov = in;
        r->niov = n_in;
        r->done_len = (uint32_t)vhd_buf_to_iov(in, n_in, blk->serial,
                                               in_data < VIRTIO_BLK_ID_BYTES ? in_data : VIRTIO_BLK_ID_BYTES);
        r->result = VIRTIO_BLK_S_OK;
        return;
    default:
        r->result = VIRTIO_BLK_S_UNSUPP;
        return;
    }
}

/* QoS: reads and writes count (QEMU throttles nothing else). */
void vhd_blk_qos_count(vhd_vring *vr, const struct vhd_blk_req *r)
{
    if (r->op == VHD_BLK_OP_READ)
        vhd_qos_count(vr, VHD_QOS_READ, r->len);
    else if (r->op == VHD_BLK_OP_WRITE)
        vhd_qos_count(vr, VHD_QOS_WRITE, r->len);
}

/* Synchronous execution (the sync engine, and O_DIRECT's fallback for
 * buffers the kernel refuses to DMA into). */
uint8_t vhd_blk_execute_sync(const vhd_blk *blk, vhd_vring *vr, struct vhd_blk_req *r)
{
    switch (r->op) {
    case VHD_BLK_OP_READ:
    case VHD_BLK_OP_WRITE:
    {
        int rc = rw_full(blk->fd, vr, r);
        if (rc == -EINVAL && blk->fd != blk->buffered_fd)   /* O_DIRECT refused the buffers */
            rc = rw_full(blk->buffered_fd, vr, r);
        return rc == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
    }
    case VHD_BLK_OP_FLUSH:
        return fdatasync(blk->fd) == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
    case VHD_BLK_OP_FALLOCATE:
        for (uint32_t i = 0; i < r->nseg; i++) {
            const struct vhd_blk_seg *sg = &r->seg[i];
            int res = fallocate(blk->buffered_fd, sg->mode, (off_t)sg->offset, (off_t)sg->len) < 0 ? -errno : 0;
            if (vhd_blk_fallocate_result(sg, res) < 0)
                return VIRTIO_BLK_S_IOERR;
        }
        return VIRTIO_BLK_S_OK;
    default:
        return r->result;
    }
}

int vhd_blk_handle(vhd_blk *blk, vhd_vring *vr, struct vhd_chain *c)
{
    struct vhd_blk_req r;
    vr->stats.requests++;
    vhd_blk_parse(blk, c, &r);
    vhd_blk_qos_count(vr, &r);
    uint8_t status = vhd_blk_execute_sync(blk, vr, &r);
    vhd_blk_complete(vr, &r, status);
    return status;
}
