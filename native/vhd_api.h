/* vhostd native data plane: the interface Python sees.
 *
 * This file is read twice: by the C compiler (through vhd.h) and by cffi's
 * cdef() at package build time.  Keep it to declarations and integer
 * #defines cffi can parse: no #include, no #if, no inline code.
 *
 * Ownership: Python owns every fd it passes in (kick, call, err, backing
 * file); C only uses them while a worker runs.  C owns the mappings made by
 * vhd_mem_add() and releases them in vhd_mem_free(); a region added with
 * vhd_mem_add_mapped() is the caller's (several tables may share it).
 */

/* Regions in one table: VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS lets the
 * front-end add up to this many (QEMU, DPDK and rust-vmm offer 509). */
#define VHD_MAX_MEM_REGIONS 509
#define VHD_MAX_QUEUE_SIZE 32768
#define VHD_MAX_IOV 1024

/* vhd_vring_pop() results (negative values are guest errors). */
#define VHD_POP_EMPTY 0
#define VHD_POP_OK 1
#define VHD_ERR_AVAIL_IDX -1    /* avail->idx moved by more than the ring size */
#define VHD_ERR_HEAD -2         /* head index not below the ring size */
#define VHD_ERR_NEXT -3         /* desc.next not below the table size */
#define VHD_ERR_CHAIN_LEN -4    /* chain longer than its table: a loop */
#define VHD_ERR_ADDR -5         /* buffer not inside guest memory */
#define VHD_ERR_INDIRECT -6     /* bad indirect table (nested, size, not negotiated) */
#define VHD_ERR_ORDER -7        /* device-readable after device-writable */
#define VHD_ERR_IOV -8          /* more segments than VHD_MAX_IOV */
#define VHD_ERR_LEN -9          /* chain's total length does not fit 32 bits */
#define VHD_ERR_LAYOUT -10      /* used ring laid over the avail ring or descriptors */
#define VHD_ERR_ID -11          /* packed: buffer id already in flight */
#define VHD_ERR_WRAP -12        /* packed: descriptor marked used in the driver's own lap */
#define VHD_ERR_INFLIGHT -13    /* inflight region inconsistent with the ring */

/* Guest memory: an immutable translation table once handed to workers.
 * Changing memory means building a new table and handing it to the workers
 * between two turns (vhd_task_set_mem), or stopping them when a region goes
 * (see vhostd/memory.py).  Regions are kept sorted by guest-physical
 * address: a lookup is a scan for a few regions, a binary search beyond. */
typedef struct vhd_mem vhd_mem;

vhd_mem *vhd_mem_new(void);
void vhd_mem_free(vhd_mem *mem);
/* Maps size bytes of fd at mmap_offset (the fd may be closed afterwards).
 * Returns 0 or a negative errno; -EINVAL for zero size, overflowing or
 * overlapping ranges, -ERANGE for a range past the end of the fd's file,
 * -ENOSPC when the table is full. */
int vhd_mem_add(vhd_mem *mem, int fd, uint64_t gpa, uint64_t size,
                uint64_t uva, uint64_t mmap_offset);
/* The same for a region the caller mapped (vhd_region_map): hva is the
 * host address of gpa; the table never unmaps it. */
int vhd_mem_add_mapped(vhd_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva, void *hva);
/* Maps [0, mmap_offset + size) of fd shared (mmap_offset need not be page
 * aligned: QEMU sends such offsets); the region starts at the result +
 * mmap_offset.  NULL and *err on failure (-ERANGE: the file is shorter). */
void *vhd_region_map(int fd, uint64_t size, uint64_t mmap_offset, int *err);
uint32_t vhd_mem_count(const vhd_mem *mem);
/* Host address of [addr, addr+len) if it lies inside one region, else NULL. */
void *vhd_mem_gpa_to_hva(const vhd_mem *mem, uint64_t gpa, uint64_t len);
void *vhd_mem_uva_to_hva(const vhd_mem *mem, uint64_t uva, uint64_t len);
/* Splits [gpa, gpa+len) into host iovecs across regions.  Returns the
 * number of iovecs used, -EFAULT if any byte is outside guest memory, or
 * -ENOBUFS if more than max iovecs would be needed. */
