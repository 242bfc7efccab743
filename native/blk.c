/* virtio-blk requests (virtio 1.2 section 5.2.6) on a file or block device.
 *
 * A request is: a 16-byte device-readable header, data, and a one-byte
 * device-writable status at the very end of the chain.  The header may be
 * split over several buffers; the data go straight between guest memory
 * and the file with preadv/pwritev (no copy in user space). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhd.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512u

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct vhd_blk {
    int fd;
    uint64_t capacity;        /* in 512-byte sectors */
    bool readonly;
    char serial[VIRTIO_BLK_ID_BYTES];
};

vhd_blk *vhd_blk_new(int fd, uint64_t capacity_sectors, int readonly,
                     const char *serial, uint32_t serial_len)
{
    vhd_blk *blk = calloc(1, sizeof(*blk));
    if (!blk)
        return NULL;
    blk->fd = fd;
    blk->capacity = capacity_sectors;
    blk->readonly = readonly != 0;
    memcpy(blk->serial, serial, serial_len < VIRTIO_BLK_ID_BYTES ? serial_len : VIRTIO_BLK_ID_BYTES);
    return blk;
}

void vhd_blk_free(vhd_blk *blk)
{
    free(blk);
}

/* preadv/pwritev until all len bytes moved; short transfers advance iov. */
static int rw_full(int fd, struct iovec *iov, int n, uint64_t off, size_t len, bool write)
{
    while (len > 0) {
        ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;   /* error, or EOF: the file shrank under us */
        off += (uint64_t)r;
        len -= (size_t)r;
        n = vhd_iov_skip(iov, n, (size_t)r);
    }
    return 0;
}

static bool in_range(const vhd_blk *blk, uint64_t sector, uint64_t bytes)
{
    if (bytes % SECTOR_SIZE != 0)
        return false;
    uint64_t sectors = bytes / SECTOR_SIZE;
    return sector <= blk->capacity && sectors <= blk->capacity - sector;
}

static uint8_t do_rw(vhd_blk *blk, vhd_vring *vr, const struct virtio_blk_outhdr *h,
                     struct iovec *iov, int n, size_t len, bool write)
{
    if (write && blk->readonly)
        return VIRTIO_BLK_S_IOERR;
    if (!in_range(blk, h->sector, len))
        return VIRTIO_BLK_S_IOERR;
    if (rw_full(blk->fd, iov, n, h->sector * SECTOR_SIZE, len, write) < 0)
        return VIRTIO_BLK_S_IOERR;
    if (write)
        vr->stats.bytes_read += len;
    else
        vr->stats.bytes_written += len;
    return VIRTIO_BLK_S_OK;
}

int vhd_blk_handle(vhd_blk *blk, vhd_vring *vr, struct vhd_chain *c)
{
    vr->stats.requests++;
    if (c->in_len == 0) {
        /* No device-writable byte to put a status in: complete it empty
         * rather than write into memory the driver made read-only. */
        vr->stats.errors++;
        vhd_vring_push(vr, c->head, 0);
        return VIRTIO_BLK_S_IOERR;
    }
    /* Writable iovecs are never empty (zero-length buffers add none), so the
     * status byte is the last byte of the last one. */
    struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    uint8_t *status_byte = (uint8_t *)last->iov_base + last->iov_len - 1;
    struct iovec *in = &c->iov[c->n_out];
    int n_in = c->n_in;
    last->iov_len--;
    if (last->iov_len == 0)
        n_in--;
    size_t in_data = c->in_len - 1u;

    struct virtio_blk_outhdr h;
    uint8_t status;
    uint32_t used_len = 1;
    if (vhd_iov_to_buf(c->iov, c->n_out, &h, sizeof(h)) < sizeof(h)) {
        status = VIRTIO_BLK_S_IOERR;
    } else {
        switch (h.type) {
        case VIRTIO_BLK_T_IN:
            status = do_rw(blk, vr, &h, in, n_in, in_data, false);
            if (status == VIRTIO_BLK_S_OK)
                used_len += (uint32_t)in_data;
            break;
        case VIRTIO_BLK_T_OUT: {
            int n_out = vhd_iov_skip(c->iov, c->n_out, sizeof(h));
            status = do_rw(blk, vr, &h, c->iov, n_out, c->out_len - sizeof(h), true);
            break;
        }
        case VIRTIO_BLK_T_FLUSH:
            status = fdatasync(blk->fd) == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
            break;
        case VIRTIO_BLK_T_GET_ID:
            used_len += (uint32_t)vhd_buf_to_iov(in, n_in, blk->serial,
                                             in_data < VIRTIO_BLK_ID_BYTES ? in_data : VIRTIO_BLK_ID_BYTES);
            status = VIRTIO_BLK_S_OK;
            break;
        default:
            status = VIRTIO_BLK_S_UNSUPP;
            break;
        }
    }
    if (status != VIRTIO_BLK_S_OK)
        vr->stats.errors++;
    __atomic_store_n(status_byte, status, __ATOMIC_RELAXED);
    vhd_vring_push(vr, c->head, used_len);
    return status;
}
