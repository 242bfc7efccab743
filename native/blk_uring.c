/* virtio-blk with io_uring: many requests in flight per queue.
 *
 * The synchronous engine (blk.c) serialises a queue's requests: at queue
 * depth 32 on a real disk the guest would see depth 1.  Here every popped
 * request becomes an SQE, a whole batch is submitted with one syscall, and
 * completions arrive on an eventfd the ring's worker watches next to the
 * kick.  Requests complete out of order (allowed: IN_ORDER is not offered).
 * Before a ring stops (GET_VRING_BASE, memory change, disconnect) every
 * request in flight completes and is published (vhd_blk_queue_quiesce, on
 * completion events: the worker never blocks), so last_avail_idx never
 * counts a request the guest will not get back. */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhd.h"

struct slot {
    struct vhd_chain chain;       /* the request's iovecs point into this */
    struct vhd_blk_req req;
};

struct vhd_blk_queue {
    const vhd_blk *blk;
    struct io_uring ring;
    int efd;
    uint32_t depth;
    uint32_t nfree;
    uint32_t *free;               /* stack of free slot numbers */
    struct slot *slots;
};

vhd_blk_queue *vhd_blk_queue_new(const vhd_blk *blk, uint32_t depth, int *err)
{
    vhd_blk_queue *q = calloc(1, sizeof(*q));
    if (!q) {
        *err = -ENOMEM;
        return NULL;
    }
    q->blk = blk;
    q->depth = depth;
    q->efd = -1;
    q->slots = calloc(depth, sizeof(*q->slots));
    q->free = calloc(depth, sizeof(*q->free));
    if (!q->slots || !q->free) {
        *err = -ENOMEM;
        goto fail;
    }
    int rc = io_uring_queue_init(depth, &q->ring, 0);
    if (rc < 0) {
        *err = rc;
        goto fail;
    }
    q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->efd < 0 || (rc = io_uring_register_eventfd(&q->ring, q->efd)) < 0) {
        *err = q->efd < 0 ? -errno : rc;
        io_uring_queue_exit(&q->ring);
        goto fail;
    }
    for (uint32_t i = 0; i < depth; i++)
        q->free[i] = depth - 1 - i;
    q->nfree = depth;
    *err = 0;
    return q;
fail:
    if (q->efd >= 0)
        close(q->efd);
    free(q->slots);
    free(q->free);
    free(q);
    return NULL;
}

void vhd_blk_queue_free(vhd_blk_queue *q)
{
    if (!q)
        return;
    io_uring_queue_exit(&q->ring);
    close(q->efd);
    free(q->slots);
    free(q->free);
    free(q);
}

uint32_t vhd_blk_queue_inflight(const vhd_blk_queue *q)
{
    return q->depth - __atomic_load_n(&q->nfree, __ATOMIC_RELAXED);
}

int vhd_blk_queue_completions(vhd_blk_queue *q)
{
    return io_uring_cq_ready(&q->ring) > 0;
}

int vhd_blk_queue_fd(const vhd_blk_queue *q)
{
    return q->efd;
}

static void prep(vhd_blk_queue *q, uint32_t n)
{
    struct slot *s = &q->slots[n];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);   /* never NULL: depth slots, depth SQEs */
    switch (s->req.op) {
    case VHD_BLK_OP_READ:
        io_uring_prep_readv(sqe, q->blk->fd, s->req.iov, (unsigned)s->req.niov, s->req.offset + s->req.moved);
        break;
    case VHD_BLK_OP_WRITE:
        io_uring_prep_writev(sqe, q->blk->fd, s->req.iov, (unsigned)s->req.niov, s->req.offset + s->req.moved);
        sqe->rw_flags = s->req.rw_flags;
        break;
    case VHD_BLK_OP_FALLOCATE: {
        const struct vhd_blk_seg *sg = &s->req.seg[s->req.seg_done];
        io_uring_prep_fallocate(sqe, q->blk->buffered_fd, sg->mode, sg->offset, sg->len);
        break;
    }
    default:
        io_uring_prep_fsync(sqe, q->blk->fd, IORING_FSYNC_DATASYNC);
        break;
    }
    io_uring_sqe_set_data64(sqe, n);
}

static void release(vhd_blk_queue *q, uint32_t n)
{
    q->free[q->nfree++] = n;
}

/* One CQE.  Returns true if the request needs resubmitting (short I/O). */
static bool finish(vhd_blk_queue *q, vhd_vring *vr, uint32_t n, int res)
{
    struct slot *s = &q->slots[n];
    struct vhd_blk_req *r = &s->req;
    uint8_t status = VIRTIO_BLK_S_OK;
    if (r->op == VHD_BLK_OP_FLUSH) {
        status = res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
    } else if (r->op == VHD_BLK_OP_FALLOCATE) {
        /* Segments go one after the other: one SQE per slot, always. */
        if (vhd_blk_fallocate_result(&r->seg[r->seg_done], res) < 0)
            status = VIRTIO_BLK_S_IOERR;
        else if (++r->seg_done < r->nseg)
            return true;
    } else if (res == -EINVAL && q->blk->fd != q->blk->buffered_fd && r->moved == 0) {
        status = vhd_blk_execute_sync(q->blk, vr, r);   /* O_DIRECT refused these buffers */
    } else if (res <= 0) {
        status = VIRTIO_BLK_S_IOERR;   /* error, or EOF: the file shrank */
    } else if ((size_t)res < r->len - r->moved) {
        vhd_blk_advance(vr, r, (size_t)res);
        return true;
    }
    vhd_blk_complete(vr, r, status);
    release(q, n);
    return false;
}