int vhd_mem_gpa_to_iov(const vhd_mem *mem, uint64_t gpa, uint64_t len,
                       struct iovec *iov, int max);

/* Virtqueues, split (virtio 1.2 2.7) or packed (2.8): one interface. */
/* Dirty-page log (live migration): a bitmap the front-end shares with
 * SET_LOG_BASE, one bit per 4 KiB guest-physical page.  bits must stay
 * mapped while any ring uses the log. */
typedef struct vhd_log vhd_log;

struct vhd_log_stats {
    uint64_t pages;             /* page bits set (not distinct pages) */
    uint64_t refused;           /* pages past the end of the bitmap: not logged */
};

vhd_log *vhd_log_new(void *bits, uint64_t size);
void vhd_log_free(vhd_log *log);
void vhd_log_stats_get(const vhd_log *log, struct vhd_log_stats *out);
/* Bytes of bitmap that cover guest-physical addresses below gpa_end. */
uint64_t vhd_log_size_for(uint64_t gpa_end);
/* Sets the bits of every page of [gpa, gpa+len). */
void vhd_log_write(vhd_log *log, uint64_t gpa, uint64_t len);
/* Test builds only (VHD_TEST_HOOKS): make the log record nothing, to show
 * that the migration tests detect a broken log.  Returns -1 elsewhere. */
int vhd_log_set_drop(vhd_log *log, int drop);

struct vhd_vring_config {
    uint32_t num;               /* ring size: split a power of two, packed any, <= 32768 */
    uint64_t desc_uva;          /* front-end virtual addresses (SET_VRING_ADDR) */
    uint64_t avail_uva;         /* packed: the driver area (driver event suppression) */
    uint64_t used_uva;          /* packed: the device area (device event suppression) */
    uint16_t last_avail_idx;    /* SET_VRING_BASE; packed: index bits 0-14, wrap counter bit 15 */
    int packed;                 /* VIRTIO_F_RING_PACKED negotiated */
    uint16_t used_base;         /* packed: used index bits 0-14, wrap counter bit 15 (split: in memory) */
    int event_idx;              /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int indirect;               /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    int call_fd;                /* -1: front-end polls, never notify */
    int err_fd;                 /* -1: no error notification */
    int broken_fd;              /* the daemon's eventfd, signalled too when the ring breaks */
    void *inflight;             /* this ring's VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD region, or NULL */
    vhd_log *log;               /* VHOST_F_LOG_ALL: log every write to guest memory, else NULL */
    int log_used;               /* VHOST_VRING_F_LOG: also log used ring writes ... */
    uint64_t log_used_gpa;      /* ... at this guest-physical address (log_guest_addr) */
};

/* Size of one ring's inflight region (split ring layout of vhost-user.rst:
 * a 16-byte header and one 16-byte DescStateSplit per descriptor). */
uint64_t vhd_inflight_queue_size(uint32_t queue_size);
/* The same for a packed ring: a 32-byte header and one 32-byte
 * DescStatePacked per descriptor. */
uint64_t vhd_inflight_queue_size_packed(uint32_t queue_size);
/* Maps size bytes of fd at offset (shared); NULL and *err (-ERANGE: the
 * file is shorter) on failure.  The inflight buffer and the dirty log:
 * they must outlive the rings that use them. */
void *vhd_map_shared(int fd, uint64_t size, uint64_t offset, int *err);
void vhd_unmap(void *addr, uint64_t size);

/* Counters written only by the ring's worker; read racily by the
 * control plane for status (64-bit aligned stores are atomic on x86-64). */
