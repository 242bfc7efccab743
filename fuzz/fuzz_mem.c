/* libFuzzer target: the guest memory table (native/mem.c) against a model.
 *
 * Input (little-endian; missing bytes read as 0):
 *   0  u8  regions to add: v % 10 (the table holds 8)
 *   then per region: u8 selector (2 bits per value, see value()), then
 *          gpa, size, uva, mmap_offset, each encoded as its 2 bits say
 *   then operations until the input ends, each:
 *          u8 op: bits 0-1: 0 gpa_to_hva, 1 uva_to_hva, 2-3 gpa_to_iov;
 *                 bits 2-3: address encoding (address()); bits 4-5: length
 *                 encoding (value()); bits 6-7: unused
 *          the address, the length, then for gpa_to_iov u8 max iovecs (1..16)
 *
 * All regions map one 64 KiB memfd whose byte i is pattern(i), through the
 * guarded mmap of fuzz_common.h.  Checked: vhd_mem_add() succeeds exactly
 * when the model says (non-empty, no 64-bit overflow of gpa/uva/offset +
 * size, no overlap in gpa or uva space, table not full, inside the file)
 * and fails with a documented code otherwise; every translation equals the
 * model's (NULL / -EFAULT / -ENOBUFS included), and every returned byte
 * range is inside its region's mapping and holds the file bytes the region
 * maps there; vhd_mem_free() unmaps everything.
 */
#include "fuzz_common.h"

#define FILE_BYTES (16u * PAGE)

static int file_fd = -1;

static uint8_t pattern(uint64_t i)
{
    return (uint8_t)(i ^ (i >> 8) * 7 ^ (i >> 13) * 3);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    file_fd = memfd_create("fuzz-mem", MFD_CLOEXEC);
    CHECK(file_fd >= 0 && ftruncate(file_fd, FILE_BYTES) == 0, "harness: memfd");
    static uint8_t buf[FILE_BYTES];
    for (uint64_t i = 0; i < FILE_BYTES; i++)
        buf[i] = pattern(i);
    CHECK(pwrite(file_fd, buf, FILE_BYTES, 0) == FILE_BYTES, "harness: pwrite");
    return 0;
}

/* Encodings: 0 a small number (u16), 1 whole pages (u8 * 4096), 2 any u64,
 * 3 just below 2^64 (2^64 - 1 - u16). */
static uint64_t value(struct reader *in, unsigned kind)
{
    switch (kind & 3) {
    case 0: return take16(in);
    case 1: return (uint64_t)take8(in) * PAGE;
    case 2: return take(in, 8);
    default: return ~0ull - take16(in);
    }
}

struct region {
    uint64_t gpa, size, uva, offset;
    uint8_t *hva;
};

static struct region model[VHD_MAX_MEM_REGIONS];
static unsigned nmodel;

/* Encodings: 0 region start + i16, 1 region end + i16 (region by u8),
 * 2 any u64, 3 just below 2^64. */
static uint64_t address(struct reader *in, unsigned kind, int uva)
{
    if ((kind & 3) >= 2)
        return value(in, kind);
    if (nmodel == 0)
        return value(in, 0);
    const struct region *r = &model[take8(in) % nmodel];
    int16_t delta = (int16_t)take16(in);
    uint64_t start = uva ? r->uva : r->gpa;
    return ((kind & 3) == 0 ? start : start + r->size) + (uint64_t)(int64_t)delta;
}

static int overflows(uint64_t a, uint64_t len)
{
    return a + len < a;
}

static int overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

static const uint8_t *last_mapping(void)
{
    /* The mapping vhd_mem_add() just made: the guarded one not in the model. */
    for (size_t i = 0; i < sizeof(gmaps) / sizeof(gmaps[0]); i++) {
        if (!gmaps[i].reserve)
            continue;
        int known = 0;
        for (unsigned k = 0; k < nmodel; k++)
            known |= (uint8_t *)gmaps[i].addr == model[k].hva - model[k].offset;
        if (!known)
            return gmaps[i].addr;
    }
    fuzz_fail("vhd_mem_add succeeded without mapping anything");
}

static void try_add(vhd_mem *mem, struct reader *in)
{
    uint8_t sel = take8(in);
    struct region r = { 0 };
    r.gpa = value(in, sel);
    r.size = value(in, sel >> 2);
    r.uva = value(in, sel >> 4);
    r.offset = value(in, sel >> 6);
    int einval = r.size == 0 || overflows(r.gpa, r.size) || overflows(r.uva, r.size) ||
                 overflows(r.offset, r.size);
    int enospc = nmodel == VHD_MAX_MEM_REGIONS;
    if (!einval) {
        for (unsigned i = 0; i < nmodel; i++)
            einval |= overlap(r.gpa, r.size, model[i].gpa, model[i].size) ||
                      overlap(r.uva, r.size, model[i].uva, model[i].size);
        einval |= r.offset + r.size > FILE_BYTES;
    }
    int rc = vhd_mem_add(mem, file_fd, r.gpa, r.size, r.uva, r.offset);
    CHECK((rc == 0) == (!einval && !enospc) && (rc == 0 || (einval && rc == -EINVAL) || (enospc && rc == -ENOSPC)),
          "vhd_mem_add(gpa %#llx, size %#llx, uva %#llx, offset %#llx) with %u regions = %d, expected%s%s%s",
          (unsigned long long)r.gpa, (unsigned long long)r.size, (unsigned long long)r.uva,
          (unsigned long long)r.offset, nmodel, rc, einval ? " -EINVAL" : "", enospc ? " -ENOSPC" : "",
          einval || enospc ? "" : " 0");
    if (rc == 0) {
        r.hva = (uint8_t *)last_mapping() + r.offset;
        model[nmodel++] = r;
    }
    CHECK(vhd_mem_count(mem) == nmodel, "vhd_mem_count %u, model %u", vhd_mem_count(mem), nmodel);
}

