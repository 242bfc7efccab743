/* Shared code of the fuzzers (fuzz_mem uses the guarded mappings only).
 *
 * Included by exactly one translation unit per fuzzer binary.  It provides:
 *
 * - An input reader: fields are taken little-endian from the front of the
 *   input; a field past the end of the input reads as zero.
 *
 * - Guarded guest memory.  native/mem.c is compiled with
 *   -Dmmap=fuzz_mmap -Dmunmap=fuzz_munmap, so every mapping vhd_mem_add()
 *   makes sits between two PROT_NONE pages: a byte read or written just
 *   outside a region faults (ASan does not watch mmap()ed memory).  Region
 *   sizes are whole pages and mmap offsets 0, so the mapping is exactly the
 *   region.
 *
 * - Ring tracking.  The Makefile renames the definitions of vhd_vring_pop,
 *   vhd_vring_push and vhd_vring_unpop in (a copy of) native/vring.c to
 *   __real_vhd_vring_*, so every call the device code makes (vring.c's own
 *   drain loop included) goes through the versions below.  They check each
 *   popped chain (every iovec non-empty and inside one guest region, the
 *   lengths adding up), record which guest bytes the device may write (the
 *   device-writable buffers), keep the multiset of chains popped but
 *   neither used nor given back, and stop a call that never ends.
 *
 * - End-of-run invariants (check_ring(), check_writes()): see there.
 *
 * - Known-bug workarounds, marked KNOWN BUG and described in
 *   fuzz/repro/README.md; VHD_FUZZ_STRICT=1 turns them off.
 *
 * A violated invariant calls fuzz_fail(), which prints why and abort()s:
 * libFuzzer reports it as a crash and saves the input.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhd.h"

#pragma clang diagnostic ignored "-Wunused-function"

#define PAGE 4096u
#define MAX_REGION_PAGES 8u
#define MAX_MEM (2u * MAX_REGION_PAGES * PAGE)
/* More vhd_vring_pop() calls than this on one ring in one run is a hang.
 * With one thread and avail->idx constant, a call pops each available
 * chain once (a ring holds at most num), re-pops chains net RX gave back
 * (at most 65 per frame), and ends its loop with one empty pop per batch. */
#define RUNAWAY_CALLS(num) (8ull * (num) + 2048)

static void fuzz_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fuzz_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "\n==FUZZ INVARIANT== ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

#define CHECK(cond, ...) do { if (!(cond)) fuzz_fail(__VA_ARGS__); } while (0)

/* VHD_FUZZ_STRICT=1: known bugs are not worked around (for reproducers). */
static int fuzz_strict(void)
{
    static int v = -1;
    if (v < 0) {
        /* Strict by default: the bugs the workarounds stepped around are
         * fixed.  VHD_FUZZ_STRICT=0 turns the old workarounds back on. */
        const char *s = getenv("VHD_FUZZ_STRICT");
        v = !(s && strcmp(s, "0") == 0);
    }
    return v;
}

/* VHD_FUZZ_VERBOSE=1: one line per ring run (for checking seeds). */
static int fuzz_verbose(void)
{
    static int v = -1;
    if (v < 0) {
        const char *s = getenv("VHD_FUZZ_VERBOSE");
        v = s && *s && strcmp(s, "0") != 0;
    }
    return v;
}

/* --- input ----------------------------------------------------------------- */

struct reader {
    const uint8_t *p;
    size_t n;
};

static uint64_t take(struct reader *r, unsigned bytes)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < bytes; i++) {
        uint64_t b = 0;
        if (r->n) {
            b = *r->p++;
            r->n--;
        }
        v |= b << (8 * i);
    }
    return v;
}

static uint8_t take8(struct reader *r) { return (uint8_t)take(r, 1); }
static uint16_t take16(struct reader *r) { return (uint16_t)take(r, 2); }

/* --- guarded mappings (mem.c's mmap/munmap) ------------------------------------- */

struct gmap {
    uint8_t *reserve;     /* guard + mapping + guard */
    size_t reserve_len;
    void *addr;
};
static struct gmap gmaps[64];

void *fuzz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int fuzz_munmap(void *addr, size_t len);