struct vhd_vring_stats {
    uint64_t requests;
    uint64_t bytes_read;        /* from guest memory into the back-end */
    uint64_t bytes_written;     /* from the back-end into guest memory */
    uint64_t errors;            /* requests completed with an error status */
    uint64_t kicks;
    uint64_t calls;
    uint64_t batches;
    int64_t broken;             /* 0 or the VHD_ERR_* that broke the ring */
    uint64_t resubmitted;       /* requests found in flight at setup (inflight region) */
};

struct vhd_chain {
    uint16_t head;              /* split: head descriptor index; packed: buffer id (what push takes) */
    uint16_t n_out;             /* device-readable iovecs, first in iov[] */
    uint16_t n_in;              /* device-writable iovecs, after them */
    uint32_t out_len;
    uint32_t in_len;
    struct iovec iov[1024];
};

typedef struct vhd_vring vhd_vring;

vhd_vring *vhd_vring_new(void);
void vhd_vring_free(vhd_vring *vr);
/* Validates and translates the ring addresses against mem (which must stay
 * alive while the ring is used).  Returns 0 or -EINVAL/-EFAULT.  A used
 * ring laid over the avail ring or the descriptors leaves the ring broken
 * (VHD_ERR_LAYOUT): the device's own writes would feed it work forever. */
int vhd_vring_setup(vhd_vring *vr, const vhd_mem *mem,
                    const struct vhd_vring_config *cfg);
/* The same ring over a new table, which must place it where it was:
 * -EFAULT otherwise, and the ring keeps the old one. */
int vhd_vring_set_mem(vhd_vring *vr, const vhd_mem *mem);
int vhd_vring_pop(vhd_vring *vr, struct vhd_chain *chain);
void vhd_vring_push(vhd_vring *vr, uint16_t head, uint32_t len);
/* Gives back the last n popped chains (not pushed) so they are popped again. */
void vhd_vring_unpop(vhd_vring *vr, uint16_t n);
/* Publishes pushed elements and notifies the front-end if it asked. */
void vhd_vring_flush(vhd_vring *vr);
void vhd_vring_disable_notify(vhd_vring *vr);
/* Re-enables kicks; returns 1 if buffers arrived meanwhile (lost-wake-up check). */
int vhd_vring_enable_notify(vhd_vring *vr);
/* True (and cleared) if the last processing call stopped at its budget. */
int vhd_vring_take_more(vhd_vring *vr);
/* Marks the ring broken with reason and signals err_fd (NEEDS_RESET). */
void vhd_vring_set_broken(vhd_vring *vr, int reason);
/* True if chains wait to be popped: in-flight requests of a previous
 * back-end still to resubmit, or buffers the driver made available. */
int vhd_vring_pending(const vhd_vring *vr);
/* Split: the indexes.  Packed: ring position | wrap counter << 15. */
uint16_t vhd_vring_last_avail_idx(const vhd_vring *vr);
uint16_t vhd_vring_used_idx(const vhd_vring *vr);
/* GET_VRING_BASE: split last_avail_idx; packed last_avail_idx | used_idx << 16. */
uint32_t vhd_vring_base(const vhd_vring *vr);
int vhd_vring_is_packed(const vhd_vring *vr);
const struct vhd_vring_stats *vhd_vring_stats(const vhd_vring *vr);

/* virtio-blk back-end on a file or block device. */
typedef struct vhd_blk vhd_blk;

/* buffered_fd: the same file opened without O_DIRECT when fd has it, for
 * requests whose buffers O_DIRECT refuses; -1 when fd is not O_DIRECT. */
vhd_blk *vhd_blk_new(int fd, int buffered_fd, uint64_t capacity_sectors, int readonly,
                     const char *serial, uint32_t serial_len);
void vhd_blk_free(vhd_blk *blk);

