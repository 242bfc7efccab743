/* libFuzzer target: one packed ring (virtio 1.2 2.8) in hostile guest
 * memory, served by virtio-blk (sync or io_uring engine) or virtio-net
 * (TX, or RX on the null back-end).
 *
 * Input (little-endian; missing bytes read as 0):
 *   0  u8  flags: 1 INDIRECT_DESC, 2 EVENT_IDX, 4 two regions, 8 read-only
 *              disk, 16 io_uring engine (blk), 32 gap between the regions'
 *              uvas, 64 no call eventfd, 128 inflight tracking (blk)
 *   1  u8  ring size: 1 + (v % 128) (packed rings need not be a power of two)
 *   2  u8  region pages: region 0 has 1 + (v & 7), region 1 1 + (v >> 4 & 7);
 *          bit 3: dirty logging (VHOST_F_LOG_ALL), bit 7: the device area
 *          is logged too (VHOST_VRING_F_LOG)
 *   3  u8  bits 0-1: where guest memory starts (fuzz_common.h guest_base);
 *          bits 2-3: device: 0 blk, 1 net TX, 2 net RX, 3 net RX with MRG_RXBUF
 *          (net on the null back-end)
 *   4  5 x u16: descriptor ring, driver area and device area offsets in
 *          guest memory, SET_VRING_BASE's avail and used halves (index in
 *          bits 0-14, wrap counter in bit 15)
 *   14 with inflight tracking: the ring's QueueRegionPacked as the
 *          front-end hands it over, 32 + 32 * ring size bytes
 *   ... guest memory image from guest offset 0 (descriptors with their
 *          AVAIL/USED bits, event areas, indirect tables, requests)
 *
 * Checked: no crash, sanitizer report, guard-page fault or hang;
 * fuzz_common.h's chain and push checks (ids below the ring size, popped
 * once, used once); setup accepts exactly the layouts that fit; the ring
 * is broken iff the err eventfd was signalled; every chain popped is used
 * or given back; a ring that started with nothing in flight ends with its
 * used position where its avail position is; the device writes only
 * device-writable buffers, the descriptor ring (used descriptors) and the
 * device area, and logs what it wrote (the device area only with
 * VHOST_VRING_F_LOG); with inflight tracking, once drained nothing is left
 * marked in flight and the region's positions are the device's.
 */
#include <fcntl.h>
#include <sys/stat.h>

#include "fuzz_common.h"

#define DISK_SECTORS 64u
#define DISK_BYTES (DISK_SECTORS * 512u)

static int disk_fd, call_fd, err_fd;
static uint8_t disk_pattern[DISK_BYTES];
static vhd_blk *uring_blk[2];
static vhd_blk_queue *uring_q[2];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    guest_init_once();
    disk_fd = memfd_create("fuzz-disk", MFD_CLOEXEC);
    call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    err_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(disk_fd >= 0 && call_fd >= 0 && err_fd >= 0, "harness: %s", strerror(errno));
    for (unsigned i = 0; i < DISK_BYTES; i++)
        disk_pattern[i] = (uint8_t)(i * 7 + (i >> 9) * 13 + 1);
    CHECK(ftruncate(disk_fd, DISK_BYTES) == 0 && pwrite(disk_fd, disk_pattern, DISK_BYTES, 0) == DISK_BYTES,
          "harness: disk: %s", strerror(errno));
    for (int ro = 0; ro < 2; ro++) {
        uring_blk[ro] = vhd_blk_new(disk_fd, -1, DISK_SECTORS, ro, "FUZZ-PACKED", 11);
        int err = 0;
        uring_q[ro] = vhd_blk_queue_new(uring_blk[ro], 8, &err);
    }
    return 0;
}

struct packed_input {
    uint8_t flags, misc;
    uint32_t num;
    uint16_t desc_off, driver_off, device_off, avail_base, used_base;
    struct vhd_inflight_region_packed *reg;
};

static int part_ok(uint64_t off, uint64_t len, uint64_t align)
{
    if (off >= G.total || len > G.total - off)
        return 0;
    if ((off < G.size[0]) != (off + len - 1 < G.size[0]))
        return 0;
    return off % align == 0;
}

static int in_desc_ring(const struct packed_input *p, uint64_t off)
{
    return off >= p->desc_off && off - p->desc_off < 16ull * p->num;
}

static int in_device_area(const struct packed_input *p, uint64_t off)
{
    return off >= p->device_off && off - p->device_off < 4;
}

