/* Scatter-gather helpers shared by the device back-ends. */
#include <string.h>

#include "vhd.h"

/* Copies up to len bytes out of iov into dst; returns bytes copied.  Used
 * for the header only, so the guest cannot change it after validation. */
size_t vhd_iov_to_buf(const struct iovec *iov, int n, void *dst, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        size_t k = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy((uint8_t *)dst + done, iov[i].iov_base, k);
        done += k;
    }
    return done;
}

size_t vhd_iov_copy_from(const struct iovec *iov, int n, size_t skip, void *dst, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        size_t have = iov[i].iov_len;
        if (skip >= have) {
            skip -= have;
            continue;
        }
        size_t k = have - skip < len - done ? have - skip : len - done;
        memcpy((uint8_t *)dst + done, (const uint8_t *)iov[i].iov_base + skip, k);
        done += k;
        skip = 0;
    }
    return done;
}

size_t vhd_buf_to_iov(const struct iovec *iov, int n, const void *src, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        size_t k = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(iov[i].iov_base, (const uint8_t *)src + done, k);
        done += k;
    }
    return done;
}

/* Drops the first skip bytes of an iovec array in place; returns the new count. */
int vhd_iov_skip(struct iovec *iov, int n, size_t skip)
{
    int i = 0;
    while (i < n && skip >= iov[i].iov_len) {
        skip -= iov[i].iov_len;
        i++;
    }
    if (i < n) {
        iov[i].iov_base = (uint8_t *)iov[i].iov_base + skip;
        iov[i].iov_len -= skip;
    }
    memmove(iov, iov + i, (size_t)(n - i) * sizeof(*iov));
    return n - i;
}
