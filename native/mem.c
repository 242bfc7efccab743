/* Guest memory table: GPA and front-end VA to host address translation.
 *
 * Every translation checks the whole range [addr, addr+len) with overflow-
 * safe arithmetic: a range is inside a region iff addr >= start and
 * len <= size - (addr - start).  This is the one place guest addresses are
 * turned into host pointers. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vhd.h"

vhd_mem *vhd_mem_new(void)
{
    return calloc(1, sizeof(vhd_mem));
}

void vhd_mem_free(vhd_mem *mem)
{
    if (!mem)
        return;
    for (uint32_t i = 0; i < mem->nregions; i++)
        if (mem->regions[i].map_base)
            munmap(mem->regions[i].map_base, mem->regions[i].map_len);
    free(mem);
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    /* alen, blen > 0 and a+alen, b+blen do not overflow (checked by caller). */
    return a < b + blen && b < a + alen;
}

/* Touching a MAP_SHARED page past the end of its file raises SIGBUS: a
 * regular file (memfd, hugetlbfs, tmpfs) must back the whole range. */
static int file_covers(int fd, uint64_t end)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < end)
        return -ERANGE;
    return 0;
}

void *vhd_region_map(int fd, uint64_t size, uint64_t mmap_offset, int *err)
{
    *err = -EINVAL;
    if (size == 0 || mmap_offset + size < mmap_offset || mmap_offset + size > SIZE_MAX)
        return NULL;
    if ((*err = file_covers(fd, mmap_offset + size)) < 0)
        return NULL;
    /* Map from offset 0 and add mmap_offset ourselves: the offset need not
     * be page aligned (QEMU passes non-aligned offsets for some layouts). */
    void *base = mmap(NULL, (size_t)(mmap_offset + size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                      fd, 0);
    if (base == MAP_FAILED) {
        *err = -errno;
        return NULL;
    }
    *err = 0;
    return base;
}

/* Inserts r, keeping regions sorted by gpa and by_hva sorted by hva. */
static int insert(vhd_mem *mem, const struct vhd_mem_region *r)
{
    if (r->size == 0 || r->gpa + r->size < r->gpa || r->uva + r->size < r->uva ||
        (uintptr_t)r->hva + r->size < (uintptr_t)r->hva)
        return -EINVAL;
    if (mem->nregions >= VHD_MAX_MEM_REGIONS)
        return -ENOSPC;
    uint32_t at = mem->nregions;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *o = &mem->regions[i];
        if (ranges_overlap(r->gpa, r->size, o->gpa, o->size) || ranges_overlap(r->uva, r->size, o->uva, o->size))
            return -EINVAL;
        if (at == mem->nregions && r->gpa < o->gpa)
            at = i;
    }
    memmove(&mem->regions[at + 1], &mem->regions[at], (mem->nregions - at) * sizeof(mem->regions[0]));
    memmove(&mem->gpa_start[at + 1], &mem->gpa_start[at], (mem->nregions - at) * sizeof(mem->gpa_start[0]));
    mem->regions[at] = *r;
    mem->gpa_start[at] = r->gpa;
    mem->nregions++;
    /* by_hva: indexes shift past at; then r's goes in hva order. */
    uint32_t n = 0;
    for (uint32_t i = 0; i + 1 < mem->nregions; i++) {
        uint16_t k = mem->by_hva[i];
        mem->by_hva[n++] = (uint16_t)(k >= at ? k + 1 : k);
    }
    uint32_t pos = n;
    while (pos > 0 && (uintptr_t)mem->regions[mem->by_hva[pos - 1]].hva > (uintptr_t)r->hva)
        pos--;
    memmove(&mem->by_hva[pos + 1], &mem->by_hva[pos], (n - pos) * sizeof(mem->by_hva[0]));
    mem->by_hva[pos] = (uint16_t)at;
    return 0;
}

int vhd_mem_add_mapped(vhd_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva, void *hva)
{
    struct vhd_mem_region r = { .gpa = gpa, .size = size, .uva = uva, .hva = hva };
    return hva ? insert(mem, &r) : -EINVAL;
}

