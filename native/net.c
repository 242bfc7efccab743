/* virtio-net data plane (virtio 1.2 section 5.1.6) over a tap queue fd.
 *
 * TX: the guest's chain is [virtio_net_hdr][frame].  The header is copied
 * out once, checked, and handed to the tap from that copy (the tap has
 * IFF_VNET_HDR with the same header size); the frame goes from guest memory
 * to the kernel in one writev, no copy in user space.
 * When the front-end negotiated no offload at all, the tap is opened
 * without IFF_VNET_HDR (backend_hdr false): the header then costs the
 * kernel ~0.2 us per read for nothing, so vhostd strips it on TX and
 * writes an empty one on RX.
 * RX: one read per frame.  Its first RX_HOT bytes land in a small buffer
 * of ours that stays in cache and are copied into the first guest chain
 * from there; the rest goes straight into that chain, then into a bounce
 * buffer that catches what does not fit.  While frames are small (the last
 * one fitted in RX_HOT) a plain read() into our buffers replaces the readv:
 * no iovec to import, and every byte is ours to copy anyway.  With MRG_RXBUF the overflow is
 * copied into further chains (num_buffers set); without it an oversized
 * frame is dropped and counted.  A tap returns exactly one frame per read,
 * so nothing is ever split between reads. */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhd.h"

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1
#define VIRTIO_NET_HDR_GSO_UDP 3
#define VIRTIO_NET_HDR_GSO_TCPV6 4
#define VIRTIO_NET_HDR_GSO_ECN 0x80
#define NET_HDR_MAX 12
#define NUM_BUFFERS_OFFSET 10
/* Largest frame a tap can return: 64 KiB GSO payload plus headers. */
#define RX_BOUNCE_SIZE (128 * 1024)
/* Why the head goes through a buffer of ours: the kernel writing a small
 * frame (and its virtio-net header, in two pieces) into a cold guest buffer
 * cost ~0.15-0.3 us more per frame than writing it into a cache-hot buffer
 * plus our one memcpy (measured 64 and 1518 B frames on the 2-vCPU bench
 * machine, bench/README.md).  Large GSO frames still take one copy for all
 * but their first RX_HOT bytes. */
#define RX_HOT 2048
#define NET_BATCH 64

struct virtio_net_hdr_v1 {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

#define TX_URING_BATCH 32
#define TX_IOV_POOL (2 * (VHD_MAX_IOV + 1))

struct tx_slot {
    struct virtio_net_hdr_v1 hdr;   /* validated copy handed to the tap */
    uint32_t frame_len;
    uint16_t head;
};

struct tx_uring {
    struct io_uring ring;
    struct tx_slot slots[TX_URING_BATCH];
    struct iovec iov[TX_IOV_POOL];
};

struct vhd_net {
    int fd;                     /* -1: the null back-end */
    struct tx_uring *tx;        /* batched TX; NULL: one writev per frame */
    uint8_t null_frame[NET_HDR_MAX + 1514];
    uint32_t null_len;          /* header included */
    uint32_t hdr_len;
    bool mrg_rxbuf;
    uint32_t tx_gso;
    bool backend_hdr;           /* the tap reads and writes the header */
    uint32_t rx_last_len;       /* the last frame read: predicts the next */
    struct vhd_net_stats stats;
    uint8_t *rx_head;           /* RX_HOT bytes, cache-line aligned ... */
    uint8_t *bounce;            /* ... followed by RX_BOUNCE_SIZE bytes */
};

vhd_net *vhd_net_new(int backend_fd)
{
    vhd_net *net = calloc(1, sizeof(*net));
    if (!net)
        return NULL;
    net->rx_head = aligned_alloc(64, RX_HOT + RX_BOUNCE_SIZE);
    if (!net->rx_head) {
        free(net);
        return NULL;
    }
    net->bounce = net->rx_head + RX_HOT;
    net->fd = backend_fd;
    net->hdr_len = NET_HDR_MAX;
    net->backend_hdr = true;
    if (backend_fd >= 0) {
        net->tx = calloc(1, sizeof(*net->tx));
        if (net->tx && io_uring_queue_init(TX_URING_BATCH, &net->tx->ring, 0) < 0) {
            free(net->tx);
            net->tx = NULL;   /* no io_uring here: plain writev */
        }
    }
    static const uint8_t eth[14] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5 };
    uint8_t frame[60] = { 0 };
    memcpy(frame, eth, sizeof(eth));
    vhd_net_set_null_frame(net, frame, sizeof(frame));
    return net;
}