void *fuzz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (addr || (flags & MAP_FIXED) || len == 0)
        return mmap(addr, len, prot, flags, fd, off);
    size_t rl = (len + PAGE - 1) & ~(size_t)(PAGE - 1);
    if (rl < len || rl + 2 * PAGE < rl) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    struct gmap *g = NULL;
    for (size_t i = 0; i < sizeof(gmaps) / sizeof(gmaps[0]) && !g; i++)
        if (!gmaps[i].reserve)
            g = &gmaps[i];
    CHECK(g, "harness: more than 64 guarded mappings alive (leak in vhd_mem?)");
    uint8_t *res = mmap(NULL, rl + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED)
        return MAP_FAILED;
    void *p = mmap(res + PAGE, len, prot, flags | MAP_FIXED, fd, off);
    if (p == MAP_FAILED) {
        int e = errno;
        munmap(res, rl + 2 * PAGE);
        errno = e;
        return MAP_FAILED;
    }
    g->reserve = res;
    g->reserve_len = rl + 2 * PAGE;
    g->addr = p;
    return p;
}

int fuzz_munmap(void *addr, size_t len)
{
    for (size_t i = 0; i < sizeof(gmaps) / sizeof(gmaps[0]); i++) {
        struct gmap *g = &gmaps[i];
        if (g->reserve && g->addr == addr) {
            CHECK(len + 2 * PAGE <= g->reserve_len, "munmap of %zu bytes, mapped %zu", len, g->reserve_len - 2 * PAGE);
            int rc = munmap(g->reserve, g->reserve_len);
            memset(g, 0, sizeof(*g));
            return rc;
        }
    }
    return munmap(addr, len);
}

static size_t gmaps_alive(void)
{
    size_t n = 0;
    for (size_t i = 0; i < sizeof(gmaps) / sizeof(gmaps[0]); i++)
        n += gmaps[i].reserve != NULL;
    return n;
}

/* --- guest memory ------------------------------------------------------------ */

/* Guest memory is one or two regions, adjacent in guest-physical space
 * (buffers can straddle them) and mapped separately in the back-end.
 * A guest byte has an "offset": gpa - base, 0 .. total-1. */
struct guest {
    vhd_mem *mem;
    int nregions;
    uint64_t base;
    uint64_t gpa[2], size[2], uva[2];
    uint8_t *hva[2];
    uint64_t total;
    uint8_t before[MAX_MEM];     /* guest memory before the device ran */
    uint8_t allowed[MAX_MEM];    /* 1: inside a device-writable buffer of a popped chain */
    uint8_t readable[MAX_MEM];   /* 1: inside a device-readable buffer of a popped chain */
};

static struct guest G;
static int region_fd[2] = { -1, -1 };

static void guest_init_once(void)
{
    for (int i = 0; i < 2; i++) {
        if (region_fd[i] >= 0)
            continue;
        region_fd[i] = memfd_create("fuzz-guest", MFD_CLOEXEC);
        CHECK(region_fd[i] >= 0 && ftruncate(region_fd[i], MAX_REGION_PAGES * PAGE) == 0,
              "harness: memfd: %s", strerror(errno));
    }
}

#define UVA_BASE 0x7f1200000000ull

/* base_sel picks where guest memory starts: low memory, 1 MiB, just under
 * 4 GiB, or just under the top of the 64-bit space (so that gpa + len
 * overflows for buffers running past the end). */
static uint64_t guest_base(uint8_t base_sel, uint64_t total)
{
    switch (base_sel & 3) {
    case 0: return 0;
    case 1: return 0x100000;
    case 2: return 0x100000000ull - total;
    default: return 0ull - total - PAGE;
    }
}