/* p should be region r's bytes from guest offset off, len bytes. */
static void check_bytes(const struct region *r, uint64_t off, const uint8_t *p, uint64_t len)
{
    CHECK(p == r->hva + off, "translation %p, expected %p", (const void *)p, (const void *)(r->hva + off));
    CHECK(off <= r->size && len <= r->size - off, "range outside its region");
    if (len == 0)
        return;
    CHECK(p[0] == pattern(r->offset + off) && p[len - 1] == pattern(r->offset + off + len - 1),
          "translated bytes are not the file bytes the region maps");
}

static const struct region *find(uint64_t a, uint64_t len, int uva)
{
    for (unsigned i = 0; i < nmodel; i++) {
        uint64_t start = uva ? model[i].uva : model[i].gpa;
        if (a >= start && a - start < model[i].size && len <= model[i].size - (a - start))
            return &model[i];
    }
    return NULL;
}

static void translate(vhd_mem *mem, struct reader *in)
{
    uint8_t op = take8(in);
    int kind = op & 3, uva = kind == 1;
    uint64_t a = address(in, op >> 2, uva);
    uint64_t len = value(in, op >> 4);
    if (kind < 2) {
        const uint8_t *p = uva ? vhd_mem_uva_to_hva(mem, a, len) : vhd_mem_gpa_to_hva(mem, a, len);
        const struct region *r = find(a, len, uva);
        CHECK(!p == !r, "%s_to_hva(%#llx, %#llx) = %p, model says %s", uva ? "uva" : "gpa",
              (unsigned long long)a, (unsigned long long)len, (const void *)p, r ? "inside" : "NULL");
        if (r) {
            check_bytes(r, a - (uva ? r->uva : r->gpa), p, len);
            /* The dirty log's reverse lookup finds the same place. */
            uint64_t gpa = 0, room = 0, off = a - (uva ? r->uva : r->gpa);
            CHECK(vhd_mem_hva_to_gpa(mem, p, &gpa, &room) == 0 && gpa == r->gpa + off && room == r->size - off,
                  "hva_to_gpa(%p) = %#llx room %#llx, expected %#llx room %#llx", (const void *)p,
                  (unsigned long long)gpa, (unsigned long long)room, (unsigned long long)(r->gpa + off),
                  (unsigned long long)(r->size - off));
        }
        return;
    }
    int max = 1 + take8(in) % 16;
    struct iovec iov[17];
    memset(iov, 0xa5, sizeof(iov));
    int n = vhd_mem_gpa_to_iov(mem, a, len, iov, max);
    /* The model: consecutive regions, one iovec each. */
    int expect = 0;
    if (overflows(a, len)) {
        expect = -EFAULT;
    } else {
        uint64_t g = a, left = len;
        while (left > 0) {
            const struct region *r = find(g, 1, 0);
            if (!r) {
                expect = -EFAULT;
                break;
            }
            if (expect >= max) {
                expect = -ENOBUFS;
                break;
            }
            uint64_t off = g - r->gpa, chunk = r->size - off < left ? r->size - off : left;
            if (n > expect) {
                CHECK(iov[expect].iov_len == chunk, "gpa_to_iov(%#llx, %#llx): iovec %d has %zu bytes, expected %llu",
                      (unsigned long long)a, (unsigned long long)len, expect, iov[expect].iov_len,
                      (unsigned long long)chunk);
                check_bytes(r, off, iov[expect].iov_base, chunk);
            }
            expect++;
            g += chunk;
            left -= chunk;
        }
    }
    CHECK(n == expect, "gpa_to_iov(%#llx, %#llx, max %d) = %d, model %d", (unsigned long long)a,
          (unsigned long long)len, max, n, expect);
    CHECK(iov[max].iov_len == (size_t)0xa5a5a5a5a5a5a5a5ull, "gpa_to_iov wrote past max iovecs");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader in = { data, size };
    nmodel = 0;
    vhd_mem *mem = vhd_mem_new();
    CHECK(mem, "vhd_mem_new failed");
    unsigned n = take8(&in) % 10;
    for (unsigned i = 0; i < n; i++)
        try_add(mem, &in);
    for (int ops = 0; in.n > 0 && ops < 256; ops++)
        translate(mem, &in);
    vhd_mem_free(mem);
    CHECK(gmaps_alive() == 0, "vhd_mem_free left %zu mappings", gmaps_alive());
    return 0;
}