void vhd_net_free(vhd_net *net)
{
    if (!net)
        return;
    if (net->tx) {
        io_uring_queue_exit(&net->tx->ring);
        free(net->tx);
    }
    free(net->rx_head);
    free(net);
}

void vhd_net_set_null_frame(vhd_net *net, const uint8_t *frame, uint32_t len)
{
    if (len > sizeof(net->null_frame) - NET_HDR_MAX)
        len = sizeof(net->null_frame) - NET_HDR_MAX;
    memset(net->null_frame, 0, NET_HDR_MAX);
    memcpy(net->null_frame + NET_HDR_MAX, frame, len);
    net->null_len = len;
}

/* Null back-end "read": the generated frame, header first. */
static ssize_t null_readv(const vhd_net *net, const struct iovec *iov, int n)
{
    size_t len = net->hdr_len + net->null_len;
    const uint8_t *src = net->null_frame + (NET_HDR_MAX - net->hdr_len);
    return (ssize_t)vhd_buf_to_iov(iov, n, src, len);
}

void vhd_net_configure(vhd_net *net, uint32_t hdr_len, int mrg_rxbuf, uint32_t tx_gso, int backend_hdr)
{
    net->hdr_len = hdr_len == 10 ? 10 : NET_HDR_MAX;
    net->mrg_rxbuf = mrg_rxbuf != 0;
    /* The null back-end generates its header itself. */
    net->backend_hdr = backend_hdr != 0 || net->fd < 0;
    /* Without the header the tap cannot take a partial checksum or GSO. */
    net->tx_gso = net->backend_hdr ? tx_gso : 0;
}

/* Header bytes the back-end reads and writes itself: all or none. */
static uint32_t backend_hdr_len(const vhd_net *net)
{
    return net->backend_hdr ? net->hdr_len : 0;
}

const struct vhd_net_stats *vhd_net_stats(const vhd_net *net)
{
    return &net->stats;
}

/* --- TX ------------------------------------------------------------------ */

static bool tx_hdr_ok(const vhd_net *net, const struct virtio_net_hdr_v1 *h, uint32_t frame_len)
{
    if (h->flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM)
        return false;
    if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (!(net->tx_gso & VHD_NET_GSO_CSUM))
            return false;
        /* The checksum field must lie inside the frame. */
        if ((uint32_t)h->csum_start + h->csum_offset + 2u > frame_len)
            return false;
    }
    uint8_t ecn = h->gso_type & VIRTIO_NET_HDR_GSO_ECN;
    if (ecn && !(net->tx_gso & VHD_NET_GSO_ECN))
        return false;
    switch (h->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) {
    case VIRTIO_NET_HDR_GSO_NONE:
        return ecn == 0;
    case VIRTIO_NET_HDR_GSO_TCPV4:
        return (net->tx_gso & VHD_NET_GSO_TCPV4) && h->gso_size > 0 &&
               (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
    case VIRTIO_NET_HDR_GSO_TCPV6:
        return (net->tx_gso & VHD_NET_GSO_TCPV6) && h->gso_size > 0 &&
               (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
    case VIRTIO_NET_HDR_GSO_UDP:
        return (net->tx_gso & VHD_NET_GSO_UDP) && h->gso_size > 0;
    default:
        return false;
    }
}

/* Copies and checks the guest's header; on success fills out[0] with the
 * copy and out[1..] with the frame's guest buffers, returns their count. */
static int tx_prepare(vhd_net *net, struct vhd_chain *c, struct virtio_net_hdr_v1 *hdr,
                      struct iovec *out, uint32_t *frame_len)
{
    memset(hdr, 0, sizeof(*hdr));
    *frame_len = c->out_len >= net->hdr_len ? c->out_len - net->hdr_len : 0;
    if (c->out_len < net->hdr_len ||
        vhd_iov_to_buf(c->iov, c->n_out, hdr, net->hdr_len) < net->hdr_len ||
        !tx_hdr_ok(net, hdr, *frame_len)) {
        net->stats.tx_bad_hdr++;
        return -1;
    }
    hdr->num_buffers = 0;
    int n = vhd_iov_skip(c->iov, c->n_out, net->hdr_len);
    out[0].iov_base = hdr;
    out[0].iov_len = backend_hdr_len(net);
    memcpy(&out[1], c->iov, (size_t)n * sizeof(struct iovec));
    return n + 1;
}

static void tx_account(vhd_net *net, vhd_vring *vr, ssize_t r, uint32_t frame_len)
{
    vhd_qos_count(vr, VHD_QOS_WRITE, frame_len);
    if (r < 0) {
        net->stats.tx_dropped++;
    } else {
        net->stats.tx_frames++;
        net->stats.tx_bytes += frame_len;
        vr->stats.bytes_read += frame_len;
    }
}

static void tx_one(vhd_net *net, vhd_vring *vr, struct vhd_chain *c)
{
    struct virtio_net_hdr_v1 hdr;
    struct iovec out[VHD_MAX_IOV + 1];
    uint32_t frame_len;
    vr->stats.requests++;
    int n = tx_prepare(net, c, &hdr, out, &frame_len);
    if (n > 0) {
        ssize_t r = 0;
        if (net->fd >= 0) {
            do {
                r = writev(net->fd, out, n);
            } while (r < 0 && errno == EINTR);
        }
        tx_account(net, vr, r, frame_len);
    }
    vhd_vring_push(vr, c->head, 0);
}

static void tx_handler(void *net, vhd_vring *vr, struct vhd_chain *c)
{
    tx_one(net, vr, c);
}

/* Batched TX: a tap takes one frame per write, so the syscall is most of
 * the cost of a small frame.  io_uring carries a whole batch of writevs in
 * one io_uring_enter; the tap handles each inline.  Every frame still goes
 * from guest memory to the kernel with our validated header copy. */
/* Submits the n prepared writevs with one syscall and completes them. */
static void tx_submit(vhd_net *net, vhd_vring *vr, int n)
{
    struct tx_uring *u = net->tx;
    if (n == 0)
        return;
    io_uring_submit_and_wait(&u->ring, (unsigned)n);
    for (int done = 0; done < n; done++) {
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&u->ring, &cqe) < 0)
            break;
        struct tx_slot *s = &u->slots[io_uring_cqe_get_data64(cqe)];
        tx_account(net, vr, cqe->res, s->frame_len);
        io_uring_cqe_seen(&u->ring, cqe);
        vhd_vring_push(vr, s->head, 0);
    }
}

