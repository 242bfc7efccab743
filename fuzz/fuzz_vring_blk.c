/* libFuzzer target: one virtio-blk split ring in hostile guest memory.
 *
 * Input (little-endian; missing bytes read as 0):
 *   0  u8  flags: 1 INDIRECT_DESC, 2 EVENT_IDX, 4 two regions, 8 read-only
 *              disk, 16 io_uring engine, 32 gap between the regions' uvas,
 *              64 no call eventfd, 128 inflight tracking
 *   1  u8  ring size: 1 << (v % 9), so 1..256
 *   2  u8  region pages: region 0 has 1 + (v & 7), region 1 1 + (v >> 4 & 7);
 *          bit 3: dirty logging (VHOST_F_LOG_ALL), bit 7: the used ring is
 *          logged too (VHOST_VRING_F_LOG); fuzz_common.h check_log()
 *   3  u8  bits 0-1: where guest memory starts (fuzz_common.h guest_base);
 *          bits 2-7: serial length (0..63, truncated to 20 by the device)
 *   4  6 x u16: desc, avail and used ring offsets in guest memory,
 *          last_avail_idx, avail->idx, used->idx
 *   16 with inflight tracking: the ring's inflight region as the front-end
 *          hands it over (16-byte header, 16 bytes per descriptor: see
 *          vhd.h), 16 + 16 * ring size bytes
 *   ... guest memory image from guest offset 0 (descriptors, rings,
 *          request headers and buffers; descriptor addresses are gpas)
 *
 * Run: vhd_process_ring(VHD_DEV_BLK) on a 64-sector memfd disk (or the
 * io_uring engine, on a 64-sector file in $TMPDIR so that its RWF_NOWAIT
 * inline path runs, until the ring is idle, then drained).  Checked: no
 * crash/sanitizer report/guard-page fault; fuzz_common.h's chain, push
 * and ring invariants; the device writes only device-writable buffers and
 * its used ring; the disk keeps its size, and its content when read-only;
 * the return value counts the chains handled; with inflight tracking, once
 * the ring is drained nothing is left marked in flight and the region's
 * used_idx is the device's.  The inflight region is allocated at its exact
 * size, so ASan sees any access past it.
 */
#include <fcntl.h>
#include <sys/stat.h>

#include "fuzz_common.h"

#define DISK_SECTORS 64u
#define DISK_BYTES (DISK_SECTORS * 512u)

static int disk_fd[2] = { -1, -1 };    /* sync engine (memfd), io_uring engine (file) */
static int call_fd, err_fd;
static uint8_t disk_pattern[DISK_BYTES];
static vhd_blk *uring_blk[2];          /* read-write, read-only */
static vhd_blk_queue *uring_q[2];

/* DISCARD / WRITE_ZEROES as vhostd offers them: a memfd has holes but no
 * ZERO_RANGE, a file in $TMPDIR (ext4, tmpfs) one or the other. */
static void trim_on(vhd_blk *blk, int zeroes)
{
    struct vhd_blk_trim t = { .discard = VHD_BLK_DISCARD_UNMAP, .zeroes = zeroes, .may_unmap = 1,
                              .max_discard_sectors = 16, .max_discard_seg = 4,
                              .max_zeroes_sectors = 16, .max_zeroes_seg = 4 };
    vhd_blk_set_trim(blk, &t);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    guest_init_once();
    disk_fd[0] = memfd_create("fuzz-disk", MFD_CLOEXEC);
    const char *tmp = getenv("TMPDIR");
    disk_fd[1] = open(tmp && *tmp ? tmp : "/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (disk_fd[1] < 0)
        disk_fd[1] = memfd_create("fuzz-disk-uring", MFD_CLOEXEC);
    call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    err_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(disk_fd[0] >= 0 && disk_fd[1] >= 0 && call_fd >= 0 && err_fd >= 0, "harness: %s", strerror(errno));
    for (unsigned i = 0; i < DISK_BYTES; i++)
        disk_pattern[i] = (uint8_t)(i * 7 + (i >> 9) * 13 + 1);
    for (int d = 0; d < 2; d++)
        CHECK(ftruncate(disk_fd[d], DISK_BYTES) == 0 && pwrite(disk_fd[d], disk_pattern, DISK_BYTES, 0) == DISK_BYTES,
              "harness: disk: %s", strerror(errno));
    for (int ro = 0; ro < 2; ro++) {
        uring_blk[ro] = vhd_blk_new(disk_fd[1], -1, DISK_SECTORS, ro, "FUZZ-URING", 10);
        trim_on(uring_blk[ro], VHD_BLK_ZEROES_PUNCH);
        int err = 0;
        uring_q[ro] = vhd_blk_queue_new(uring_blk[ro], 8, &err);
        if (!uring_q[ro])
            fprintf(stderr, "fuzz_vring_blk: io_uring unavailable (%d): sync engine only\n", err);
    }
    return 0;
}

/* Puts the disk back as it was (rewriting only what changed: the io_uring
 * disk is a real file and its flushes then have less to write). */
static void disk_reset(int fd)
{
    static uint8_t now[DISK_BYTES];
    struct stat st;
    CHECK(fstat(fd, &st) == 0, "harness: fstat");
    if (st.st_size != DISK_BYTES)
        CHECK(ftruncate(fd, DISK_BYTES) == 0, "harness: ftruncate");
    CHECK(pread(fd, now, DISK_BYTES, 0) == DISK_BYTES, "harness: pread: %s", strerror(errno));
    for (unsigned off = 0; off < DISK_BYTES; off += 512)
        if (memcmp(now + off, disk_pattern + off, 512) != 0)
            CHECK(pwrite(fd, disk_pattern + off, 512, off) == 512, "harness: pwrite");
}

static void disk_check(int fd, int readonly)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && st.st_size == DISK_BYTES, "disk size changed to %lld", (long long)st.st_size);
    if (readonly) {
        static uint8_t now[DISK_BYTES];
        CHECK(pread(fd, now, DISK_BYTES, 0) == DISK_BYTES, "harness: pread");
        CHECK(memcmp(now, disk_pattern, DISK_BYTES) == 0, "read-only disk was written");
    }
}

