/* The ring scheduler: a fixed set of native worker threads, each serving
 * many rings (SPDK's reactors, rust-vmm's epoll handler, QEMU iothreads).
 *
 * A worker sleeps in one epoll on the kick eventfds and back-end fds (tap
 * queue, io_uring completion eventfd) of every ring assigned to it, plus
 * its own command eventfd.  A wake-up marks rings ready; ready rings run
 * in turn, each for at most one budget (vhd_vring_over_budget), so a guest
 * flooding one ring cannot starve its neighbours: a ring with work left is
 * queued again behind the others.  Nothing here blocks: a ring that stops
 * while io_uring requests are in flight keeps being reaped on completion
 * events until the last one is back, then leaves.
 *
 * The control plane talks to a worker only through its command queue
 * (mutex + eventfd): adopt a ring, detach it, run a function on it between
 * turns (memory or dirty-log updates).  Everything else a worker touches is
 * its own, so the data path takes no lock.  Which worker gets a ring is the
 * caller's policy (vhostd/scheduler.py).
 *
 * A ring of a back-end that blocks (the synchronous blk engine) gets an
 * exclusive worker: the same loop on a thread of its own, ended with it.
 *
 * A ring a QoS limit holds (qos.c) stops popping and tells when its buckets
 * open again; the worker keeps such rings on a list and sleeps on one
 * timerfd set for the earliest (at least QOS_TIMER_SLACK_NS ahead), in the
 * same epoll: no busy loop, and the ring's other events (kicks stay off
 * meanwhile) do not wake it early. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "vhd.h"

/* How often a ring whose front-end gave no kick fd is looked at. */
#define POLL_INTERVAL_NS 1000000u
/* Chains handled before used->idx is published and the guest notified. */
#define VHD_BATCH 64
#define MAX_EVENTS 64
/* Between two looks at the polled rings: 16 pauses, ~0.3-0.8 us on current
 * x86.  Looking more often made --poll-us 50 slower than no polling against
 * a busy-polling front-end (each look pulls the avail index's cache line
 * away from the driver, who writes it). */
#define POLL_PAUSES 16
/* During a busy-poll window, the other rings' events are checked every
 * this many rounds (an epoll_wait(0) costs a syscall). */
#define POLL_EPOLL_ROUNDS 16

enum watch_kind { W_COMMAND, W_KICK, W_BACKEND, W_TIMER };

struct watch {
    vhd_task *task;           /* NULL for the command eventfd */
    enum watch_kind kind;
};

enum cmd_op { CMD_ADOPT, CMD_DETACH, CMD_CALL, CMD_EXIT };

struct cmd {
    enum cmd_op op;
    vhd_task *task;
    void (*fn)(vhd_task *t, void *arg);
    void *arg;
    bool done;                /* under the worker's lock */
    bool heap;                /* ADOPT: freed by the worker, nobody waits */
    struct cmd *next;
};

struct vhd_task {
    struct vhd_worker *w;
    vhd_vring *vr;
    int kind;
    void *dev;
    int kick_fd;
    int backend_fd;
    bool backend_watched;     /* net RX: the tap, only while the guest has buffers */
    uint64_t poll_ns;
    bool adopted;
    bool ready;
    bool stopping;            /* detach asked, io_uring requests still in flight */
    bool quiet;               /* broken by the guest: its kicks no longer wake us */
    struct cmd *detach;       /* completed once stopping is over */
    struct watch kick_watch;
    struct watch backend_watch;
    vhd_task *prev, *next;    /* the worker's ready list */
    uint32_t slot;            /* index in w->tasks */
    bool throttled;           /* on the worker's throttled list (a QoS limit holds it) */
    vhd_task *tprev, *tnext;
};

struct vhd_worker {
    uint32_t index;
    bool exclusive;
    pthread_t thread;
    int epoll_fd;
    int cmd_fd;
    struct watch cmd_watch;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct cmd *cmds, **cmds_tail;
    /* Owned by the worker thread. */
    vhd_task **tasks;
    uint32_t ntasks, cap;
    uint32_t npolled;         /* rings without a kick fd */
    uint64_t last_poll_ns;
    vhd_task ready_head;      /* sentinel of a circular list */
    int timer_fd;             /* QoS: wakes throttled rings */
    struct watch timer_watch;
    uint64_t timer_at;        /* when it is armed for (0: disarmed) */
    vhd_task throttled_head;  /* sentinel: rings a limit holds */
    struct vhd_worker_stats stats;
};