static int tx_batch(vhd_net *net, vhd_vring *vr, bool *more, bool *broken)
{
    struct tx_uring *u = net->tx;
    struct vhd_chain chain;
    int n = 0, handled = 0, rc = VHD_POP_OK;
    size_t pool = 0;
    while (n < TX_URING_BATCH && vhd_qos_may_pop(vr) && (rc = vhd_vring_pop(vr, &chain)) == VHD_POP_OK) {
        handled++;
        vr->stats.requests++;
        if (pool + chain.n_out + 1 > TX_IOV_POOL) {
            tx_submit(net, vr, n);   /* keep frame order: send what is queued first */
            n = 0;
            pool = 0;
        }
        struct tx_slot *s = &u->slots[n];
        int niov = tx_prepare(net, &chain, &s->hdr, &u->iov[pool], &s->frame_len);
        if (niov < 0) {
            vhd_vring_push(vr, chain.head, 0);
            continue;
        }
        s->head = chain.head;
        struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
        io_uring_prep_writev(sqe, net->fd, &u->iov[pool], (unsigned)niov, 0);
        sqe->rw_flags = RWF_NOWAIT;   /* a full back-end drops the frame, as writev would */
        io_uring_sqe_set_data64(sqe, (uint64_t)n);
        pool += (size_t)niov;
        n++;
    }
    tx_submit(net, vr, n);
    *more = n == TX_URING_BATCH;
    *broken = rc < 0;
    return handled;
}

int vhd_net_tx(vhd_net *net, vhd_vring *vr)
{
    if (!net->tx)
        return vhd_vring_drain(vr, tx_handler, net, NET_BATCH);
    int total = 0;
    for (;;) {
        if (vhd_vring_over_budget(vr, total))
            return total;
        vhd_vring_disable_notify(vr);
        bool more, broken;
        int handled = tx_batch(net, vr, &more, &broken);
        vhd_vring_flush(vr);
        total += handled;
        if (broken)
            return total;
        if (vhd_qos_throttled(vr))
            return total;    /* a limit: the worker's timer wakes us, kicks stay off */
        if (more || handled > 0)
            continue;
        if (!vhd_vring_enable_notify(vr))
            return total;
    }
}

/* --- RX ------------------------------------------------------------------ */