/* After a drained, unbroken run nothing is in flight any more. */
static void check_inflight(const struct vhd_inflight_region *reg, vhd_vring *vr, uint32_t num)
{
    if (vhd_vring_stats(vr)->broken || tracks[0].known_hit)
        return;
    CHECK(reg->used_idx == vhd_vring_used_idx(vr), "inflight used_idx %u, device's %u", reg->used_idx,
          vhd_vring_used_idx(vr));
    for (uint32_t i = 0; i < num; i++)
        CHECK(reg->desc[i].inflight != 1, "descriptor %u still marked in flight after the ring drained", i);
}

struct blk_input {
    uint8_t flags, misc;
    uint32_t num;
    struct ring_input ri;
    int readonly;
    struct vhd_inflight_region *reg;
};

/* What a run left: the used elements it added (up to 4) and whether it
 * qualifies for the engine comparison (exactly one chain, nothing odd). */
struct outcome {
    int set_up, single;
    uint32_t used[4][2];
    uint8_t first_hdr[16];
    uint32_t first_out_len, first_in_len;
    uint8_t status_sync;
};

static uint8_t mem_after[MAX_MEM], disk_after[DISK_BYTES];

/* No buffer overlaps the used ring, and no readable byte is also writable:
 * otherwise what an io_uring request (possibly run later by a kernel
 * worker) reads or leaves depends on when it ran.  The guest's problem, not
 * a difference between the engines. */
static int buffers_apart(const struct ring_track *t)
{
    for (uint64_t off = 0; off < G.total; off++) {
        int used = off >= t->used_off && off - t->used_off < 6 + 8ull * t->num;
        if ((G.readable[off] && (G.allowed[off] || used)) || (G.allowed[off] && used))
            return 0;
    }
    return 1;
}

/* Sets the ring up on the guest memory in G and runs one engine over it. */
static struct outcome run(const struct blk_input *bi, int uring, int disk, const char *serial, uint32_t serial_len)
{
    struct outcome o = { 0 };
    const struct ring_input *ri = &bi->ri;
    uint16_t avail0 = ri->avail_off + 4u <= G.total ? guest_get16(ri->avail_off + 2u) : 0;
    disk_reset(disk);
    eventfd_take(err_fd);
    tracks_reset();
    struct ring_track *t = NULL;
    vhd_vring *vr = ring_setup(ri, bi->flags & 2, bi->flags & 1, (bi->flags & 64) ? -1 : call_fd, err_fd, bi->reg,
                               &t);
    if (!vr)
        return o;
    o.set_up = 1;
    if (!uring) {
        vhd_blk *blk = vhd_blk_new(disk, -1, DISK_SECTORS, bi->readonly, serial, serial_len);
        CHECK(blk, "vhd_blk_new failed");
        trim_on(blk, VHD_BLK_ZEROES_PUNCH);
        int n = vhd_process_ring(vr, VHD_DEV_BLK, blk);
        CHECK(n >= 0 && (uint64_t)n == t->pops, "vhd_process_ring returned %d, %llu chains were popped", n,
              (unsigned long long)t->pops);
        vhd_blk_free(blk);
    } else {
        /* Run until idle, as the worker would on completion events. */
        for (int round = 0; round < 100000; round++) {
            int rc = vhd_process_ring(vr, VHD_DEV_BLK_URING, uring_q[bi->readonly]);
            /* What a stopping ring's worker does on completion events. */
            for (long spins = 0; vhd_blk_queue_quiesce(uring_q[bi->readonly], vr) > 0; spins++)
                CHECK(spins < 100000000, "io_uring requests never completed");
            CHECK(rc <= 0, "vhd_blk_queue_run returned %d", rc);
            if (rc < 0 || vhd_vring_stats(vr)->broken || !vhd_vring_pending(vr))
                break;
        }
    }
    eventfd_take(call_fd);
    check_ring(t, ri->avail_off, avail0, err_fd, 1);
    if (bi->reg)
        check_inflight(bi->reg, vr, bi->num);
    check_writes();
    disk_check(disk, bi->readonly);
    for (uint64_t i = 0; i < t->pushes && i < 4; i++) {
        uint64_t e = t->used_off + 4 + 8 * ((t->used_idx0 + i) & (t->num - 1));
        for (int k = 0; k < 2; k++)
            for (int b = 0; b < 4; b++)
                o.used[i][k] |= (uint32_t)*guest_ptr(e + 4 * k + b) << (8 * b);
    }
    o.single = t->pops == 1 && t->pushes == 1 && !t->known_hit && !t->resubmitted &&
               !vhd_vring_stats(vr)->broken && !device_may_write(ri->avail_off, 6 + 2ull * t->num, NULL) &&
               buffers_apart(t);
    memcpy(o.first_hdr, t->first_hdr, sizeof(o.first_hdr));
    o.first_out_len = t->first_out_len;
    o.first_in_len = t->first_in_len;
    vhd_vring_free(vr);
    return o;
}

