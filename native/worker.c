/* One native thread per started ring.  It sleeps in epoll on the ring's
 * kick eventfd and a private stop eventfd, drains the ring on every wake-up
 * and never touches Python or the GIL.  Python starts it when a ring becomes
 * ready and stops it (joining) before changing anything the ring uses. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhd.h"

/* How often a ring whose front-end gave no kick fd is polled. */
#define VHD_POLL_INTERVAL_MS 1
/* Chains handled before used->idx is published and the guest notified. */
#define VHD_BATCH 64

struct vhd_worker {
    pthread_t thread;
    uint64_t poll_ns;
    int stop_fd;
    int epoll_fd;
    int kick_fd;
    int backend_fd;         /* net RX: the tap; -1 otherwise */
    bool backend_watched;
    vhd_vring *vr;
    int dev_kind;
    void *dev;
};

static void blk_handler(void *blk, vhd_vring *vr, struct vhd_chain *c)
{
    vhd_blk_handle(blk, vr, c);
    vhd_vring_flush_if_big(vr);
}

int vhd_process_ring(vhd_vring *vr, int dev_kind, void *dev)
{
    switch (dev_kind) {
    case VHD_DEV_BLK:
        return vhd_vring_drain(vr, blk_handler, dev, VHD_BATCH);
    case VHD_DEV_BLK_URING:
        return vhd_blk_queue_run(dev, vr);
    case VHD_DEV_NET_TX:
        return vhd_net_tx(dev, vr);
    case VHD_DEV_NET_RX:
        return vhd_net_rx(dev, vr);
    case VHD_DEV_NET_CTRL:
        return vhd_net_ctrl_run(dev, vr);
    default:
        return 0;
    }
}

static void drain_eventfd(int fd)
{
    eventfd_t v;
    (void)eventfd_read(fd, &v);
}

static int watch(int epoll_fd, int fd)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
    return epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev);
}

/* Net RX watches the tap only while the guest has buffers: with none, a
 * readable tap would wake us for nothing; the guest's kick resumes it. */
static void run(vhd_worker *w)
{
    int rc = vhd_process_ring(w->vr, w->dev_kind, w->dev);
    if (w->backend_fd < 0 || w->dev_kind != VHD_DEV_NET_RX)
        return;
    bool want = rc == VHD_RX_IDLE;
    if (want != w->backend_watched) {
        struct epoll_event ev = { .events = want ? EPOLLIN : 0, .data.fd = w->backend_fd };
        epoll_ctl(w->epoll_fd, EPOLL_CTL_MOD, w->backend_fd, &ev);
        w->backend_watched = want;
    }
}

