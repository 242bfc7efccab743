/* Guest memory table: GPA and front-end VA to host address translation.
 *
 * Every translation checks the whole range [addr, addr+len) with overflow-
 * safe arithmetic: a range is inside a region iff addr >= start and
 * len <= size - (addr - start).  This is the one place guest addresses are
 * turned into host pointers. */
#include <errno.h>
#include <stdlib.h>
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
        munmap(mem->regions[i].map_base, mem->regions[i].map_len);
    free(mem);
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    /* alen, blen > 0 and a+alen, b+blen do not overflow (checked by caller). */
    return a < b + blen && b < a + alen;
}

int vhd_mem_add(vhd_mem *mem, int fd, uint64_t gpa, uint64_t size,
                uint64_t uva, uint64_t mmap_offset)
{
    if (size == 0 || gpa + size < gpa || uva + size < uva ||
        mmap_offset + size < mmap_offset)
        return -EINVAL;
    if (mem->nregions >= VHD_MAX_MEM_REGIONS)
        return -ENOSPC;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        if (ranges_overlap(gpa, size, r->gpa, r->size) ||
            ranges_overlap(uva, size, r->uva, r->size))
            return -EINVAL;
    }
    /* Touching a MAP_SHARED page past the end of its file raises SIGBUS: a
     * regular file (memfd, hugetlbfs, tmpfs) must back the whole range. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < mmap_offset + size)
        return -EINVAL;
    /* Map from offset 0 and add mmap_offset ourselves: the offset need not
     * be page aligned (QEMU passes non-aligned offsets for some layouts). */
    size_t map_len = (size_t)(mmap_offset + size);
    void *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (base == MAP_FAILED)
        return -errno;
    struct vhd_mem_region *r = &mem->regions[mem->nregions++];
    r->gpa = gpa;
    r->size = size;
    r->uva = uva;
    r->map_base = base;
    r->map_len = map_len;
    r->hva = (uint8_t *)base + mmap_offset;
    return 0;
}

uint32_t vhd_mem_count(const vhd_mem *mem)
{
    return mem->nregions;
}

static bool inside(uint64_t addr, uint64_t len, uint64_t start, uint64_t size)
{
    return addr >= start && addr - start < size && len <= size - (addr - start);
}

void *vhd_mem_gpa_to_hva(const vhd_mem *mem, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        if (inside(gpa, len, r->gpa, r->size))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

void *vhd_mem_uva_to_hva(const vhd_mem *mem, uint64_t uva, uint64_t len)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        if (inside(uva, len, r->uva, r->size))
            return r->hva + (uva - r->uva);
    }
    return NULL;
}

int vhd_mem_hva_to_gpa(const vhd_mem *mem, const void *hva, uint64_t *gpa, uint64_t *room)
{
    uintptr_t p = (uintptr_t)hva;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        uintptr_t start = (uintptr_t)r->hva;
        if (p >= start && p - start < r->size) {
            *gpa = r->gpa + (p - start);
            *room = r->size - (p - start);
            return 0;
        }
    }
    return -EFAULT;
}

static const struct vhd_mem_region *region_of(const vhd_mem *mem, uint64_t gpa)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vhd_mem_region *r = &mem->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    return NULL;
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
    /* As for guest memory: a page past the end of a file raises SIGBUS
     * when a worker touches it, so the file must cover the whole range. */
    struct stat st;
    if (fstat(fd, &st) < 0) {
        *err = -errno;
        return NULL;
    }
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < offset + size) {
        *err = -ERANGE;
        return NULL;
    }
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