/* The device changed only what it may, and logged it. */
static void check_writes_packed(const struct packed_input *p)
{
    for (uint64_t off = 0; off < G.total; off++) {
        if (*guest_ptr(off) == G.before[off])
            continue;
        CHECK(G.allowed[off] || in_desc_ring(p, off) || in_device_area(p, off),
              "device wrote guest byte at gpa %#llx (%#x -> %#x): not a device-writable buffer, the descriptor "
              "ring or the device area", (unsigned long long)(G.base + off), G.before[off], *guest_ptr(off));
        if (!L.on || G.base + off >= 0x100000000ull)
            continue;
        if (in_device_area(p, off) && !L.used)
            continue;   /* the device area is logged at log_guest_addr only with VHOST_VRING_F_LOG */
        CHECK(log_bit(G.base + off), "device changed guest byte at gpa %#llx but did not log its page",
              (unsigned long long)(G.base + off));
    }
    if (!L.on)
        return;
    for (uint64_t byte = 0; byte < LOG_BYTES; byte++) {
        for (int b = 0; L.bits[byte] && b < 8; b++) {
            if (!(L.bits[byte] >> b & 1))
                continue;
            uint64_t gpa = (byte * 8 + (uint64_t)b) << 12, hit = 0;
            for (uint64_t off = gpa > G.base ? gpa - G.base : 0; off < G.total && G.base + off < gpa + PAGE; off++)
                hit |= G.allowed[off] || in_desc_ring(p, off) || (L.used && in_device_area(p, off));
            CHECK(hit, "logged page at gpa %#llx holds no byte the device may write", (unsigned long long)gpa);
        }
    }
}

static void check_inflight_packed(const struct vhd_inflight_region_packed *reg, vhd_vring *vr, uint32_t num)
{
    if (vhd_vring_stats(vr)->broken || tracks[0].known_hit || vhd_vring_pending(vr))
        return;
    uint16_t used = vhd_vring_used_idx(vr);
    CHECK(reg->used_idx == (used & 0x7fff) && reg->used_wrap_counter == (used >> 15),
          "inflight used %u/%u, device's %#x", reg->used_idx, reg->used_wrap_counter, used);
    CHECK(reg->old_used_idx == reg->used_idx && reg->old_free_head == reg->free_head,
          "inflight region left mid-batch: used %u old %u, free %u old %u", reg->used_idx, reg->old_used_idx,
          reg->free_head, reg->old_free_head);
    for (uint32_t i = 0; i < num; i++)
        CHECK(reg->desc[i].inflight != 1, "entry %u still marked in flight after the ring drained", i);
}

static void disk_reset(void)
{
    static uint8_t now[DISK_BYTES];
    struct stat st;
    CHECK(fstat(disk_fd, &st) == 0, "harness: fstat");
    if (st.st_size != DISK_BYTES)
        CHECK(ftruncate(disk_fd, DISK_BYTES) == 0, "harness: ftruncate");
    CHECK(pread(disk_fd, now, DISK_BYTES, 0) == DISK_BYTES, "harness: pread");
    if (memcmp(now, disk_pattern, DISK_BYTES) != 0)
        CHECK(pwrite(disk_fd, disk_pattern, DISK_BYTES, 0) == DISK_BYTES, "harness: pwrite");
}