/* Before the ring stops, the back-end finishes what it has in flight. */
static void quiesce(vhd_worker *w)
{
    if (w->dev_kind == VHD_DEV_BLK_URING)
        vhd_blk_queue_drain(w->dev, w->vr);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Optional busy-poll (--poll-us): after a burst of work, watch the ring
 * (and the back-end's own events: io_uring completions, tap frames) for up
 * to poll_ns with kicks suppressed, saving the driver its kick and us a
 * wake-up.  Adaptive in the simplest way: only a worker that just did work
 * polls, so an idle device sleeps in epoll and costs no CPU. */
static bool has_work(vhd_worker *w)
{
    switch (w->dev_kind) {
    case VHD_DEV_BLK_URING:
        return vhd_vring_pending(w->vr) || vhd_blk_queue_completions(w->dev);
    case VHD_DEV_NET_RX: {
        /* Frames waiting in the tap (the null back-end always has one). */
        struct pollfd p = { .fd = w->backend_fd, .events = POLLIN };
        return w->backend_fd < 0 || poll(&p, 1, 0) > 0;
    }
    default:
        return vhd_vring_pending(w->vr);
    }
}

/* Between two looks at the ring: 16 pauses, ~0.3-0.8 us on current x86.
 * Looking more often made --poll-us 50 slower than no polling against a
 * busy-polling front-end (net-null guest TX 12.0 vs 16.4 Mpps; 4 pauses:
 * 15.9 vs 17.9; 16: 17.7 vs 17.5), for under 1 us of added latency. */
#define POLL_PAUSES 16

static bool poll_for_work(vhd_worker *w)
{
    uint64_t deadline = now_ns() + w->poll_ns;
    vhd_vring_disable_notify(w->vr);
    do {
        if (has_work(w))
            return true;
        /* Each look pulls the avail index's cache line away from the
         * driver, who writes it. */
        for (int i = 0; i < POLL_PAUSES; i++)
            __builtin_ia32_pause();
    } while (now_ns() < deadline);
    return vhd_vring_enable_notify(w->vr) != 0;
}

static void run_and_poll(vhd_worker *w)
{
    uint64_t before = w->vr->stats.requests;
    run(w);
    while (w->poll_ns && w->vr->stats.requests != before && !w->vr->stats.broken) {
        before = w->vr->stats.requests;
        if (!poll_for_work(w))
            break;
        run(w);
    }
}

static void *worker_main(void *arg)
{
    vhd_worker *w = arg;
    /* Kicks that came while the ring was stopped or disabled are not lost:
     * the ring is always looked at once when the worker starts. */
    run_and_poll(w);
    int idle_timeout = w->kick_fd < 0 ? VHD_POLL_INTERVAL_MS : -1;
    for (;;) {
        struct epoll_event ev[3];
        /* Work left over from a budget-limited call: only check for stop. */
        int timeout = vhd_vring_take_more(w->vr) ? 0 : idle_timeout;
        int n = epoll_wait(w->epoll_fd, ev, 3, timeout);
        if (n < 0 && errno != EINTR) {
            quiesce(w);
            break;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].data.fd == w->stop_fd) {
                quiesce(w);
                return NULL;
            }
            if (ev[i].data.fd == w->kick_fd) {
                drain_eventfd(w->kick_fd);
                w->vr->stats.kicks++;
            }
        }
        run_and_poll(w);
    }
    return NULL;
}

static void worker_free(vhd_worker *w)
{
    if (w->epoll_fd >= 0)
        close(w->epoll_fd);
    if (w->stop_fd >= 0)
        close(w->stop_fd);
    free(w);
}

vhd_worker *vhd_worker_start(vhd_vring *vr, int dev_kind, void *dev, int kick_fd,
                             int backend_fd, const struct vhd_worker_config *cfg, int *err)
{
    vhd_worker *w = calloc(1, sizeof(*w));
    if (!w) {
        *err = -ENOMEM;
        return NULL;
    }
    w->vr = vr;
    w->dev_kind = dev_kind;
    w->dev = dev;
    w->kick_fd = kick_fd;
    w->poll_ns = cfg->poll_ns;
    w->backend_fd = backend_fd;
    w->backend_watched = backend_fd >= 0;
    w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    w->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (w->stop_fd < 0 || w->epoll_fd < 0 || watch(w->epoll_fd, w->stop_fd) < 0 ||
        (kick_fd >= 0 && watch(w->epoll_fd, kick_fd) < 0) ||
        (backend_fd >= 0 && watch(w->epoll_fd, backend_fd) < 0)) {
        *err = -errno;
        worker_free(w);
        return NULL;
    }
    /* Signals belong to Python's main thread: the worker inherits a full mask. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&w->thread, NULL, worker_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        *err = -rc;
        worker_free(w);
        return NULL;
    }
    if (cfg->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cfg->cpu, &set);
        rc = pthread_setaffinity_np(w->thread, sizeof(set), &set);
        if (rc != 0) {
            vhd_worker_stop(w);
            *err = -rc;
            return NULL;
        }
    }
    *err = 0;
    return w;
}

void vhd_worker_stop(vhd_worker *w)
{
    if (!w)
        return;
    eventfd_write(w->stop_fd, 1);
    pthread_join(w->thread, NULL);
    worker_free(w);
}