/* Pops the next RX chain fit to receive into.  Unfit chains (readable
 * buffers, or the first one too short for the header) are returned empty. */
static int pop_rx(vhd_net *net, vhd_vring *vr, struct vhd_chain *c, uint32_t min_len)
{
    for (;;) {
        int rc = vhd_vring_pop(vr, c);
        if (rc != VHD_POP_OK)
            return rc;
        if (c->n_out == 0 && c->in_len >= min_len && c->in_len > 0)
            return VHD_POP_OK;
        net->stats.rx_bad_desc++;
        vhd_vring_push(vr, c->head, 0);
    }
}

/* Places the tail of a frame (in the bounce buffer) into more chains,
 * popped but not yet pushed.  Returns false if the guest ran out of fit
 * buffers; *used says how many were popped (to give back).  An unfit chain
 * is given back rather than consumed here, so that every chain popped for
 * this frame can be rewound with one vhd_vring_unpop(). */
static bool rx_merge(vhd_vring *vr, const uint8_t *tail_src, size_t tail, uint16_t *heads, uint32_t *lens, int max,
                     int *used)
{
    struct vhd_chain c;
    size_t off = 0;
    *used = 0;
    while (off < tail) {
        if (*used == max || vhd_vring_pop(vr, &c) != VHD_POP_OK)
            return false;
        if (c.n_out != 0 || c.in_len == 0) {
            vhd_vring_unpop(vr, 1);
            return false;
        }
        size_t k = vhd_buf_to_iov(c.iov, c.n_in, tail_src + off, tail - off);
        vhd_vring_log_iov(vr, c.iov, c.n_in, k);
        heads[*used] = c.head;
        lens[*used] = (uint32_t)k;
        (*used)++;
        off += k;
    }
    return true;
}

static inline void prefetch_for_write(const void *p)
{
#if defined(__x86_64__)
    /* GCC's __builtin_prefetch(p, 1) is a plain prefetcht0 without -mprfchw. */
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1);
#endif
}

/* The front-end's core touched this chain's buffers last (it read the
 * previous frame there): ask for the lines we are about to copy into now,
 * so that they move over while the kernel reads the frame.  How many: as
 * many as the last frame needed, up to the RX_HOT head.  Measured in
 * net-rx: 64 B frames ~1.04 -> 0.87-0.90 us each, 0.81-0.93 with
 * prefetchw (the line arrives writable, bench/README.md). */
static void rx_prefetch(const vhd_net *net, const struct iovec *guest, int nseg)
{
    size_t want = net->rx_last_len < RX_HOT ? net->rx_last_len : RX_HOT;
    for (int i = 0; i < nseg && want > 0; i++) {
        const uint8_t *p = guest[i].iov_base;
        size_t n = guest[i].iov_len < want ? guest[i].iov_len : want;
        for (size_t off = 0; off < n; off += 64)
            prefetch_for_write(p + off);
        want -= n;
    }
}

/* One frame.  Returns 1 if a frame was delivered or dropped, 0 if the
 * back-end is empty, VHD_RX_STARVED, or a ring error. */