static void run(const struct packed_input *p)
{
    int device = p->misc >> 2 & 3, readonly = !!(p->flags & 8);
    int uring = device == 0 && (p->flags & 16) && uring_q[readonly];
    disk_reset();
    eventfd_take(err_fd);
    tracks_reset();
    vhd_vring *vr = vhd_vring_new();
    CHECK(vr, "vhd_vring_new failed");
    struct vhd_vring_config cfg = {
        .num = p->num,
        .desc_uva = p->desc_off < G.total ? guest_uva(p->desc_off) : 0xdead00000000ull,
        .avail_uva = p->driver_off < G.total ? guest_uva(p->driver_off) : 0xdead00000000ull,
        .used_uva = p->device_off < G.total ? guest_uva(p->device_off) : 0xdead00000000ull,
        .last_avail_idx = p->avail_base,
        .packed = 1,
        .used_base = p->used_base,
        .event_idx = p->flags & 2,
        .indirect = p->flags & 1,
        .call_fd = (p->flags & 64) ? -1 : call_fd,
        .err_fd = err_fd,
        .broken_fd = -1,
        .inflight = p->reg,
        .log = L.on ? L.log : NULL,
        .log_used = L.used,
        .log_used_gpa = G.base + p->device_off,
    };
    int rc = vhd_vring_setup(vr, G.mem, &cfg);
    int expect = part_ok(p->desc_off, 16ull * p->num, 16) && part_ok(p->driver_off, 4, 4) &&
                 part_ok(p->device_off, 4, 4) && (p->avail_base & 0x7fff) < p->num && (p->used_base & 0x7fff) < p->num;
    CHECK((rc == 0) == expect, "packed setup(num %u, desc +%#x, driver +%#x, device +%#x, base %#x/%#x) = %d, "
          "expected %s", p->num, p->desc_off, p->driver_off, p->device_off, p->avail_base, p->used_base, rc,
          expect ? "success" : "failure");
    if (rc != 0) {
        CHECK(rc == -EINVAL || rc == -EFAULT, "vhd_vring_setup returned %d", rc);
        vhd_vring_free(vr);
        return;
    }
    CHECK(vhd_vring_is_packed(vr), "setup with packed=1 gave a split ring");
    struct ring_track *t = track_new(vr, p->num, p->driver_off, p->device_off);
    uint16_t avail0 = vhd_vring_last_avail_idx(vr), used0 = vhd_vring_used_idx(vr);
    if (device == 0 && !uring) {
        vhd_blk *blk = vhd_blk_new(disk_fd, -1, DISK_SECTORS, readonly, "FUZZ-PACKED", 11);
        CHECK(blk, "vhd_blk_new failed");
        int n = vhd_process_ring(vr, VHD_DEV_BLK, blk);
        CHECK(n >= 0 && (uint64_t)n == t->pops, "vhd_process_ring returned %d, %llu chains popped", n,
              (unsigned long long)t->pops);
        vhd_blk_free(blk);
    } else if (device == 0) {
        for (int round = 0; round < 4; round++) {
            int r = vhd_process_ring(vr, VHD_DEV_BLK_URING, uring_q[readonly]);
            for (long spins = 0; vhd_blk_queue_quiesce(uring_q[readonly], vr) > 0; spins++)
                CHECK(spins < 100000000, "io_uring requests never completed");
            CHECK(r <= 0, "vhd_blk_queue_run returned %d", r);
            if (r < 0 || vhd_vring_stats(vr)->broken || !vhd_vring_pending(vr))
                break;
        }
    } else {
        vhd_net *net = vhd_net_new(-1);
        CHECK(net, "vhd_net_new failed");
        vhd_net_configure(net, 12, device == 3, 0, 0);
        t->null_rx = device >= 2;
        vhd_process_ring(vr, device == 1 ? VHD_DEV_NET_TX : VHD_DEV_NET_RX, net);
        vhd_net_free(net);
    }
    eventfd_take(call_fd);
    const struct vhd_vring_stats *st = vhd_vring_stats(vr);
    if (fuzz_verbose())
        fprintf(stderr, "packed ring of %u, device %d%s: %llu popped, %llu used, %llu given back, %llu resubmitted; "
                "broken %lld%s\n", p->num, device, uring ? " (io_uring)" : "", (unsigned long long)t->pops,
                (unsigned long long)t->pushes, (unsigned long long)t->unpopped, (unsigned long long)t->resubmitted,
                (long long)st->broken, t->known_hit ? " (known bug hit)" : "");
    if (!t->known_hit) {
        CHECK(t->n_out == 0, "%u popped chains were neither used nor given back (broken=%lld)", t->n_out,
              (long long)st->broken);
        CHECK(eventfd_take(err_fd) == (st->broken != 0), "broken=%lld but the err eventfd disagrees",
              (long long)st->broken);
        /* With nothing in flight at the start, whatever was consumed was used:
         * the used position ends where the avail position is. */
        if (avail0 == used0 && !p->reg && !st->broken)
            CHECK(vhd_vring_used_idx(vr) == vhd_vring_last_avail_idx(vr),
                  "used position %#x, avail position %#x after %llu chains", vhd_vring_used_idx(vr),
                  vhd_vring_last_avail_idx(vr), (unsigned long long)t->pushes);
    }
    if (p->reg)
        check_inflight_packed(p->reg, vr, p->num);
    check_writes_packed(p);
    struct stat sb;
    CHECK(fstat(disk_fd, &sb) == 0 && sb.st_size == DISK_BYTES, "disk size changed");
    if (readonly) {
        static uint8_t now[DISK_BYTES];
        CHECK(pread(disk_fd, now, DISK_BYTES, 0) == DISK_BYTES, "harness: pread");
        CHECK(memcmp(now, disk_pattern, DISK_BYTES) == 0, "read-only disk was written");
    }
    vhd_vring_free(vr);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader in = { data, size };
    struct packed_input p = { 0 };
    p.flags = take8(&in);
    p.num = 1 + take8(&in) % 128;
    uint8_t pages = take8(&in);
    p.misc = take8(&in);
    p.desc_off = take16(&in);
    p.driver_off = take16(&in);
    p.device_off = take16(&in);
    p.avail_base = take16(&in);
    p.used_base = take16(&in);
    if ((p.flags & 128) && (p.misc >> 2 & 3) == 0) {
        size_t len = sizeof(*p.reg) + p.num * sizeof(p.reg->desc[0]);
        p.reg = malloc(len);
        CHECK(p.reg, "harness: malloc");
        for (size_t i = 0; i < len; i++)
            ((uint8_t *)p.reg)[i] = take8(&in);
    }
    guest_setup(1 + (pages & 7), 1 + (pages >> 4 & 7), p.flags & 4, p.misc & 3, p.flags & 32, in.p, in.n);
    log_select(pages);
    guest_snapshot();
    run(&p);
    free(p.reg);
    guest_free();
    return 0;
}