/* DISCARD and WRITE_ZEROES (virtio 1.2 5.2.6.2): how they reach the file. */
#define VHD_BLK_DISCARD_OFF 0        /* not offered: the request is UNSUPP */
#define VHD_BLK_DISCARD_IGNORE 1     /* acknowledged, nothing done (QEMU's discard=ignore) */
#define VHD_BLK_DISCARD_UNMAP 2      /* fallocate(PUNCH_HOLE | KEEP_SIZE) */
#define VHD_BLK_ZEROES_OFF 0
#define VHD_BLK_ZEROES_RANGE 1       /* fallocate(ZERO_RANGE | KEEP_SIZE) */
#define VHD_BLK_ZEROES_PUNCH 2       /* fallocate(PUNCH_HOLE | KEEP_SIZE): reads back zeros */
#define VHD_BLK_MAX_SEG 32           /* segments of one request the device takes */

struct vhd_blk_trim {
    int discard;                     /* VHD_BLK_DISCARD_* */
    int zeroes;                      /* VHD_BLK_ZEROES_*: how WRITE_ZEROES zeroes */
    int may_unmap;                   /* WRITE_ZEROES with the unmap flag may punch a hole */
    uint32_t max_discard_sectors;    /* per segment */
    uint32_t max_discard_seg;        /* <= VHD_BLK_MAX_SEG */
    uint32_t max_zeroes_sectors;
    uint32_t max_zeroes_seg;
};
void vhd_blk_set_trim(vhd_blk *blk, const struct vhd_blk_trim *trim);
/* Online resize: requests past the new end fail from now on, none before it. */
void vhd_blk_set_capacity(vhd_blk *blk, uint64_t capacity_sectors);
uint64_t vhd_blk_capacity(const vhd_blk *blk);
/* CONFIG_WCE: 1 = write-through (a write completes once it is durable:
 * RWF_DSYNC), 0 = write-back (the guest flushes). */
void vhd_blk_set_writethrough(vhd_blk *blk, int writethrough);
/* Handles one popped chain; pushes its used element.  Returns the status. */
int vhd_blk_handle(vhd_blk *blk, vhd_vring *vr, struct vhd_chain *chain);

/* virtio-net back-end for one queue pair: a tap queue fd (or any fd that
 * reads and writes one frame per call, e.g. a datagram socket).  The RX
 * ring's worker reads it, the TX ring's worker writes it. */
typedef struct vhd_net vhd_net;

/* Guest-header gso types a TX frame may use, by negotiated HOST_* features. */
#define VHD_NET_GSO_TCPV4 1
#define VHD_NET_GSO_UDP 2
#define VHD_NET_GSO_TCPV6 4
#define VHD_NET_GSO_ECN 8
#define VHD_NET_GSO_CSUM 16     /* VIRTIO_NET_F_CSUM: NEEDS_CSUM allowed */

struct vhd_net_stats {
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t rx_dropped;    /* frame did not fit the buffers the guest had */
    uint64_t rx_bad_desc;   /* RX chain with readable or too short buffers */
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t tx_dropped;    /* the back-end refused the frame */
    uint64_t tx_bad_hdr;    /* invalid virtio_net_hdr from the guest */
};

/* backend_fd -1 is the null back-end: TX frames are counted and
 * discarded, RX buffers are filled with a generated frame (benchmarks).
 * Returns NULL on allocation failure. */
vhd_net *vhd_net_new(int backend_fd);
/* The frame the null back-end generates (without virtio_net_hdr). */
void vhd_net_set_null_frame(vhd_net *net, const uint8_t *frame, uint32_t len);
void vhd_net_free(vhd_net *net);
/* Only while both rings of the pair are stopped.  hdr_len is 10 or 12.
 * backend_hdr: the back-end's frames carry the virtio_net_hdr (a tap with
 * IFF_VNET_HDR); without it vhostd writes an empty header on RX and strips
 * the guest's on TX, which then may not use any offload (tx_gso is
 * ignored and taken as 0). */
