/* Dirty-page log for live migration (vhost-user.rst "Dirty pages logging").
 *
 * The front-end shares a bitmap (SET_LOG_BASE): bit n stands for the 4 KiB
 * guest-physical page n.  While VHOST_F_LOG_ALL is negotiated, every byte
 * the device writes into guest memory sets its page's bit after the write,
 * so that the front-end, which clears bits as it copies pages, copies the
 * page again.  The bitmap is shared with the front-end and with every
 * worker serving a ring of the device: bits are set with an atomic OR.
 * This is the one place guest addresses are turned into bit indexes; an
 * index past the bitmap is the front-end's error (a log too small for its
 * memory), counted and never written. */
#include <stdlib.h>

#include "vhd.h"

#define LOG_PAGE_SHIFT 12

struct vhd_log {
    uint8_t *bits;
    uint64_t size;               /* bytes of bitmap */
    bool drop;                   /* test hook: record nothing (VHD_TEST_HOOKS builds only) */
    struct vhd_log_stats stats;  /* updated atomically: rings on several workers share a log */
};

vhd_log *vhd_log_new(void *bits, uint64_t size)
{
    vhd_log *log = calloc(1, sizeof(*log));
    if (!log)
        return NULL;
    log->bits = bits;
    log->size = size;
    return log;
}

void vhd_log_free(vhd_log *log)
{
    free(log);
}

void vhd_log_stats_get(const vhd_log *log, struct vhd_log_stats *out)
{
    out->pages = __atomic_load_n(&log->stats.pages, __ATOMIC_RELAXED);
    out->refused = __atomic_load_n(&log->stats.refused, __ATOMIC_RELAXED);
}

int vhd_log_set_drop(vhd_log *log, int drop)
{
#ifdef VHD_TEST_HOOKS
    log->drop = drop != 0;
    return 0;
#else
    (void)log;
    (void)drop;
    return -1;
#endif
}

uint64_t vhd_log_size_for(uint64_t gpa_end)
{
    uint64_t pages = (gpa_end >> LOG_PAGE_SHIFT) + ((gpa_end & ((1u << LOG_PAGE_SHIFT) - 1)) != 0);
    return (pages + 7) / 8;
}

void vhd_log_write(vhd_log *log, uint64_t gpa, uint64_t len)
{
    if (len == 0 || log->drop)
        return;
    uint64_t last = gpa + len - 1;
    if (last < gpa)
        last = UINT64_MAX;
    uint64_t first_page = gpa >> LOG_PAGE_SHIFT, last_page = last >> LOG_PAGE_SHIFT;
    /* The guest's data is in memory before its bit is set (the front-end
     * clears the bit and then copies the page). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint64_t set = 0;
    for (uint64_t page = first_page; page <= last_page; page++) {
        uint64_t byte = page >> 3;
        if (byte >= log->size) {
            __atomic_fetch_add(&log->stats.refused, last_page - page + 1, __ATOMIC_RELAXED);
            break;
        }
        __atomic_fetch_or(&log->bits[byte], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
        set++;
        if (page == UINT64_MAX)
            break;
    }
    __atomic_fetch_add(&log->stats.pages, set, __ATOMIC_RELAXED);
}