/* Sets up G with pages0 (+ pages1 if two) pages and copies image in. */
static void guest_setup(unsigned pages0, unsigned pages1, int two, uint8_t base_sel, int uva_gap,
                        const uint8_t *image, size_t image_len)
{
    guest_init_once();
    G.nregions = two ? 2 : 1;
    G.size[0] = (uint64_t)pages0 * PAGE;
    G.size[1] = two ? (uint64_t)pages1 * PAGE : 0;
    G.total = G.size[0] + G.size[1];
    G.base = guest_base(base_sel, G.total);
    G.mem = vhd_mem_new();
    CHECK(G.mem, "vhd_mem_new failed");
    uint64_t uva = UVA_BASE;
    for (int i = 0; i < G.nregions; i++) {
        G.gpa[i] = G.base + (i ? G.size[0] : 0);
        G.uva[i] = uva;
        uva += G.size[i] + (uva_gap ? PAGE : 0);
        int rc = vhd_mem_add(G.mem, region_fd[i], G.gpa[i], G.size[i], G.uva[i], 0);
        CHECK(rc == 0, "vhd_mem_add(region %d, gpa %#llx, size %#llx) = %d", i,
              (unsigned long long)G.gpa[i], (unsigned long long)G.size[i], rc);
        G.hva[i] = vhd_mem_gpa_to_hva(G.mem, G.gpa[i], G.size[i]);
        CHECK(G.hva[i] && ((uintptr_t)G.hva[i] & (PAGE - 1)) == 0, "region %d: bad hva %p", i, (void *)G.hva[i]);
        memset(G.hva[i], 0, G.size[i]);
    }
    size_t n = image_len < G.total ? image_len : G.total;
    size_t n0 = n < G.size[0] ? n : G.size[0];
    memcpy(G.hva[0], image, n0);
    if (n > n0)
        memcpy(G.hva[1], image + n0, n - n0);
    memset(G.allowed, 0, G.total);
    memset(G.readable, 0, G.total);
}

static void guest_free(void)
{
    vhd_mem_free(G.mem);
    G.mem = NULL;
    CHECK(gmaps_alive() == 0, "vhd_mem_free left %zu mappings", gmaps_alive());
}

/* Guest byte offset of a host address, or -1 if outside guest memory. */
static int64_t guest_off(const void *p)
{
    for (int i = 0; i < G.nregions; i++) {
        const uint8_t *h = p;
        if (h >= G.hva[i] && h < G.hva[i] + G.size[i])
            return (int64_t)(h - G.hva[i]) + (i ? (int64_t)G.size[0] : 0);
    }
    return -1;
}

static uint8_t *guest_ptr(uint64_t off)
{
    return off < G.size[0] ? G.hva[0] + off : G.hva[1] + (off - G.size[0]);
}

static void guest_snapshot(void)
{
    memcpy(G.before, G.hva[0], G.size[0]);
    if (G.nregions > 1)
        memcpy(G.before + G.size[0], G.hva[1], G.size[1]);
}

/* Writes a 16-bit value at a guest-physical address if it is in memory. */
static void guest_put16(uint64_t gpa, uint16_t v)
{
    uint64_t off = gpa - G.base;
    if (gpa < G.base || off + 2 > G.total || off + 2 < off)
        return;
    uint8_t b[2] = { (uint8_t)v, (uint8_t)(v >> 8) };
    *guest_ptr(off) = b[0];
    *guest_ptr(off + 1) = b[1];
}

static uint16_t guest_get16(uint64_t off)
{
    return (uint16_t)(*guest_ptr(off) | *guest_ptr(off + 1) << 8);
}

/* The uva of a guest offset (region i's uva space is contiguous). */
static uint64_t guest_uva(uint64_t off)
{
    if (off < G.size[0] || G.nregions == 1)
        return G.uva[0] + off;
    return G.uva[1] + (off - G.size[0]);
}

/* Marks [off, off+len) allowed for device writes. */
static void allow(uint64_t off, uint64_t len)
{
    CHECK(off <= G.total && len <= G.total - off, "allow out of range");
    memset(G.allowed + off, 1, len);
}

/* --- ring tracking ---------------------------------------------------------- */

struct outstanding {
    uint16_t head;
    uint32_t in_len;
};