void vhd_net_configure(vhd_net *net, uint32_t hdr_len, int mrg_rxbuf, uint32_t tx_gso, int backend_hdr);
const struct vhd_net_stats *vhd_net_stats(const vhd_net *net);
/* Drains the TX ring into the back-end; returns chains handled. */
int vhd_net_tx(vhd_net *net, vhd_vring *vr);
/* Moves frames from the back-end into the RX ring until one side is empty.
 * Returns VHD_RX_IDLE (back-end empty), VHD_RX_STARVED (guest has no
 * buffers; kicks are enabled), VHD_RX_THROTTLED (a QoS limit: the frames
 * wait in the back-end) or a negative VHD_ERR_* (ring broken). */
int vhd_net_rx(vhd_net *net, vhd_vring *vr);
#define VHD_RX_IDLE 0
#define VHD_RX_STARVED 1
#define VHD_RX_THROTTLED 2      /* a limit holds the frames in the back-end */

/* virtio-blk with io_uring: one per ring, up to depth requests in flight.
 * Completions are signalled on vhd_blk_queue_fd(), which the worker watches. */
typedef struct vhd_blk_queue vhd_blk_queue;

vhd_blk_queue *vhd_blk_queue_new(const vhd_blk *blk, uint32_t depth, int *err);
void vhd_blk_queue_free(vhd_blk_queue *q);
int vhd_blk_queue_fd(const vhd_blk_queue *q);
/* Reaps completions and submits what the ring holds; returns 0 or a ring error. */
int vhd_blk_queue_run(vhd_blk_queue *q, vhd_vring *vr);
/* Requests submitted and not yet completed (read racily, for status). */
uint32_t vhd_blk_queue_inflight(const vhd_blk_queue *q);
/* True if completions are waiting to be reaped (busy-poll). */
int vhd_blk_queue_completions(vhd_blk_queue *q);
/* Reaps the completions that are there, publishes them and returns how
 * many requests are still in flight (a stopping ring, without blocking). */
uint32_t vhd_blk_queue_quiesce(vhd_blk_queue *q, vhd_vring *vr);

/* virtio-net control virtqueue, when the front-end hands it over. */
typedef struct vhd_net_ctrl vhd_net_ctrl;

struct vhd_net_ctrl_state {
    uint16_t active_pairs;      /* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET */
    uint32_t generation;        /* bumped when active_pairs is set */
    uint32_t rx_mode;           /* bit n: VIRTIO_NET_CTRL_RX command n is on */
    uint8_t mac[6];             /* VIRTIO_NET_CTRL_MAC_ADDR_SET */
    uint8_t mac_set;
};

vhd_net_ctrl *vhd_net_ctrl_new(uint16_t max_pairs);
void vhd_net_ctrl_free(vhd_net_ctrl *c);
const struct vhd_net_ctrl_state *vhd_net_ctrl_state(const vhd_net_ctrl *c);
int vhd_net_ctrl_run(vhd_net_ctrl *c, vhd_vring *vr);

/* Device kinds a worker can run; the device object is passed as void *. */
#define VHD_DEV_BLK 1
#define VHD_DEV_BLK_URING 4
#define VHD_DEV_NET_CTRL 5
#define VHD_DEV_NET_RX 2
#define VHD_DEV_NET_TX 3

/* The ring scheduler (sched.c): a fixed set of worker threads, each serving
 * many rings from one epoll (kick eventfds, back-end fds, a command
 * eventfd).  A ring runs as a task on one worker; which worker is the
 * caller's policy.  Workers never enter Python or take the GIL. */
typedef struct vhd_sched vhd_sched;
typedef struct vhd_task vhd_task;

#define VHD_MAX_WORKERS 1024
/* vhd_task_attach's worker for a back-end that blocks (the synchronous blk
 * engine): a thread of its own, ended when the ring detaches. */
#define VHD_WORKER_EXCLUSIVE -2

/* Counters of one worker, written by it, read racily for status. */
struct vhd_worker_stats {
    uint64_t wakeups;           /* returns from epoll_wait */
    uint64_t runs;              /* ring turns (one budget each) */
    uint64_t polls;             /* busy-poll rounds */
    uint32_t rings;             /* rings attached */
};