struct vhd_sched {
    uint32_t nworkers;
    struct vhd_worker **workers;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- what a ring runs ------------------------------------------------------ */

static void blk_handler(void *blk, vhd_vring *vr, struct vhd_chain *c)
{
    vhd_blk_handle(blk, vr, c);
    vhd_vring_flush_if_big(vr);
}

static int process(vhd_vring *vr, int dev_kind, void *dev)
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

int vhd_process_ring(vhd_vring *vr, int dev_kind, void *dev)
{
    int rc = process(vr, dev_kind, dev);
    if (vr->qos)
        vhd_qos_gate_end_turn(vr->qos);   /* what the turn counted reaches the buckets */
    return rc;
}

/* True if the ring would find work now (busy-poll). */
static bool has_work(vhd_task *t)
{
    switch (t->kind) {
    case VHD_DEV_BLK_URING:
        return vhd_vring_pending(t->vr) || vhd_blk_queue_completions(t->dev);
    case VHD_DEV_NET_RX: {
        /* Frames waiting in the tap (the null back-end always has one). */
        struct pollfd p = { .fd = t->backend_fd, .events = POLLIN };
        return t->backend_fd < 0 || poll(&p, 1, 0) > 0;
    }
    default:
        return vhd_vring_pending(t->vr);
    }
}

/* --- the ready list --------------------------------------------------------- */

static void make_ready(struct vhd_worker *w, vhd_task *t)
{
    if (t->ready)
        return;
    t->ready = true;
    t->prev = w->ready_head.prev;
    t->next = &w->ready_head;
    w->ready_head.prev->next = t;
    w->ready_head.prev = t;
}

static void unready(vhd_task *t)
{
    if (!t->ready)
        return;
    t->prev->next = t->next;
    t->next->prev = t->prev;
    t->ready = false;
}

static bool any_ready(const struct vhd_worker *w)
{
    return w->ready_head.next != &w->ready_head;
}

/* --- running a ring ---------------------------------------------------------- */

static void watch_backend(struct vhd_worker *w, vhd_task *t, bool want)
{
    if (want == t->backend_watched)
        return;
    struct epoll_event ev = { .events = want ? EPOLLIN : 0, .data.ptr = &t->backend_watch };
    epoll_ctl(w->epoll_fd, EPOLL_CTL_MOD, t->backend_fd, &ev);
    t->backend_watched = want;
}

/* --- rings a QoS limit holds --------------------------------------------------- */

/* A throttled ring is woken at least this long after it stopped.  Every
 * bucket holds at least 100 ms (qos.c), so a late wake-up loses no budget:
 * the ring then takes the 1 ms's worth at once.  It bounds the wake-ups a
 * limit costs to 1000 per second and worker, however low the rate per
 * request (2000 IOPS would be 2000 timer wake-ups otherwise). */
#define QOS_TIMER_SLACK_NS 1000000u

static uint64_t slacked(uint64_t until)
{
    uint64_t earliest = vhd_qos_clock() + QOS_TIMER_SLACK_NS;
    return until < earliest ? earliest : until;
}

static void arm_timer(struct vhd_worker *w, uint64_t at)
{
    if (w->timer_at == at)
        return;
    struct itimerspec its = { 0 };
    its.it_value.tv_sec = (time_t)(at / 1000000000u);
    its.it_value.tv_nsec = (long)(at % 1000000000u);
    if (at == 0)
        its.it_value.tv_nsec = 0;   /* disarm */
    timerfd_settime(w->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    w->timer_at = at;
}

static void unthrottle(vhd_task *t)
{
    if (!t->throttled)
        return;
    t->tprev->tnext = t->tnext;
    t->tnext->tprev = t->tprev;
    t->throttled = false;
}

static void throttle(struct vhd_worker *w, vhd_task *t, uint64_t until)
{
    if (!t->throttled) {
        t->throttled = true;
        t->tprev = w->throttled_head.tprev;
        t->tnext = &w->throttled_head;
        w->throttled_head.tprev->tnext = t;
        w->throttled_head.tprev = t;
    }
    uint64_t at = slacked(until);
    if (w->timer_at == 0 || at < w->timer_at)
        arm_timer(w, at);
}

/* The timer fired: rings whose buckets are open run again; the timer is
 * set for the earliest of the others.  The buckets are shared, so a ring
 * may find them closed again: it is simply throttled anew. */
static void timer_expired(struct vhd_worker *w)
{
    uint64_t now = vhd_qos_clock(), next = 0;
    w->timer_at = 0;
    for (vhd_task *t = w->throttled_head.tnext, *n; t != &w->throttled_head; t = n) {
        n = t->tnext;
        uint64_t until = t->vr->qos ? t->vr->qos->until : 0;
        if (until <= now) {
            unthrottle(t);
            if (!t->stopping)
                make_ready(w, t);
        } else if (next == 0 || until < next) {
            next = until;
        }
    }
    if (next)
        arm_timer(w, slacked(next));
}

static void unwatch(struct vhd_worker *w, int fd);

/* One budget of work.  Returns true if requests were handled. */
static bool run_task(struct vhd_worker *w, vhd_task *t)
{
    uint64_t before = t->vr->stats.requests;
    int rc = vhd_process_ring(t->vr, t->kind, t->dev);
    w->stats.runs++;
    /* Net RX watches the tap only while the guest has buffers: with none, a
     * readable tap would wake us for nothing; the guest's kick resumes it. */
    if (t->kind == VHD_DEV_NET_RX && t->backend_fd >= 0)
        watch_backend(w, t, rc == VHD_RX_IDLE);
    if (vhd_vring_take_more(t->vr))
        make_ready(w, t);
    if (vhd_qos_throttled(t->vr))
        throttle(w, t, t->vr->qos->until);
    if (t->vr->stats.broken && !t->quiet) {
        /* The guest broke the ring: nothing more is taken from it until the
         * front-end sets it up again (a new task).  Its kicks stop waking the
         * worker; an io_uring blk ring keeps its completion eventfd, so that
         * requests in flight are still reaped. */
        unwatch(w, t->kick_fd);
        t->quiet = true;
    }
    return t->vr->stats.requests != before;
}

static void finish_detach(struct vhd_worker *w, vhd_task *t);

/* A stopping io_uring ring: reap what completed; leave once nothing is in flight. */
static void run_stopping(struct vhd_worker *w, vhd_task *t)
{
    if (vhd_blk_queue_quiesce(t->dev, t->vr) == 0)
        finish_detach(w, t);
}

static uint64_t run_ready(struct vhd_worker *w)
{
    /* One pass over what is ready now; rings queued again meanwhile (work
     * left at the end of their budget) wait for the next pass. */
    vhd_task *last = w->ready_head.prev;
    uint64_t poll_ns = 0;
    while (any_ready(w)) {
        vhd_task *t = w->ready_head.next;
        bool end = t == last;
        unready(t);
        if (t->stopping)
            run_stopping(w, t);
        else if (run_task(w, t) && t->poll_ns > poll_ns && !t->vr->stats.broken)
            poll_ns = t->poll_ns;
        if (end)
            break;
    }
    return poll_ns;
}

/* --- events and commands --------------------------------------------------------- */

static void drain_eventfd(int fd)
{
    eventfd_t v;
    (void)eventfd_read(fd, &v);
}

static bool run_commands(struct vhd_worker *w);

/* Returns true if the worker must exit. */
static bool handle_events(struct vhd_worker *w, const struct epoll_event *ev, int n)
{
    bool commands = false;
    for (int i = 0; i < n; i++) {
        struct watch *wa = ev[i].data.ptr;
        switch (wa->kind) {
        case W_COMMAND:
            drain_eventfd(w->cmd_fd);
            commands = true;
            break;
        case W_KICK:
            drain_eventfd(wa->task->kick_fd);
            wa->task->vr->stats.kicks++;
            make_ready(w, wa->task);
            break;
        case W_BACKEND:
            make_ready(w, wa->task);
            break;
        case W_TIMER:
            drain_eventfd(w->timer_fd);   /* the expiry count: 8 bytes, like an eventfd */
            timer_expired(w);
            break;
        }
    }
    return commands && run_commands(w);
}

/* --- busy-poll ---------------------------------------------------------------- */

static bool polling(const vhd_task *t)
{
    return t->poll_ns > 0 && !t->stopping && t->kick_fd >= 0 && !t->vr->stats.broken &&
           !vhd_qos_throttled(t->vr);   /* a limit holds it: its timer, not a spin */
}

/* --poll-us: after a pass that did work, watch every polling ring of this
 * worker (kicks suppressed) for up to poll_ns, restarting the window after
 * each find; the other rings' events are looked at every few rounds.  Only
 * a worker that just did work polls, so an idle one sleeps and costs no
 * CPU.  Returns true if the worker must exit. */
static bool busy_poll(struct vhd_worker *w, uint64_t poll_ns)
{
    for (uint32_t i = 0; i < w->ntasks; i++)
        if (polling(w->tasks[i]))
            vhd_vring_disable_notify(w->tasks[i]->vr);
    uint64_t deadline = now_ns() + poll_ns;
    bool exit = false;
    for (unsigned round = 1; !exit && now_ns() < deadline; round++) {
        w->stats.polls++;
        bool found = false;
        for (uint32_t i = 0; i < w->ntasks; i++) {
            vhd_task *t = w->tasks[i];
            if (polling(t) && has_work(t))
                make_ready(w, t);
        }
        if (round % POLL_EPOLL_ROUNDS == 0) {
            struct epoll_event ev[MAX_EVENTS];
            int n = epoll_wait(w->epoll_fd, ev, MAX_EVENTS, 0);
            exit = n > 0 && handle_events(w, ev, n);
        }
        if (any_ready(w)) {
            found = run_ready(w) > 0;
            if (found)
                deadline = now_ns() + poll_ns;
            for (uint32_t i = 0; i < w->ntasks; i++)   /* a drain re-enabled them */
                if (polling(w->tasks[i]))
                    vhd_vring_disable_notify(w->tasks[i]->vr);
            continue;
        }
        for (int i = 0; i < POLL_PAUSES; i++)
            __builtin_ia32_pause();
    }
    /* Kicks back on; buffers that came meanwhile are not lost. */
    for (uint32_t i = 0; i < w->ntasks; i++) {
        vhd_task *t = w->tasks[i];
        if (polling(t) && vhd_vring_enable_notify(t->vr))
            make_ready(w, t);
    }
    return exit;
}

/* --- the loop ------------------------------------------------------------------ */

static void mark_polled_ready(struct vhd_worker *w)
{
    uint64_t now = now_ns();
    if (now - w->last_poll_ns < POLL_INTERVAL_NS)
        return;
    w->last_poll_ns = now;
    for (uint32_t i = 0; i < w->ntasks; i++)
        if (w->tasks[i]->kick_fd < 0 && !w->tasks[i]->stopping && !w->tasks[i]->quiet)
            make_ready(w, w->tasks[i]);
}

static void *worker_main(void *arg)
{
    struct vhd_worker *w = arg;
    vhd_sandbox_thread_start();   /* --sandbox: this thread's seccomp filter (sandbox.c) */
    for (;;) {
        int timeout = -1;
        if (any_ready(w))
            timeout = 0;      /* work left over from a budget: only look for events */
        else if (w->npolled > 0)
            timeout = (int)(POLL_INTERVAL_NS / 1000000u);
        struct epoll_event ev[MAX_EVENTS];
        int n = epoll_wait(w->epoll_fd, ev, MAX_EVENTS, timeout);
        if (n < 0)
            n = 0;            /* EINTR: signals are blocked, so nothing else */
        w->stats.wakeups++;
        if (handle_events(w, ev, n))
            return NULL;
        if (w->npolled > 0)
            mark_polled_ready(w);
        uint64_t poll_ns = run_ready(w);
        if (poll_ns && busy_poll(w, poll_ns))
            return NULL;
    }
}

/* --- tasks on the worker thread ------------------------------------------------- */

static void adopt(struct vhd_worker *w, vhd_task *t)
{
    if (w->ntasks == w->cap) {
        uint32_t cap = w->cap ? 2 * w->cap : 16;
        vhd_task **p = realloc(w->tasks, cap * sizeof(*p));
        if (!p)
            abort();          /* a few bytes per ring: nothing sensible to do */
        w->tasks = p;
        w->cap = cap;
    }
    t->slot = w->ntasks;
    w->tasks[w->ntasks++] = t;
    t->adopted = true;
    if (t->kick_fd < 0)
        w->npolled++;
    w->stats.rings = w->ntasks;
    /* Kicks that came while the ring was stopped are not lost: a ring is
     * always looked at once when it starts. */
    make_ready(w, t);
}

static void unwatch(struct vhd_worker *w, int fd)
{
    if (fd >= 0)
        epoll_ctl(w->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
}

static void complete(struct vhd_worker *w, struct cmd *c)
{
    pthread_mutex_lock(&w->lock);
    c->done = true;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* After this the worker never touches the ring or its device again. */
static void finish_detach(struct vhd_worker *w, vhd_task *t)
{
    unwatch(w, t->backend_fd);
    unready(t);
    unthrottle(t);
    if (t->adopted) {
        vhd_task *last = w->tasks[--w->ntasks];
        w->tasks[t->slot] = last;
        last->slot = t->slot;
        if (t->kick_fd < 0)
            w->npolled--;
        t->adopted = false;
    }
    w->stats.rings = w->ntasks;
    struct cmd *c = t->detach;
    t->detach = NULL;
    complete(w, c);
}

static void detach(struct vhd_worker *w, vhd_task *t, struct cmd *c)
{
    unwatch(w, t->kick_fd);
    t->detach = c;
    /* Before the ring stops, the back-end finishes what it has in flight
     * (last_avail_idx must never count a request the guest will not get
     * back): io_uring completions keep coming on the backend fd. */
    if (t->kind == VHD_DEV_BLK_URING && vhd_blk_queue_quiesce(t->dev, t->vr) > 0) {
        t->stopping = true;
        unready(t);
        return;
    }
    finish_detach(w, t);
}

/* Returns true if the worker must exit. */
static bool run_commands(struct vhd_worker *w)
{
    pthread_mutex_lock(&w->lock);
    struct cmd *c = w->cmds;
    w->cmds = NULL;
    w->cmds_tail = &w->cmds;
    pthread_mutex_unlock(&w->lock);
    bool exit = false;
    while (c) {
        struct cmd *next = c->next;
        switch (c->op) {
        case CMD_ADOPT:
            adopt(w, c->task);
            free(c);
            break;
        case CMD_DETACH:
            detach(w, c->task, c);
            break;
        case CMD_CALL:
            c->fn(c->task, c->arg);
            if (c->task->adopted && !c->task->stopping)
                make_ready(w, c->task);    /* look at the ring under its new state */
            complete(w, c);
            break;
        case CMD_EXIT:
            exit = true;
            complete(w, c);
            break;
        }
        c = next;
    }
    return exit;
}

/* --- the control plane's side ------------------------------------------------------ */

static void post(struct vhd_worker *w, struct cmd *c)
{
    c->next = NULL;
    pthread_mutex_lock(&w->lock);
    *w->cmds_tail = c;
    w->cmds_tail = &c->next;
    pthread_mutex_unlock(&w->lock);
    eventfd_write(w->cmd_fd, 1);
}

static void post_and_wait(struct vhd_worker *w, struct cmd *c)
{
    c->done = false;
    post(w, c);
    pthread_mutex_lock(&w->lock);
    while (!c->done)
        pthread_cond_wait(&w->cond, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

static void worker_free(struct vhd_worker *w)
{
    if (!w)
        return;
    if (w->epoll_fd >= 0)
        close(w->epoll_fd);
    if (w->cmd_fd >= 0)
        close(w->cmd_fd);
    if (w->timer_fd >= 0)
        close(w->timer_fd);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
    free(w->tasks);
    free(w);
}

static struct vhd_worker *worker_new(uint32_t index, int cpu, bool exclusive, int *err)
{
    struct vhd_worker *w = calloc(1, sizeof(*w));
    if (!w) {
        *err = -ENOMEM;
        return NULL;
    }
    w->index = index;
    w->exclusive = exclusive;
    w->cmds_tail = &w->cmds;
    w->ready_head.prev = w->ready_head.next = &w->ready_head;
    w->throttled_head.tprev = w->throttled_head.tnext = &w->throttled_head;
    w->cmd_watch.kind = W_COMMAND;
    w->timer_watch.kind = W_TIMER;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->cmd_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    w->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    w->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &w->cmd_watch };
    struct epoll_event tev = { .events = EPOLLIN, .data.ptr = &w->timer_watch };
    if (w->cmd_fd < 0 || w->timer_fd < 0 || w->epoll_fd < 0 ||
        epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, w->cmd_fd, &ev) < 0 ||
        epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, w->timer_fd, &tev) < 0) {
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
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        rc = pthread_setaffinity_np(w->thread, sizeof(set), &set);
    }
    if (rc == 0)
        rc = pthread_setname_np(w->thread, exclusive ? "vhostd-ring" : "vhostd-worker");
    *err = -rc;
    return w;
}

static void worker_exit(struct vhd_worker *w)
{
    struct cmd c = { .op = CMD_EXIT };
    post_and_wait(w, &c);
    pthread_join(w->thread, NULL);
    worker_free(w);
}

vhd_sched *vhd_sched_new(uint32_t nworkers, const int *cpus, uint32_t ncpus, int *err)
{
    if (nworkers == 0 || nworkers > VHD_MAX_WORKERS) {
        *err = -EINVAL;
        return NULL;
    }
    vhd_sched *s = calloc(1, sizeof(*s));
    if (s)
        s->workers = calloc(nworkers, sizeof(*s->workers));
    if (!s || !s->workers) {
        free(s);
        *err = -ENOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < nworkers; i++) {
        int cpu = ncpus ? cpus[i % ncpus] : -1;
        s->workers[i] = worker_new(i, cpu, false, err);
        if (*err) {
            s->nworkers = i + (s->workers[i] != NULL);
            vhd_sched_free(s);
            return NULL;
        }
    }
    s->nworkers = nworkers;
    *err = 0;
    return s;
}

void vhd_sched_free(vhd_sched *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->nworkers; i++)
        worker_exit(s->workers[i]);
    free(s->workers);
    free(s);
}

uint32_t vhd_sched_nworkers(const vhd_sched *s)
{
    return s->nworkers;
}

const struct vhd_worker_stats *vhd_sched_worker_stats(const vhd_sched *s, uint32_t worker)
{
    return worker < s->nworkers ? &s->workers[worker]->stats : NULL;
}

static int watch(struct vhd_worker *w, int fd, struct watch *wa)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = wa };
    return epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

vhd_task *vhd_task_attach(vhd_sched *s, int worker, vhd_vring *vr, int dev_kind, void *dev,
                          int kick_fd, int backend_fd, uint64_t poll_ns, int *err)
{
    struct vhd_worker *w;
    if (worker == VHD_WORKER_EXCLUSIVE) {
        w = worker_new(UINT32_MAX, -1, true, err);
        if (*err) {
            if (w)
                worker_exit(w);
            return NULL;
        }
    } else if (worker < 0 || (uint32_t)worker >= s->nworkers) {
        *err = -EINVAL;
        return NULL;
    } else {
        w = s->workers[worker];
    }
    vhd_task *t = calloc(1, sizeof(*t));
    struct cmd *c = calloc(1, sizeof(*c));
    if (!t || !c) {
        *err = -ENOMEM;
        goto fail;
    }
    t->w = w;
    t->vr = vr;
    t->kind = dev_kind;
    t->dev = dev;
    t->kick_fd = kick_fd;
    t->backend_fd = backend_fd;
    t->backend_watched = backend_fd >= 0;
    t->poll_ns = poll_ns;
    t->kick_watch = (struct watch){ t, W_KICK };
    t->backend_watch = (struct watch){ t, W_BACKEND };
    /* epoll_ctl is safe beside the worker's epoll_wait; doing it here
     * reports a bad fd (e.g. a regular file as kick) to the caller. */
    *err = kick_fd >= 0 ? watch(w, kick_fd, &t->kick_watch) : 0;
    if (*err == 0 && backend_fd >= 0 && (*err = watch(w, backend_fd, &t->backend_watch)) < 0)
        unwatch(w, kick_fd);
    if (*err)
        goto fail;
    c->op = CMD_ADOPT;
    c->task = t;
    c->heap = true;
    post(w, c);       /* no need to wait: every later command queues behind it */
    return t;
fail:
    free(c);
    free(t);
    if (w->exclusive)
        worker_exit(w);
    return NULL;
}

void vhd_task_detach(vhd_task *t)
{
    if (!t)
        return;
    struct vhd_worker *w = t->w;
    struct cmd c = { .op = CMD_DETACH, .task = t };
    post_and_wait(w, &c);
    if (w->exclusive)
        worker_exit(w);
    free(t);
}

void vhd_task_call(vhd_task *t, void (*fn)(vhd_task *t, void *arg), void *arg)
{
    struct cmd c = { .op = CMD_CALL, .task = t, .fn = fn, .arg = arg };
    post_and_wait(t->w, &c);
}

vhd_vring *vhd_task_vring(const vhd_task *t)
{
    return t->vr;
}

int vhd_task_worker(const vhd_task *t)
{
    return t->w->exclusive ? VHD_WORKER_EXCLUSIVE : (int)t->w->index;
}