struct ring_track {
    vhd_vring *vr;
    uint32_t num;
    uint64_t used_off;        /* guest offset of the used ring */
    uint64_t avail_off;       /* guest offset of the avail ring */
    uint16_t last_avail0;     /* at setup */
    uint16_t used_idx0;
    uint64_t pop_calls;       /* vhd_vring_pop() calls, whatever they returned */
    uint64_t pops, pushes, unpopped;
    uint64_t resubmitted;     /* chains the inflight region had in flight at setup */
    uint8_t first_hdr[16];    /* first bytes of the first chain popped */
    uint32_t first_out_len, first_in_len;
    unsigned max_iovs;        /* most iovecs in one chain popped */
    int null_rx;              /* net RX on the null back-end (known bug hook) */
    int known_hit;            /* a known bug was hit and worked around */
    unsigned n_out;
    struct outstanding out[4096];   /* last: track_new() clears what precedes it */
};

static struct ring_track tracks[2];
static unsigned n_tracks;

static struct ring_track *track_of(const vhd_vring *vr)
{
    for (unsigned i = 0; i < n_tracks; i++)
        if (tracks[i].vr == vr)
            return &tracks[i];
    fuzz_fail("ring %p is not tracked", (const void *)vr);
}

static struct ring_track *track_new(vhd_vring *vr, uint32_t num, uint64_t avail_off, uint64_t used_off)
{
    CHECK(n_tracks < 2, "harness: too many rings");
    struct ring_track *t = &tracks[n_tracks++];
    memset(t, 0, offsetof(struct ring_track, out));
    t->vr = vr;
    t->num = num;
    t->used_off = used_off;
    t->avail_off = avail_off;
    t->last_avail0 = vhd_vring_last_avail_idx(vr);
    t->resubmitted = vhd_vring_stats(vr)->resubmitted;
    t->used_idx0 = vhd_vring_used_idx(vr);
    return t;
}

/* --- dirty log (VHOST_F_LOG_ALL) ------------------------------------------------ */

/* The bitmap covers guest-physical addresses below 4 GiB (two of the four
 * guest bases); memory near the top of the 64-bit space lies past it, so
 * there every logged page must be refused and nothing written.  Allocated at
 * its exact size: ASan sees a write past it. */
#define LOG_BYTES (0x100000000ull >> 15)

static struct {
    int on, used;                /* the input's choice: LOG_ALL, VHOST_VRING_F_LOG */
    uint8_t *bits;
    vhd_log *log;
} L;

/* pages bits 3 (logging on) and 7 (used ring logged too), free in both
 * harnesses' region-pages byte. */
static void log_select(uint8_t pages)
{
    if (!L.bits) {
        L.bits = calloc(1, LOG_BYTES);
        CHECK(L.bits, "harness: calloc");
    }
    vhd_log_free(L.log);
    L.log = NULL;
    L.on = !!(pages & 8);
    L.used = L.on && (pages & 128);
    if (L.on) {
        L.log = vhd_log_new(L.bits, LOG_BYTES);
        CHECK(L.log, "harness: vhd_log_new");
    }
}

static int log_bit(uint64_t gpa)
{
    uint64_t page = gpa >> 12;
    return page / 8 < LOG_BYTES && (L.bits[page / 8] >> (page % 8) & 1);
}

static void tracks_reset(void)
{
    n_tracks = 0;
    if (L.bits)
        memset(L.bits, 0, LOG_BYTES);
    if (L.on) {
        vhd_log_free(L.log);
        L.log = vhd_log_new(L.bits, LOG_BYTES);   /* fresh counters per run */
        CHECK(L.log, "harness: vhd_log_new");
    }
}

static int allowed_range(uint64_t off, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++)
        if (off + i < G.total && G.allowed[off + i])
            return 1;
    return 0;
}

/* Could the device have written [off, off+len): a device-writable buffer,
 * or the used ring of a tracked ring other than except? */
static int device_may_write(uint64_t off, uint64_t len, const struct ring_track *except)
{
    if (allowed_range(off, len))
        return 1;
    for (unsigned i = 0; i < n_tracks; i++) {
        const struct ring_track *t = &tracks[i];
        if (t != except && off < t->used_off + 6 + 8ull * t->num && t->used_off < off + len)
            return 1;
    }
    return 0;
}

int __real_vhd_vring_pop(vhd_vring *vr, struct vhd_chain *c);
void __real_vhd_vring_push(vhd_vring *vr, uint16_t head, uint32_t len);
void __real_vhd_vring_unpop(vhd_vring *vr, uint16_t n);