/* nworkers threads; worker i pinned to cpus[i % ncpus] (ncpus 0: unpinned).
 * Returns NULL and sets *err (negative errno) on failure. */
vhd_sched *vhd_sched_new(uint32_t nworkers, const int *cpus, uint32_t ncpus, int *err);
/* Every task must have been detached. */
void vhd_sched_free(vhd_sched *s);
uint32_t vhd_sched_nworkers(const vhd_sched *s);
const struct vhd_worker_stats *vhd_sched_worker_stats(const vhd_sched *s, uint32_t worker);

/* Starts serving vr on worker (an index, or VHD_WORKER_EXCLUSIVE): epoll on
 * kick_fd (-1: the front-end wants the ring polled) and, for net RX and
 * io_uring blk, backend_fd.  poll_ns: busy-poll this long after work
 * (0: never).  Does not wait for the worker; returns NULL and sets *err if
 * an fd cannot be watched. */
vhd_task *vhd_task_attach(vhd_sched *s, int worker, vhd_vring *vr, int dev_kind, void *dev,
                          int kick_fd, int backend_fd, uint64_t poll_ns, int *err);
/* Waits until the worker has let go of the ring: the current turn ends,
 * io_uring requests in flight complete and are published.  Then frees t;
 * the ring and device are the caller's again. */
void vhd_task_detach(vhd_task *t);
/* Runs fn(t, arg) on the ring's worker between two turns and waits for it. */
void vhd_task_call(vhd_task *t, void (*fn)(vhd_task *t, void *arg), void *arg);
/* Hands a running ring a new memory table (a region was added) between two
 * turns; -EFAULT if the ring itself no longer translates to where it was
 * (then stop and set it up again).  The old table may be freed after. */
int vhd_task_set_mem(vhd_task *t, const vhd_mem *mem);
vhd_vring *vhd_task_vring(const vhd_task *t);
int vhd_task_worker(const vhd_task *t);

/* Per-device QoS (qos.c): token buckets with QEMU's throttle semantics,
 * one set per device or per group of devices, shared by all their rings.
 * A ring with a gate stops popping while a bucket that counts its requests
 * is over (the request waits in the ring) and its worker sleeps on a timer
 * until the bucket allows the next one.  A ring without a gate is unlimited. */
typedef struct vhd_qos vhd_qos;
typedef struct vhd_qos_gate vhd_qos_gate;

#define VHD_QOS_READ 1          /* blk reads; net RX (frames into the guest) */
#define VHD_QOS_WRITE 2         /* blk writes; net TX (frames from the guest) */
#define VHD_QOS_BYTES 0
#define VHD_QOS_OPS 1
#define VHD_QOS_OPS_SHIFT 16    /* an op cost is in 1/65536 ops (size_iops_sec makes fractions) */
#define VHD_QOS_MAX_LIMITS 6
#define VHD_QOS_MAX_RATE 1000000000000   /* units per second */
#define VHD_QOS_MAX_LENGTH 86400         /* seconds */

struct vhd_qos_limit {
    uint32_t classes;           /* VHD_QOS_READ | VHD_QOS_WRITE: what it counts */
    uint32_t unit;              /* VHD_QOS_BYTES or VHD_QOS_OPS */
    uint64_t avg;               /* units per second; 0: off */
    uint64_t max;               /* burst rate (>= avg); 0: no burst beyond avg/10 */
    uint64_t max_length;        /* seconds max may last (QEMU: bucket max * max_length); 0: 1 */
};

/* 0, or -EINVAL / -ERANGE for a limit vhd_qos_new refuses. */
int vhd_qos_check_limit(const struct vhd_qos_limit *l);
/* The buckets of n limits (those with avg 0 are left out); op_size: QEMU's
 * iops_size (size_iops_sec), 0 for none.  prev: the buckets these replace,
 * whose use carries over (a changed limit gives no fresh burst).  NULL and
 * *err on failure. */