static int reap(vhd_blk_queue *q, vhd_vring *vr)
{
    struct io_uring_cqe *cqe;
    int reaped = 0;
    bool resubmit = false;
    while (io_uring_peek_cqe(&q->ring, &cqe) == 0) {
        uint32_t n = (uint32_t)io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&q->ring, cqe);
        if (finish(q, vr, n, res)) {
            prep(q, n);
            resubmit = true;
        }
        reaped++;
    }
    if (resubmit)
        io_uring_submit(&q->ring);
    return reaped;
}

/* Data already in the page cache is copied at once with RWF_NOWAIT: a
 * plain syscall is cheaper than io_uring's bookkeeping for I/O that cannot
 * block.  Anything that would block (EAGAIN), or a partial transfer, goes
 * to io_uring for the rest.  O_DIRECT always goes to io_uring. */
static bool try_inline(vhd_blk_queue *q, vhd_vring *vr, uint32_t n)
{
    struct slot *s = &q->slots[n];
    struct vhd_blk_req *r = &s->req;
    if (q->blk->fd != q->blk->buffered_fd || r->op == VHD_BLK_OP_FLUSH || r->op == VHD_BLK_OP_FALLOCATE)
        return false;
    ssize_t res = r->op == VHD_BLK_OP_READ
        ? preadv2(q->blk->fd, r->iov, r->niov, (off_t)r->offset, RWF_NOWAIT)
        : pwritev2(q->blk->fd, r->iov, r->niov, (off_t)r->offset, RWF_NOWAIT | r->rw_flags);
    if (res <= 0)
        return false;
    if ((size_t)res < r->len) {
        vhd_blk_advance(vr, r, (size_t)res);
        return false;
    }
    vhd_blk_complete(vr, r, VIRTIO_BLK_S_OK);
    release(q, n);
    return true;
}

/* Pops and submits while slots are free.  Returns chains submitted, or a
 * negative VHD_ERR_* if the ring broke. */
static int submit(vhd_blk_queue *q, vhd_vring *vr)
{
    int queued = 0;
    int rc = 0;
    while (q->nfree > 0 && vhd_qos_may_pop(vr)) {
        uint32_t n = q->free[q->nfree - 1];
        struct slot *s = &q->slots[n];
        rc = vhd_vring_pop(vr, &s->chain);
        if (rc != VHD_POP_OK)
            break;
        q->nfree--;
        vr->stats.requests++;
        vhd_blk_parse(q->blk, &s->chain, &s->req);
        vhd_blk_qos_count(vr, &s->req);
        if (s->req.op == VHD_BLK_OP_DONE) {
            vhd_blk_complete(vr, &s->req, s->req.result);
            release(q, n);
            continue;
        }
        if (s->req.len == 0 && s->req.op != VHD_BLK_OP_FLUSH && s->req.op != VHD_BLK_OP_FALLOCATE) {
            vhd_blk_complete(vr, &s->req, VIRTIO_BLK_S_OK);   /* nothing to move */
            release(q, n);
            continue;
        }
        if (try_inline(q, vr, n)) {
            vhd_vring_flush_if_big(vr);
            continue;
        }
        prep(q, n);
        queued++;
    }
    if (queued)
        io_uring_submit(&q->ring);
    return rc < 0 ? rc : queued;
}

int vhd_blk_queue_run(vhd_blk_queue *q, vhd_vring *vr)
{
    eventfd_t v;
    (void)eventfd_read(q->efd, &v);
    int done = 0;
    for (;;) {
        if (vhd_vring_over_budget(vr, done)) {
            vhd_vring_flush(vr);
            return 0;
        }
        vhd_vring_disable_notify(vr);
        int reaped = reap(q, vr);
        int queued = submit(q, vr);
        /* Buffered I/O on cached data completes inside submit: reap it now
         * rather than after another wake-up. */
        if (queued > 0)
            reaped += reap(q, vr);
        vhd_vring_flush(vr);
        if (queued < 0)
            return queued;
        done += reaped + queued;
        if (reaped > 0 || queued > 0)
            continue;
        if (q->nfree == 0)
            return 0;            /* full: the completion eventfd wakes us */
        if (vhd_qos_throttled(vr))
            return 0;            /* a limit: the worker's timer wakes us, kicks stay off */
        if (!vhd_vring_enable_notify(vr))
            return 0;            /* idle until a kick or a completion */
    }
}

uint32_t vhd_blk_queue_quiesce(vhd_blk_queue *q, vhd_vring *vr)
{
    eventfd_t v;
    (void)eventfd_read(q->efd, &v);
    reap(q, vr);
    vhd_vring_flush(vr);
    return q->depth - q->nfree;
}