static void check_chain(struct ring_track *t, const struct vhd_chain *c)
{
    CHECK(c->head < t->num, "popped head %u, ring size %u", c->head, t->num);
    unsigned n = (unsigned)c->n_out + c->n_in;
    CHECK(n <= VHD_MAX_IOV, "chain has %u iovecs", n);
    uint64_t out = 0, in = 0;
    for (unsigned i = 0; i < n; i++) {
        const struct iovec *v = &c->iov[i];
        CHECK(v->iov_len > 0, "chain head %u: iovec %u is empty", c->head, i);
        int64_t off = guest_off(v->iov_base);
        CHECK(off >= 0, "chain head %u: iovec %u base %p outside guest memory", c->head, i, v->iov_base);
        /* Inside one region: the last byte is in the same region. */
        int64_t last = guest_off((const uint8_t *)v->iov_base + v->iov_len - 1);
        CHECK(last == off + (int64_t)v->iov_len - 1 &&
              (off >= (int64_t)G.size[0]) == (last >= (int64_t)G.size[0]),
              "chain head %u: iovec %u [%p, +%zu) not inside one guest region", c->head, i,
              v->iov_base, v->iov_len);
        if (i < c->n_out) {
            out += v->iov_len;
            memset(G.readable + off, 1, v->iov_len);
        } else {
            in += v->iov_len;
            allow((uint64_t)off, v->iov_len);
        }
    }
    CHECK(out == c->out_len && in == c->in_len, "chain head %u: out_len %u in_len %u, iovecs add up to %llu/%llu",
          c->head, c->out_len, c->in_len, (unsigned long long)out, (unsigned long long)in);
}

int vhd_vring_pop(vhd_vring *vr, struct vhd_chain *c)
{
    struct ring_track *t = track_of(vr);
    if (++t->pop_calls > RUNAWAY_CALLS(t->num) && !t->known_hit) {
        /* avail->idx only changes here if the device writes it (the guest
         * put a used ring or a device-writable buffer over it). */
        if (fuzz_strict() || !device_may_write(t->avail_off + 2, 2, NULL))
            fuzz_fail("runaway: %llu vhd_vring_pop() calls (%llu chains) on a ring of %u: the device never "
                      "returns", (unsigned long long)t->pop_calls, (unsigned long long)t->pops, t->num);
        /* KNOWN BUG (fuzz/repro/README.md, self-feeding ring): the device's
         * own writes to the guest's ring (used->idx, used->flags,
         * avail_event, or data) keep changing avail->idx, and the call
         * never returns.  Break the ring to end it. */
        t->known_hit = 1;
        vhd_vring_set_broken(vr, VHD_ERR_LEN);
    }
    int rc = __real_vhd_vring_pop(vr, c);
    if (rc == VHD_POP_OK) {
        check_chain(t, c);
        if (t->pops == 0) {
            vhd_iov_to_buf(c->iov, c->n_out, t->first_hdr, sizeof(t->first_hdr));
            t->first_out_len = c->out_len;
            t->first_in_len = c->in_len;
        }
        t->pops++;
        if ((unsigned)c->n_out + c->n_in > t->max_iovs)
            t->max_iovs = (unsigned)c->n_out + c->n_in;
        CHECK(t->n_out < sizeof(t->out) / sizeof(t->out[0]), "more than 4096 chains outstanding");
        t->out[t->n_out].head = c->head;
        t->out[t->n_out].in_len = c->in_len;
        t->n_out++;
    } else if (rc < 0) {
        CHECK(vhd_vring_stats(vr)->broken == rc, "pop returned %d but stats.broken is %lld", rc,
              (long long)vhd_vring_stats(vr)->broken);
    } else {
        CHECK(rc == VHD_POP_EMPTY, "pop returned %d", rc);
    }
    return rc;
}