vhd_qos *vhd_qos_new(const struct vhd_qos_limit *limits, uint32_t n, uint64_t op_size,
                     const vhd_qos *prev, int *err);
/* Only once no gate uses it (vhd_task_set_qos returned for every ring). */
void vhd_qos_free(vhd_qos *q);
/* 1 if a request of these classes may go now; else 0 and *until_ns, the
 * clock value from which it may.  Pure arithmetic on the given time. */
int vhd_qos_admit(const vhd_qos *q, uint32_t classes, uint64_t now_ns, uint64_t *until_ns);
/* Counts a request (or a batch) of class cls: bytes, and ops in 1/65536. */
void vhd_qos_charge(vhd_qos *q, uint32_t cls, uint64_t bytes, uint64_t ops, uint64_t now_ns);
/* One request of this size in 1/65536 ops (size_iops_sec). */
uint64_t vhd_qos_op_cost(const vhd_qos *q, uint64_t bytes);
/* CLOCK_MONOTONIC in ns, or the fake clock of a test build. */
uint64_t vhd_qos_clock(void);
/* Test builds only: vhd_qos_clock() returns ns from now on (0: the real
 * clock again).  Returns -1 elsewhere. */
int vhd_qos_set_fake_clock(uint64_t ns);

/* Per ring: what it counted, throttled time (ns, and since when if it is
 * throttled now: add now - throttled_since).  Written by its worker only. */
struct vhd_qos_gate_stats {
    uint64_t throttles;         /* times the ring stopped popping for a limit */
    uint64_t throttled_ns;
    uint64_t throttled_since;   /* vhd_qos_clock() value, 0: not throttled */
};

/* classes: what the ring's requests are (blk: both, net TX: WRITE, RX:
 * READ); leasing: let several requests through per look at the buckets,
 * as many as a quarter of their room allows (net; blk looks every time:
 * its request sizes vary too much, and a request costs microseconds). */
vhd_qos_gate *vhd_qos_gate_new(uint32_t classes, int leasing);
void vhd_qos_gate_free(vhd_qos_gate *g);
void vhd_qos_gate_stats(const vhd_qos_gate *g, struct vhd_qos_gate_stats *out);
/* Requests the gate lets through now before it looks at the buckets again. */
uint32_t vhd_qos_gate_lease(const vhd_qos_gate *g);
/* A stopped ring: limit it by q through gate g (q NULL: unlimited). */
void vhd_vring_set_qos(vhd_vring *vr, vhd_qos_gate *g, vhd_qos *q);
/* The same for a running ring, between two turns of its worker. */
void vhd_task_set_qos(vhd_task *t, vhd_qos_gate *g, vhd_qos *q);

/* The in-process sandbox (sandbox.c): with it on, every worker thread drops
 * its capabilities and runs under a seccomp allow-list from its first
 * instruction; a syscall outside the list kills the process (SIGSYS).
 * vhd_sandbox_enable() tries the filter on a probe thread first and turns
 * it on for workers started afterwards: 0 or a negative errno. */
int vhd_sandbox_enable(void);
int vhd_sandbox_enabled(void);
void vhd_sandbox_thread_start(void);
uint32_t vhd_sandbox_threads(void);
int vhd_sandbox_syscall_count(void);
/* The calling thread keeps only the capabilities in keep (bit n: capability
 * n), bounding set included, and sets no_new_privs: 0 or a negative errno. */
int vhd_sandbox_drop_caps(uint64_t keep);
uint64_t vhd_sandbox_caps(void);
/* Test builds only: vhd_task_call() target that makes syscall *(long *)arg. */
void vhd_sandbox_test_syscall(vhd_task *t, void *arg);

/* Processes everything available on vr once, synchronously (tests, and the
 * worker's loop body).  Returns the number of chains handled. */
int vhd_process_ring(vhd_vring *vr, int dev_kind, void *dev);