static int rx_one(vhd_net *net, vhd_vring *vr, struct vhd_chain *c)
{
    if (!vhd_qos_may_pop(vr))
        return VHD_RX_THROTTLED;     /* the frames wait in the back-end */
    int rc = pop_rx(net, vr, c, net->hdr_len);
    if (rc != VHD_POP_OK)
        return rc == VHD_POP_EMPTY ? VHD_RX_STARVED : rc;
    /* readv takes at most IOV_MAX (1024) iovecs, two of them ours (head and
     * bounce): a chain with more segments receives into its first 1022. */
    const struct iovec *guest = &c->iov[c->n_out];
    int nseg = c->n_in < VHD_MAX_IOV - 2 ? c->n_in : VHD_MAX_IOV - 2;
    size_t cap = 0;
    for (int i = 0; i < nseg; i++)
        cap += guest[i].iov_len;
    /* cap >= hdr_len (pop_rx), so the header is always in the head. */
    size_t head = cap < RX_HOT ? cap : RX_HOT;
    rx_prefetch(net, guest, nseg);
    struct iovec iov[VHD_MAX_IOV];
    int n;
    /* The header bytes the back-end does not write are ours (head >= them). */
    uint32_t fill = net->hdr_len - backend_hdr_len(net);
    /* Small frames expected: all of it into our buffers (contiguous). */
    bool contiguous = net->rx_last_len <= RX_HOT;
    if (contiguous) {
        head = cap;
        iov[0].iov_base = net->rx_head + fill;
        iov[0].iov_len = RX_HOT + RX_BOUNCE_SIZE - fill;
        n = 1;
    } else {
        iov[0].iov_base = net->rx_head + fill;
        iov[0].iov_len = head - fill;
        memcpy(&iov[1], guest, (size_t)nseg * sizeof(*iov));
        n = 1 + vhd_iov_skip(&iov[1], nseg, head);
        iov[n].iov_base = net->bounce;
        iov[n].iov_len = RX_BOUNCE_SIZE;
        n++;
    }
    ssize_t r;
    if (net->fd < 0) {
        r = null_readv(net, iov, n);
    } else {
        do {
            r = n == 1 ? read(net->fd, iov[0].iov_base, iov[0].iov_len) : readv(net->fd, iov, n);
        } while (r < 0 && errno == EINTR);
    }
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        net->stats.rx_bad_desc++;     /* cannot receive into it: give it back empty */
        vhd_vring_push(vr, c->head, 0);
        return 1;
    }
    if (r <= 0) {
        vhd_vring_unpop(vr, 1);   /* nothing to deliver: the chain stays the guest's */
        return 0;
    }
    size_t len = (size_t)r + fill;
    memset(net->rx_head, 0, fill);   /* no flags, GSO_NONE */
    net->rx_last_len = (uint32_t)len;
    /* Where the bytes past the first chain are: after it in our contiguous
     * buffers (read), or at the start of the bounce (readv). */
    const uint8_t *tail_src = contiguous ? net->rx_head + cap : net->bounce;
    enum { MAX_MERGE = 64 };
    uint16_t heads[MAX_MERGE];
    uint32_t lens[MAX_MERGE];
    int extra = 0;
    if (len > cap && (!net->mrg_rxbuf ||
                      !rx_merge(vr, tail_src, len - cap, heads, lens, MAX_MERGE, &extra))) {
        net->stats.rx_dropped++;
        if (net->fd < 0) {
            /* The null back-end would generate the same frame again:
             * consume the buffer it does not fit instead. */
            vhd_vring_unpop(vr, (uint16_t)extra);
            vhd_vring_push(vr, c->head, 0);
            return 1;
        }
        /* Not enough buffers for this frame: drop it, keep the chains. */
        vhd_vring_unpop(vr, (uint16_t)(1 + extra));
        return 1;
    }
    /* The tap leaves num_buffers unwritten; VERSION_1 requires it (1 without MRG_RXBUF). */
    uint16_t nbuf = (uint16_t)(1 + extra);
    if (net->hdr_len == NET_HDR_MAX)
        memcpy(net->rx_head + NUM_BUFFERS_OFFSET, &nbuf, sizeof(nbuf));
    vhd_buf_to_iov(guest, nseg, net->rx_head, len < head ? len : head);
    /* Header, bytes we copied and bytes readv placed directly. */
    vhd_vring_log_iov(vr, guest, nseg, len < cap ? len : cap);
    vhd_vring_push(vr, c->head, (uint32_t)(len < cap ? len : cap));
    for (int i = 0; i < extra; i++)
        vhd_vring_push(vr, heads[i], lens[i]);
    net->stats.rx_frames++;
    net->stats.rx_bytes += len - net->hdr_len;
    vhd_qos_count(vr, VHD_QOS_READ, len - net->hdr_len);
    vr->stats.bytes_written += len;
    vr->stats.requests++;
    return 1;
}

int vhd_net_rx(vhd_net *net, vhd_vring *vr)
{
    struct vhd_chain chain;
    int total = 0;
    for (;;) {
        if (vhd_vring_over_budget(vr, total)) {
            vhd_vring_flush(vr);
            return VHD_RX_IDLE;
        }
        vhd_vring_disable_notify(vr);
        int batch = 0;
        int rc = 1;
        while (batch < NET_BATCH && (rc = rx_one(net, vr, &chain)) == 1)
            batch++;
        total += batch;
        vhd_vring_flush(vr);
        if (rc < 0 || rc == VHD_RX_THROTTLED)
            return rc;
        if (rc == 0)
            return VHD_RX_IDLE;
        if (rc == VHD_RX_STARVED) {
            /* Ask for a kick when buffers come; re-check to not miss one. */
            if (!vhd_vring_enable_notify(vr))
                return VHD_RX_STARVED;
        }
    }
}