static void guest_restore(void)
{
    memcpy(G.hva[0], G.before, G.size[0]);
    if (G.nregions > 1)
        memcpy(G.hva[1], G.before + G.size[0], G.size[1]);
    memset(G.allowed, 0, G.total);
    memset(G.readable, 0, G.total);
}

static void guest_copy(uint8_t *dst)
{
    memcpy(dst, G.hva[0], G.size[0]);
    if (G.nregions > 1)
        memcpy(dst + G.size[0], G.hva[1], G.size[1]);
}

/* The io_uring engine must do what the sync engine does.  Compared on
 * inputs where one chain was handled, so the order of completions cannot
 * matter: the same used element, guest memory and disk afterwards. */
static void compare_engines(const struct blk_input *bi)
{
    static const char serial[] = "FUZZ-URING";
    struct outcome a = run(bi, 0, disk_fd[1], serial, 10);
    if (!a.set_up)
        return;
    int compare = a.single;
    if (compare) {
        guest_copy(mem_after);
        CHECK(pread(disk_fd[1], disk_after, DISK_BYTES, 0) == DISK_BYTES, "harness: pread");
    }
    guest_restore();
    struct outcome b = run(bi, 1, disk_fd[1], serial, 10);
    if (!compare || !b.single)
        return;
    static uint8_t disk_now[DISK_BYTES];
    CHECK(pread(disk_fd[1], disk_now, DISK_BYTES, 0) == DISK_BYTES, "harness: pread");
    uint32_t type = (uint32_t)(a.first_hdr[0] | a.first_hdr[1] << 8 | a.first_hdr[2] << 16 | (uint32_t)a.first_hdr[3] << 24);
    int no_data = (type == 0 && a.first_in_len == 1) || (type == 1 && a.first_out_len == 16);
    if (no_data && !fuzz_strict() && memcmp(a.used, b.used, sizeof(a.used)) == 0)
        return;   /* KNOWN BUG (fuzz/repro/README.md, zero-length I/O): io_uring fails it, sync completes it */
    CHECK(memcmp(a.used, b.used, sizeof(a.used)) == 0, "engines differ: used element (%u, %u) sync, (%u, %u) io_uring",
          a.used[0][0], a.used[0][1], b.used[0][0], b.used[0][1]);
    for (uint64_t off = 0; off < G.total; off++)
        CHECK(*guest_ptr(off) == mem_after[off], "engines differ: guest byte at gpa %#llx is %#x after sync, %#x "
              "after io_uring", (unsigned long long)(G.base + off), mem_after[off], *guest_ptr(off));
    CHECK(memcmp(disk_now, disk_after, DISK_BYTES) == 0, "engines differ: disk contents");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader in = { data, size };
    struct blk_input bi = { 0 };
    bi.flags = take8(&in);
    bi.num = 1u << (take8(&in) % 9);
    uint8_t pages = take8(&in);
    bi.misc = take8(&in);
    read_ring(&in, bi.num, &bi.ri);
    bi.readonly = !!(bi.flags & 8);
    int uring = (bi.flags & 16) && uring_q[bi.readonly];
    if (bi.flags & 128) {
        size_t len = sizeof(*bi.reg) + bi.num * sizeof(bi.reg->desc[0]);
        bi.reg = malloc(len);
        CHECK(bi.reg, "harness: malloc");
        for (size_t i = 0; i < len; i++)
            ((uint8_t *)bi.reg)[i] = take8(&in);
    }

    guest_setup(1 + (pages & 7), 1 + (pages >> 4 & 7), bi.flags & 4, bi.misc & 3, bi.flags & 32, in.p, in.n);
    log_select(pages);
    ring_store_indices(&bi.ri);
    guest_snapshot();
    if (uring && !bi.reg) {
        compare_engines(&bi);
    } else {
        static const char serial[64] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!";
        run(&bi, uring, disk_fd[uring], serial, bi.misc >> 2);
    }
    free(bi.reg);
    guest_free();
    return 0;
}
