/* virtio-net control virtqueue (virtio 1.2 section 5.1.6.5), for a
 * front-end that hands it to the back-end.  (QEMU and DPDK's virtio-user
 * emulate it themselves and translate MQ changes into SET_VRING_ENABLE.)
 *
 * A command is [class u8][command u8][data...] in device-readable buffers
 * and one device-writable ack byte at the end.  The data are copied out
 * once and checked for the exact size each command takes.  The resulting
 * state (active queue pairs, RX mode, MAC) is published for the control
 * plane, which applies what needs applying (tap queues) when the daemon's
 * event fd is signalled. */
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "vhd.h"

#define VIRTIO_NET_OK 0
#define VIRTIO_NET_ERR 1
#define CTRL_RX 0
#define CTRL_MAC 1
#define CTRL_ANNOUNCE 3
#define CTRL_MQ 4
#define CTRL_RX_NOBCAST 5
#define CTRL_MAC_TABLE_SET 0
#define CTRL_MAC_ADDR_SET 1
#define CTRL_ANNOUNCE_ACK 0
#define CTRL_MQ_VQ_PAIRS_SET 0
#define CTRL_MAX_DATA 4096

struct vhd_net_ctrl {
    uint16_t max_pairs;
    struct vhd_net_ctrl_state state;
};

vhd_net_ctrl *vhd_net_ctrl_new(uint16_t max_pairs)
{
    vhd_net_ctrl *c = calloc(1, sizeof(*c));
    if (c) {
        c->max_pairs = max_pairs;
        c->state.active_pairs = 1;
    }
    return c;
}

void vhd_net_ctrl_free(vhd_net_ctrl *c)
{
    free(c);
}

const struct vhd_net_ctrl_state *vhd_net_ctrl_state(const vhd_net_ctrl *c)
{
    return &c->state;
}

/* VIRTIO_NET_CTRL_MAC_TABLE_SET: two tables, each {le32 entries; u8 mac[entries][6]}. */
static bool mac_tables_ok(const uint8_t *d, size_t len)
{
    size_t off = 0;
    for (int table = 0; table < 2; table++) {
        uint32_t entries;
        if (len - off < sizeof(entries))
            return false;
        memcpy(&entries, d + off, sizeof(entries));
        off += sizeof(entries);
        if (entries > (len - off) / 6)
            return false;
        off += (size_t)entries * 6;
    }
    return off == len;
}

static uint8_t execute(vhd_net_ctrl *ctl, vhd_vring *vr, uint8_t cls, uint8_t cmd,
                       const uint8_t *d, size_t len)
{
    struct vhd_net_ctrl_state *st = &ctl->state;
    switch (cls) {
    case CTRL_RX:
        if (cmd > CTRL_RX_NOBCAST || len != 1)
            return VIRTIO_NET_ERR;
        if (d[0])
            st->rx_mode |= 1u << cmd;
        else
            st->rx_mode &= ~(1u << cmd);
        return VIRTIO_NET_OK;
    case CTRL_MAC:
        if (cmd == CTRL_MAC_ADDR_SET && len == 6) {
            memcpy(st->mac, d, 6);
            st->mac_set = 1;
            return VIRTIO_NET_OK;
        }
        return cmd == CTRL_MAC_TABLE_SET && mac_tables_ok(d, len) ? VIRTIO_NET_OK : VIRTIO_NET_ERR;
    case CTRL_ANNOUNCE:
        return cmd == CTRL_ANNOUNCE_ACK && len == 0 ? VIRTIO_NET_OK : VIRTIO_NET_ERR;
    case CTRL_MQ: {
        uint16_t pairs;
        if (cmd != CTRL_MQ_VQ_PAIRS_SET || len != sizeof(pairs))
            return VIRTIO_NET_ERR;
        memcpy(&pairs, d, sizeof(pairs));
        if (pairs < 1 || pairs > ctl->max_pairs)
            return VIRTIO_NET_ERR;
        __atomic_store_n(&st->active_pairs, pairs, __ATOMIC_RELEASE);
        __atomic_fetch_add(&st->generation, 1, __ATOMIC_RELEASE);
        if (vr->broken_fd >= 0)
            eventfd_write(vr->broken_fd, 1);   /* the control plane re-applies tap queues */
        return VIRTIO_NET_OK;
    }
    default:
        return VIRTIO_NET_ERR;
    }
}

static void ctrl_handler(void *ctx, vhd_vring *vr, struct vhd_chain *c)
{
    vhd_net_ctrl *ctl = ctx;
    vr->stats.requests++;
    if (c->in_len == 0) {
        vr->stats.errors++;
        vhd_vring_push(vr, c->head, 0);
        return;
    }
    struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    uint8_t *ack = (uint8_t *)last->iov_base + last->iov_len - 1;
    uint8_t buf[2 + CTRL_MAX_DATA];
    uint8_t status = VIRTIO_NET_ERR;
    if (c->out_len >= 2 && c->out_len <= sizeof(buf)) {
        size_t n = vhd_iov_to_buf(c->iov, c->n_out, buf, c->out_len);
        status = execute(ctl, vr, buf[0], buf[1], buf + 2, n - 2);
    }
    if (status != VIRTIO_NET_OK)
        vr->stats.errors++;
    __atomic_store_n(ack, status, __ATOMIC_RELAXED);
    vhd_vring_log_hva(vr, ack, 1);
    vhd_vring_push(vr, c->head, 1);
}

int vhd_net_ctrl_run(vhd_net_ctrl *ctl, vhd_vring *vr)
{
    return vhd_vring_drain(vr, ctrl_handler, ctl, 16);
}
