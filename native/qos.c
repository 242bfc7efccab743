/* Per-device QoS: rate limits enforced where requests are popped.
 *
 * Each limit (libvirt <iotune>'s total_bytes_sec, read_iops_sec, ...) is a
 * token bucket with QEMU's semantics (util/throttle.c): it refills at avg
 * per second and holds avg/10 (100 ms worth), or with a burst max * max_length
 * units drained at most at max per second (a second bucket of max/10).
 * Each bucket is kept as one 64-bit "theoretical arrival time" (GCRA, the
 * same arithmetic as a token bucket): a charge of c units moves it by
 * c / rate; the bucket is over once it runs more than its capacity / rate
 * ahead of the clock.  One word per bucket, so a device's or a group's
 * buckets are shared by all its rings, on any worker, with one CAS each.
 *
 * A ring asks before each pop (vhd_qos_may_pop): over a bucket it stops
 * popping.  The request stays in the avail ring (the guest sees back-pressure,
 * never an error), the ring's kicks stay off, and its worker arms a timerfd
 * for the moment the buckets allow the next request (sched.c).  A request is
 * charged after it was popped, with its real size: the buckets may go one
 * request over (net: one lease of frames, at most a quarter of what the
 * buckets hold at the time, one frame near a limit), which the next
 * requests pay for, so
 * the long-run rate is exact.  blk looks at the buckets for every request:
 * its sizes vary too much to lease, and a request costs microseconds.  A device without limits has no gate: one
 * predictable branch per pop.
 *
 * Times are in 1/16 ns so that the cost of one byte at 10 GB/s is still
 * exact to a few percent; a 64-bit time lasts 18 years of uptime. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vhd.h"

#define T_SHIFT 4                                  /* times in 1/16 ns */
#define T_SEC ((uint64_t)1000000000u << T_SHIFT)
#define FP_SHIFT 24                                /* inc = cost * inc_fp >> FP_SHIFT */
#define LEASE_MAX 1024                             /* requests per look at the buckets, at most */
#define LEASE_MIN_BYTES 65536                      /* what a lease assumes a request costs, at least */

struct cell {
    uint64_t inc_fp;      /* 0: cell off; else time per unit of cost, fixed point */
    uint64_t tolerance;   /* how far ahead of the clock it may run: capacity / rate */
    uint64_t tat;         /* atomic: theoretical arrival time of the next unit */
};

struct bucket {
    uint32_t classes;
    uint32_t unit;
    struct cell avg;      /* the rate */
    struct cell burst;    /* with max: the burst's own rate */
};

struct vhd_qos {
    uint32_t n;
    uint64_t op_size;     /* size_iops_sec: a larger request counts as size / op_size */
    struct bucket b[VHD_QOS_MAX_LIMITS];
};

/* --- the clock --------------------------------------------------------------- */

#ifdef VHD_TEST_HOOKS
static uint64_t fake_now;   /* test builds only: a clock the tests set (process-wide, as the real one) */
#endif