void vhd_vring_push(vhd_vring *vr, uint16_t head, uint32_t len)
{
    struct ring_track *t = track_of(vr);
    unsigned i = 0;
    while (i < t->n_out && t->out[i].head != head)
        i++;
    CHECK(i < t->n_out, "push of head %u, which is not outstanding (popped and not used)", head);
    CHECK(len <= t->out[i].in_len, "push of head %u with len %u > its %u device-writable bytes",
          head, len, t->out[i].in_len);
    memmove(&t->out[i], &t->out[i + 1], (t->n_out - i - 1) * sizeof(t->out[0]));
    t->n_out--;
    t->pushes++;
    if (vr->inflight && vr->n_unpublished >= vr->num && !fuzz_strict()) {
        /* KNOWN BUG (fuzz/repro/README.md, inflight unpublished overflow):
         * vr->unpublished holds num heads, but more pushes can come between
         * two flushes.  Publish now to keep the push in bounds. */
        t->known_hit = 1;
        vhd_vring_flush(vr);
    }
    __real_vhd_vring_push(vr, head, len);
}

void vhd_vring_unpop(vhd_vring *vr, uint16_t n)
{
    struct ring_track *t = track_of(vr);
    CHECK(n <= t->n_out, "unpop of %u chains, %u outstanding", n, t->n_out);
    t->n_out -= n;
    t->unpopped += n;
    __real_vhd_vring_unpop(vr, n);
    if (t->null_rx && !fuzz_strict()) {
        /* KNOWN BUG (fuzz/repro/README.md, null back-end RX drop): with the null
         * back-end a dropped frame is generated again at once and dropped
         * again, forever.  Break the ring to end vhd_net_rx(). */
        t->known_hit = 1;
        vhd_vring_set_broken(vr, VHD_ERR_LEN);
    }
}

/* --- invariants ---------------------------------------------------------------- */

static uint64_t eventfd_take(int fd)
{
    eventfd_t v = 0;
    if (eventfd_read(fd, &v) < 0)
        return 0;
    return v;
}

/* After the device ran on ring t (avail->idx was avail0 in memory when it
 * started):
 * - the chains it popped were all used or given back, each exactly once;
 * - last_avail_idx moved by exactly the chains consumed;
 * - used->idx in guest memory is the device's used index, which moved by
 *   exactly the chains used;
 * - unless the device itself could write over avail->idx (the guest placed
 *   a device-writable buffer or a used ring there), no more chains were
 *   consumed than were available, all of them if must_drain and the ring
 *   is not broken, and none if avail->idx was more than a ring ahead;
 * - the ring is broken iff the err eventfd was signalled (once). */
static void check_ring(struct ring_track *t, uint64_t avail_off, uint16_t avail0, int err_fd, int must_drain)
{
    const struct vhd_vring_stats *st = vhd_vring_stats(t->vr);
    if (fuzz_verbose())
        fprintf(stderr, "ring of %u: %llu chains popped, %llu used, %llu given back; requests %llu errors %llu "
                "broken %lld%s\n", t->num, (unsigned long long)t->pops, (unsigned long long)t->pushes,
                (unsigned long long)t->unpopped, (unsigned long long)st->requests, (unsigned long long)st->errors,
                (long long)st->broken, t->known_hit ? " (known bug hit)" : "");
    if (t->known_hit)
        return;
    CHECK(t->n_out == 0, "%u popped chains were neither used nor given back (broken=%lld)", t->n_out,
          (long long)st->broken);
    /* Resubmitted chains come first and do not move last_avail_idx. */
    uint64_t consumed = t->pops - t->unpopped - (t->pops < t->resubmitted ? t->pops : t->resubmitted);
    uint16_t last = vhd_vring_last_avail_idx(t->vr);
    CHECK(last == (uint16_t)(t->last_avail0 + consumed), "last_avail_idx %u, expected %u + %llu", last,
          t->last_avail0, (unsigned long long)consumed);
    uint16_t used = vhd_vring_used_idx(t->vr);
    CHECK(used == (uint16_t)(t->used_idx0 + t->pushes), "used_idx %u, expected %u + %llu", used, t->used_idx0,
          (unsigned long long)t->pushes);
    if (!device_may_write(t->used_off + 2, 2, t))
        CHECK(guest_get16(t->used_off + 2) == used, "used->idx in memory %u, device's %u",
              guest_get16(t->used_off + 2), used);
    if (t->pops < t->resubmitted) {
        /* Only a broken ring stops handing out what was in flight. */
        CHECK(st->broken && consumed == 0, "%llu of %llu in-flight chains resubmitted, broken %lld, %llu consumed",
              (unsigned long long)t->pops, (unsigned long long)t->resubmitted, (long long)st->broken,
              (unsigned long long)consumed);
    } else if (st->broken == VHD_ERR_LAYOUT) {
        /* Rings laid over each other are refused at setup: nothing runs. */
        CHECK(consumed == 0, "%llu chains consumed on a ring refused at setup", (unsigned long long)consumed);
    } else if (!device_may_write(avail_off + 2, 2, NULL)) {
        uint16_t pending = (uint16_t)(avail0 - t->last_avail0);
        if (pending > t->num) {
            CHECK(consumed == 0 && (st->broken == VHD_ERR_AVAIL_IDX || st->broken == VHD_ERR_LAYOUT),
                  "avail idx %u ahead of last_avail_idx %u by more than %u: consumed %llu, broken %lld", avail0,
                  t->last_avail0, t->num, (unsigned long long)consumed, (long long)st->broken);
        } else {
            CHECK(consumed <= pending, "consumed %llu chains, %u were available", (unsigned long long)consumed,
                  pending);
            CHECK(!must_drain || st->broken || consumed == pending,
                  "ring not broken but %llu of %u available chains consumed", (unsigned long long)consumed, pending);
        }
    }
    if (err_fd >= 0) {
        uint64_t signalled = eventfd_take(err_fd);
        CHECK(signalled == (st->broken != 0), "broken=%lld but err eventfd counted %llu", (long long)st->broken,
              (unsigned long long)signalled);
    }
}