int vhd_mem_add(vhd_mem *mem, int fd, uint64_t gpa, uint64_t size,
                uint64_t uva, uint64_t mmap_offset)
{
    if (size == 0 || gpa + size < gpa || uva + size < uva || mmap_offset + size < mmap_offset)
        return -EINVAL;
    if (mem->nregions >= VHD_MAX_MEM_REGIONS)
        return -ENOSPC;
    int err;
    uint8_t *base = vhd_region_map(fd, size, mmap_offset, &err);
    if (!base)
        return err == -ERANGE ? -EINVAL : err;
    struct vhd_mem_region r = { .gpa = gpa, .size = size, .uva = uva, .hva = base + mmap_offset,
                                .map_base = base, .map_len = (size_t)(mmap_offset + size) };
    int rc = insert(mem, &r);
    if (rc < 0)
        munmap(base, r.map_len);
    return rc;
}

uint32_t vhd_mem_count(const vhd_mem *mem)
{
    return mem->nregions;
}

/* Up to this many regions a scan beats a binary search (and keeps the
 * one- and two-region guests exactly as fast as before). */
#define SCAN_MAX 4

static const struct vhd_mem_region *region_of(const vhd_mem *mem, uint64_t gpa)
{
    uint32_t n = mem->nregions;
    if (n <= SCAN_MAX) {
        for (uint32_t i = 0; i < n; i++) {
            const struct vhd_mem_region *r = &mem->regions[i];
            if (gpa >= r->gpa && gpa - r->gpa < r->size)
                return r;
        }
        return NULL;
    }
    /* The last region starting at or below gpa is the only candidate.  The
     * search has no data-dependent branch (the compiler's cmov): with buffers
     * spread over many regions a branchy one mispredicts at every level. */
    const uint64_t *base = mem->gpa_start;
    for (uint32_t len = n; len > 1;) {
        uint32_t half = len / 2;
        base = base[half] <= gpa ? base + half : base;
        len -= half;
    }
    uint32_t lo = (uint32_t)(base - mem->gpa_start) + (*base <= gpa);
    if (lo == 0)
        return NULL;
    const struct vhd_mem_region *r = &mem->regions[lo - 1];
    return gpa - r->gpa < r->size ? r : NULL;
}

void *vhd_mem_gpa_to_hva(const vhd_mem *mem, uint64_t gpa, uint64_t len)
{
    const struct vhd_mem_region *r = region_of(mem, gpa);
    if (!r || len > r->size - (gpa - r->gpa))
        return NULL;
    return r->hva + (gpa - r->gpa);
}

/* Front-end addresses are looked up only when rings are set up: a scan. */
void *vhd_mem_uva_to_hva(const vhd_mem *mem, uint64_t uva, uint64_t len)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        if (uva >= r->uva && uva - r->uva < r->size && len <= r->size - (uva - r->uva))
            return r->hva + (uva - r->uva);
    }
    return NULL;
}

int vhd_mem_hva_to_gpa(const vhd_mem *mem, const void *hva, uint64_t *gpa, uint64_t *room)
{
    uintptr_t p = (uintptr_t)hva;
    uint32_t lo = 0, hi = mem->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if ((uintptr_t)mem->regions[mem->by_hva[mid]].hva <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -EFAULT;
    const struct vhd_mem_region *r = &mem->regions[mem->by_hva[lo - 1]];
    uintptr_t start = (uintptr_t)r->hva;
    if (p - start >= r->size)
        return -EFAULT;
    *gpa = r->gpa + (p - start);
    *room = r->size - (p - start);
    return 0;
}

int vhd_mem_gpa_to_iov(const vhd_mem *mem, uint64_t gpa, uint64_t len,
                       struct iovec *iov, int max)
{
    if (gpa + len < gpa)
        return -EFAULT;
    int n = 0;
    while (len > 0) {
        const struct vhd_mem_region *r = region_of(mem, gpa);
        if (!r)
            return -EFAULT;
        if (n >= max)
            return -ENOBUFS;
        uint64_t off = gpa - r->gpa;
        uint64_t chunk = r->size - off < len ? r->size - off : len;
        iov[n].iov_base = r->hva + off;
        iov[n].iov_len = (size_t)chunk;
        n++;
        gpa += chunk;
        len -= chunk;
    }
    return n;
}

void *vhd_map_shared(int fd, uint64_t size, uint64_t offset, int *err)
{
    *err = -EINVAL;
    if (size == 0 || offset + size < offset)
        return NULL;
    if ((*err = file_covers(fd, offset + size)) < 0)
        return NULL;
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *err = -errno;
        return NULL;
    }
    *err = 0;
    return p;
}

void vhd_unmap(void *addr, uint64_t size)
{
    if (addr)
        munmap(addr, (size_t)size);
}