uint64_t vhd_qos_clock(void)
{
#ifdef VHD_TEST_HOOKS
    uint64_t f = __atomic_load_n(&fake_now, __ATOMIC_RELAXED);
    if (f)
        return f;
#endif
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int vhd_qos_set_fake_clock(uint64_t ns)
{
#ifdef VHD_TEST_HOOKS
    __atomic_store_n(&fake_now, ns, __ATOMIC_RELAXED);
    return 0;
#else
    (void)ns;
    return -1;
#endif
}

/* --- buckets ----------------------------------------------------------------- */

static uint64_t sat64(unsigned __int128 v)
{
    return v > UINT64_MAX / 2 ? UINT64_MAX / 2 : (uint64_t)v;
}

/* rate units per second, cost in bytes or in 1/2^16 ops. */
static void cell_init(struct cell *c, uint32_t unit, uint64_t rate, unsigned __int128 tolerance)
{
    unsigned __int128 per = (unsigned __int128)T_SEC << FP_SHIFT;
    if (unit == VHD_QOS_OPS)
        per >>= VHD_QOS_OPS_SHIFT;
    c->inc_fp = sat64(per / rate);
    if (c->inc_fp == 0)
        c->inc_fp = 1;
    c->tolerance = sat64(tolerance);
}

static uint64_t cell_inc(const struct cell *c, uint64_t cost)
{
    return sat64(((unsigned __int128)cost * c->inc_fp) >> FP_SHIFT);
}

/* What was used of prev's bucket (how far it ran ahead of the clock) is
 * carried over in units, up to the new bucket's capacity: a changed limit
 * neither hands out a fresh burst nor stalls longer than one bucket. */
static void cell_carry(struct cell *c, const struct cell *prev, uint64_t now)
{
    uint64_t tat = __atomic_load_n(&prev->tat, __ATOMIC_RELAXED);
    uint64_t ahead = tat > now ? tat - now : 0;
    unsigned __int128 mine = (unsigned __int128)ahead * c->inc_fp / prev->inc_fp;
    uint64_t a = sat64(mine);
    c->tat = now + (a < c->tolerance ? a : c->tolerance);
}

int vhd_qos_check_limit(const struct vhd_qos_limit *l)
{
    if ((l->classes & ~(uint32_t)(VHD_QOS_READ | VHD_QOS_WRITE)) || !l->classes)
        return -EINVAL;
    if (l->unit != VHD_QOS_BYTES && l->unit != VHD_QOS_OPS)
        return -EINVAL;
    if (l->avg > VHD_QOS_MAX_RATE || l->max > VHD_QOS_MAX_RATE || l->max_length > VHD_QOS_MAX_LENGTH)
        return -ERANGE;
    if (l->avg == 0 && (l->max || l->max_length))
        return -EINVAL;    /* a burst needs its rate */
    if (l->max && l->max < l->avg)
        return -EINVAL;
    return 0;
}

vhd_qos *vhd_qos_new(const struct vhd_qos_limit *limits, uint32_t n, uint64_t op_size,
                     const vhd_qos *prev, int *err)
{
    if (n > VHD_QOS_MAX_LIMITS) {
        *err = -E2BIG;
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++)
        if ((*err = vhd_qos_check_limit(&limits[i])) < 0)
            return NULL;
    vhd_qos *q = calloc(1, sizeof(*q));
    if (!q) {
        *err = -ENOMEM;
        return NULL;
    }
    uint64_t now = vhd_qos_clock() << T_SHIFT;
    q->op_size = op_size;
    for (uint32_t i = 0; i < n; i++) {
        const struct vhd_qos_limit *l = &limits[i];
        if (l->avg == 0)
            continue;
        struct bucket *b = &q->b[q->n++];
        b->classes = l->classes;
        b->unit = l->unit;
        if (l->max > l->avg) {
            /* QEMU: a bucket of max * max_length (1 s by default) at avg, and
             * the burst itself at most max per second (a bucket of max/10). */
            uint64_t len = l->max_length ? l->max_length : 1;
            cell_init(&b->avg, l->unit, l->avg, (unsigned __int128)l->max * len * T_SEC / l->avg);
            cell_init(&b->burst, l->unit, l->max, T_SEC / 10);
        } else {
            cell_init(&b->avg, l->unit, l->avg, T_SEC / 10);   /* QEMU: avg / 10 */
        }
        b->avg.tat = b->burst.tat = 0;   /* idle since ever: a full bucket */
        if (!prev)
            continue;
        for (uint32_t j = 0; j < prev->n; j++) {
            const struct bucket *p = &prev->b[j];
            if (p->classes != b->classes || p->unit != b->unit)
                continue;
            cell_carry(&b->avg, &p->avg, now);
            if (b->burst.inc_fp && p->burst.inc_fp)
                cell_carry(&b->burst, &p->burst, now);
        }
    }
    *err = 0;
    return q;
}

void vhd_qos_free(vhd_qos *q)
{
    free(q);
}

static bool cell_over(const struct cell *c, uint64_t now, uint64_t *until)
{
    if (!c->inc_fp)
        return false;
    uint64_t tat = __atomic_load_n(&c->tat, __ATOMIC_RELAXED);
    if (tat <= now || tat - now <= c->tolerance)
        return false;
    uint64_t at = tat - c->tolerance;
    if (at > *until)
        *until = at;
    return true;
}

int vhd_qos_admit(const vhd_qos *q, uint32_t classes, uint64_t now_ns, uint64_t *until_ns)
{
    uint64_t now = now_ns << T_SHIFT, until = 0;
    bool over = false;
    for (uint32_t i = 0; i < q->n; i++) {
        const struct bucket *b = &q->b[i];
        if (!(b->classes & classes))
            continue;
        over |= cell_over(&b->avg, now, &until);
        over |= cell_over(&b->burst, now, &until);
    }
    /* Rounded up: a timer for this moment finds the buckets open. */
    *until_ns = over ? (until + (1u << T_SHIFT) - 1) >> T_SHIFT : 0;
    return !over;
}

/* Requests of `cost` units each the cell still holds. */
static uint64_t cell_room(const struct cell *c, uint64_t now, uint64_t cost)
{
    if (!c->inc_fp)
        return UINT64_MAX;
    uint64_t tat = __atomic_load_n(&c->tat, __ATOMIC_RELAXED);
    uint64_t ahead = tat > now ? tat - now : 0;
    if (ahead >= c->tolerance)
        return 0;
    uint64_t per = cell_inc(c, cost ? cost : 1);
    return per ? (c->tolerance - ahead) / per : UINT64_MAX;
}

/* How many requests a leasing gate (net) may let through before it looks
 * at the buckets again: a quarter of the smallest room, each request taken
 * to cost as much as the largest seen (at least a 64 KiB frame).  Far from
 * every limit that is many (a clock read and a bucket walk per lease, not
 * per frame); near one it is one frame, so a low limit is smooth.  What a
 * lease lets through is charged all the same, so a ring sharing a group's
 * buckets can only borrow, and pays. */
static uint32_t lease_of(const vhd_qos *q, uint32_t classes, uint64_t now_ns, uint64_t req_bytes)
{
    uint64_t now = now_ns << T_SHIFT, room = UINT64_MAX;
    if (req_bytes < LEASE_MIN_BYTES)
        req_bytes = LEASE_MIN_BYTES;
    uint64_t ops = vhd_qos_op_cost_of(q->op_size, req_bytes);
    for (uint32_t i = 0; i < q->n; i++) {
        const struct bucket *b = &q->b[i];
        if (!(b->classes & classes))
            continue;
        uint64_t cost = b->unit == VHD_QOS_BYTES ? req_bytes : ops;
        uint64_t r = cell_room(&b->avg, now, cost), rb = cell_room(&b->burst, now, cost);
        room = r < room ? r : room;
        room = rb < room ? rb : room;
    }
    room /= 4;
    if (room > LEASE_MAX)
        room = LEASE_MAX;
    return room > 1 ? (uint32_t)room : 1;
}

static void cell_charge(struct cell *c, uint64_t now, uint64_t cost)
{
    if (!c->inc_fp || !cost)
        return;
    uint64_t inc = cell_inc(c, cost);
    uint64_t old = __atomic_load_n(&c->tat, __ATOMIC_RELAXED), new;
    do {
        new = (old > now ? old : now) + inc;
    } while (!__atomic_compare_exchange_n(&c->tat, &old, new, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}

void vhd_qos_charge(vhd_qos *q, uint32_t cls, uint64_t bytes, uint64_t ops, uint64_t now_ns)
{
    uint64_t now = now_ns << T_SHIFT;
    for (uint32_t i = 0; i < q->n; i++) {
        struct bucket *b = &q->b[i];
        if (!(b->classes & cls))
            continue;
        uint64_t cost = b->unit == VHD_QOS_BYTES ? bytes : ops;
        cell_charge(&b->avg, now, cost);
        cell_charge(&b->burst, now, cost);
    }
}

uint64_t vhd_qos_op_cost(const vhd_qos *q, uint64_t bytes)
{
    return vhd_qos_op_cost_of(q->op_size, bytes);
}

/* --- gates: one per ring ------------------------------------------------------ */

vhd_qos_gate *vhd_qos_gate_new(uint32_t classes, int leasing)
{
    vhd_qos_gate *g = calloc(1, sizeof(*g));
    if (g) {
        g->classes = classes;
        g->leasing = leasing != 0;
        g->lease = 1;
    }
    return g;
}

void vhd_qos_gate_free(vhd_qos_gate *g)
{
    free(g);
}

void vhd_qos_gate_stats(const vhd_qos_gate *g, struct vhd_qos_gate_stats *out)
{
    out->throttles = __atomic_load_n(&g->stats.throttles, __ATOMIC_RELAXED);
    out->throttled_ns = __atomic_load_n(&g->stats.throttled_ns, __ATOMIC_RELAXED);
    out->throttled_since = __atomic_load_n(&g->stats.throttled_since, __ATOMIC_RELAXED);
}

uint32_t vhd_qos_gate_lease(const vhd_qos_gate *g)
{
    return g->lease;
}

/* The charges counted since the last flush reach the shared buckets. */
static void gate_flush(vhd_qos_gate *g, uint64_t now)
{
    if (!g->n)
        return;
    for (int c = 0; c < 2; c++)
        if (g->ops[c])
            vhd_qos_charge(g->q, c == 0 ? VHD_QOS_READ : VHD_QOS_WRITE, g->bytes[c], g->ops[c], now);
    memset(g->bytes, 0, sizeof(g->bytes));
    memset(g->ops, 0, sizeof(g->ops));
    g->n = 0;
}

static void throttle_end(vhd_qos_gate *g, uint64_t now)
{
    g->until = 0;
    uint64_t since = g->stats.throttled_since;
    if (since) {
        __atomic_store_n(&g->stats.throttled_ns, g->stats.throttled_ns + (now > since ? now - since : 0),
                         __ATOMIC_RELAXED);
        __atomic_store_n(&g->stats.throttled_since, 0, __ATOMIC_RELAXED);
    }
}

void vhd_qos_gate_end_turn(vhd_qos_gate *g)
{
    if (g->n)
        gate_flush(g, vhd_qos_clock());
}

bool vhd_qos_gate_admit(vhd_qos_gate *g, const vhd_vring *vr)
{
    /* (vhd_qos_may_pop let the pops inside a lease through.) */
    uint64_t now = vhd_qos_clock(), until;
    gate_flush(g, now);
    if (vhd_qos_admit(g->q, g->classes, now, &until)) {
        throttle_end(g, now);
        if (g->leasing)
            g->lease = lease_of(g->q, g->classes, now, g->max_bytes);
        return true;
    }
    g->lease = 1;
    /* Nothing waits: let the pop find the ring empty and the ring idle as
     * usual (its next kick asks again). */
    if (!vhd_vring_pending(vr)) {
        throttle_end(g, now);
        return true;
    }
    if (!g->stats.throttled_since) {
        __atomic_store_n(&g->stats.throttled_since, now, __ATOMIC_RELAXED);
        __atomic_store_n(&g->stats.throttles, g->stats.throttles + 1, __ATOMIC_RELAXED);
    }
    g->until = until;
    return false;
}

void vhd_vring_set_qos(vhd_vring *vr, vhd_qos_gate *g, vhd_qos *q)
{
    if (g) {
        uint64_t now = vhd_qos_clock();
        if (g->q)
            gate_flush(g, now);
        g->n = 0;
        g->lease = 1;
        memset(g->bytes, 0, sizeof(g->bytes));
        memset(g->ops, 0, sizeof(g->ops));
        g->q = q;
        g->op_size = q ? q->op_size : 0;
        if (!q)
            throttle_end(g, now);
        else
            g->until = g->until ? 1 : 0;   /* throttled: look again at once */
    }
    vr->qos = g && q ? g : NULL;
}

struct set_qos {
    vhd_qos_gate *g;
    vhd_qos *q;
};

static void set_qos_on_worker(vhd_task *t, void *arg)
{
    struct set_qos *a = arg;
    vhd_vring_set_qos(vhd_task_vring(t), a->g, a->q);
}

void vhd_task_set_qos(vhd_task *t, vhd_qos_gate *g, vhd_qos *q)
{
    struct set_qos a = { g, q };
    vhd_task_call(t, set_qos_on_worker, &a);
}