static int in_used_ring(uint64_t off)
{
    for (unsigned i = 0; i < n_tracks; i++)
        if (off >= tracks[i].used_off && off - tracks[i].used_off < 6 + 8ull * tracks[i].num)
            return 1;
    return 0;
}

/* With logging on: every guest byte the device changed has its page's bit
 * set (used ring bytes only with VHOST_VRING_F_LOG), and every bit set is a
 * page the device could write; past the bitmap nothing is written and what
 * the device changed there was counted as refused. */
static void check_log(uint64_t changed_past_bitmap)
{
    if (!L.on)
        return;
    for (uint64_t off = 0; off < G.total; off++) {
        if (*guest_ptr(off) == G.before[off] || G.base + off >= 0x100000000ull)
            continue;
        if (in_used_ring(off) && !L.used)
            continue;   /* the used ring's own writes are not logged (even over a buffer) */
        CHECK(log_bit(G.base + off), "device changed guest byte at gpa %#llx but did not log its page",
              (unsigned long long)(G.base + off));
    }
    for (uint64_t byte = 0; byte < LOG_BYTES; byte++) {
        if (!L.bits[byte])
            continue;
        for (int b = 0; b < 8; b++) {
            if (!(L.bits[byte] >> b & 1))
                continue;
            uint64_t gpa = (byte * 8 + (uint64_t)b) << 12, hit = 0;
            for (uint64_t off = gpa > G.base ? gpa - G.base : 0; off < G.total && G.base + off < gpa + PAGE; off++)
                hit |= G.allowed[off] || (L.used && in_used_ring(off));
            CHECK(hit, "logged page at gpa %#llx holds no device-writable byte", (unsigned long long)gpa);
        }
    }
    struct vhd_log_stats st;
    vhd_log_stats_get(L.log, &st);
    CHECK(changed_past_bitmap == 0 || st.refused > 0, "device changed %llu bytes past the log, none refused",
          (unsigned long long)changed_past_bitmap);
}

/* Every guest byte the device changed is in a device-writable buffer of a
 * chain it popped, or in the used ring (flags, idx, ring, avail_event). */
static void check_writes(void)
{
    uint64_t past_bitmap = 0;
    for (uint64_t chunk = 0; chunk < G.total; chunk += 256) {
        if (memcmp(guest_ptr(chunk), G.before + chunk, 256) == 0)
            continue;   /* regions are whole pages: a chunk is inside one */
        for (uint64_t off = chunk; off < chunk + 256; off++) {
            uint8_t now = *guest_ptr(off);
            if (now == G.before[off])
                continue;
            if (G.base + off >= 0x100000000ull && (G.allowed[off] || L.used))
                past_bitmap++;
            if (G.allowed[off])
                continue;
            CHECK(in_used_ring(off), "device wrote guest byte at gpa %#llx (%#x -> %#x), not in a device-writable "
                  "buffer or the used ring", (unsigned long long)(G.base + off), G.before[off], now);
        }
    }
    check_log(past_bitmap);
}

/* --- ring set-up ----------------------------------------------------------------- */

/* A ring as the input describes it: 12 bytes (6 x u16). */
struct ring_input {
    uint32_t num;
    uint16_t desc_off, avail_off, used_off;   /* guest offsets of the three parts */
    uint16_t last_avail_idx;                  /* SET_VRING_BASE */
    uint16_t avail_idx, used_idx;             /* stored into avail->idx and used->idx */
};

static void read_ring(struct reader *in, uint32_t num, struct ring_input *r)
{
    r->num = num;
    r->desc_off = take16(in);
    r->avail_off = take16(in);
    r->used_off = take16(in);
    r->last_avail_idx = take16(in);
    r->avail_idx = take16(in);
    r->used_idx = take16(in);
}

/* The front-end address of a guest offset; offsets past guest memory get
 * addresses far from every region. */
static uint64_t ring_uva(uint64_t off)
{
    return off < G.total ? guest_uva(off) : 0xdead00000000ull + off;
}

static void ring_store_indices(const struct ring_input *r)
{
    guest_put16(G.base + r->avail_off + 2, r->avail_idx);
    guest_put16(G.base + r->used_off + 2, r->used_idx);
}

/* Whether vhd_vring_setup() must accept the layout: each part wholly
 * inside one region, aligned (regions are page aligned in the host). */
static int ring_layout_ok(const struct ring_input *r)
{
    struct { uint64_t off, len, align; } part[3] = {
        { r->desc_off, 16ull * r->num, 16 }, { r->avail_off, 6 + 2ull * r->num, 2 },
        { r->used_off, 6 + 8ull * r->num, 4 },
    };
    for (int i = 0; i < 3; i++) {
        uint64_t off = part[i].off;
        if (off >= G.total || part[i].len > G.total - off)
            return 0;
        if ((off < G.size[0]) != (off + part[i].len - 1 < G.size[0]))
            return 0;   /* straddles the two regions */
        if (off % part[i].align)
            return 0;
    }
    return 1;
}

/* Sets the ring up as the front-end would; NULL if vhd_vring_setup()
 * refused it (checked against ring_layout_ok()). */
static vhd_vring *ring_setup(const struct ring_input *r, int event_idx, int indirect, int call_fd, int err_fd,
                             void *inflight, struct ring_track **tp)
{
    vhd_vring *vr = vhd_vring_new();
    CHECK(vr, "vhd_vring_new failed");
    struct vhd_vring_config cfg = {
        .num = r->num,
        .desc_uva = ring_uva(r->desc_off),
        .avail_uva = ring_uva(r->avail_off),
        .used_uva = ring_uva(r->used_off),
        .last_avail_idx = r->last_avail_idx,
        .event_idx = event_idx,
        .indirect = indirect,
        .call_fd = call_fd,
        .err_fd = err_fd,
        .broken_fd = -1,
        .inflight = inflight,
        .log = L.on ? L.log : NULL,
        .log_used = L.used,
        .log_used_gpa = G.base + r->used_off,
    };
    int rc = vhd_vring_setup(vr, G.mem, &cfg);
    int expect = ring_layout_ok(r);
    CHECK((rc == 0) == expect, "vhd_vring_setup(num %u, desc +%#x, avail +%#x, used +%#x) = %d, expected %s",
          r->num, r->desc_off, r->avail_off, r->used_off, rc, expect ? "success" : "failure");
    CHECK(rc == 0 || rc == -EINVAL || rc == -EFAULT, "vhd_vring_setup returned %d", rc);
    if (rc != 0) {
        vhd_vring_free(vr);
        return NULL;
    }
    CHECK(vhd_vring_used_idx(vr) == guest_get16(r->used_off + 2u), "setup did not take used->idx from memory");
    *tp = track_new(vr, r->num, r->avail_off, r->used_off);
    return vr;
}

#endif
