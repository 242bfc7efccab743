/* tapbound: how fast one CPU can push frames through a tap, without any vhost.
 *
 *   tapbound write  IFNAME SECONDS [SIZE]   create tap IFNAME (IFF_TAP|IFF_NO_PI, no virtio-net
 *                                           header) and write() frames into it
 *   tapbound read   IFNAME SECONDS          create tap IFNAME as `write` does and read() it into
 *                                           one cache-hot buffer until SECONDS pass
 *   tapbound inject IFNAME SECONDS [SIZE]   send frames out of an existing interface IFNAME
 *                                           through AF_PACKET (sendmmsg, qdisc bypassed)
 *   tapbound inject-gso IFNAME SECONDS [SIZE]
 *                                           the same frames as UDP/IPv4 datagrams, 64 per send:
 *                                           one UDP GSO packet that the kernel segments on its
 *                                           way into IFNAME (needs IFNAME without USO offload,
 *                                           true of every tap vhostd or DPDK opens)
 *
 * `write` is the ceiling of any vhost-user net back-end's guest-TX path that writes one frame
 * per syscall into a tap: one write per frame, nothing else.  The tap has no IFF_VNET_HDR, as
 * both back-ends open it when the front-end (DPDK's virtio-user) negotiates no offload: DPDK's
 * net_tap never uses the header, vhostd drops it then (a header costs ~0.2 us per read).  `read` is the matching ceiling of guest RX: one read per frame and nothing
 * else (no guest memory, no ring); frames= counts what it read, and its cpu= divided by that
 * is the kernel's price per frame (it spins on an empty tap, so cpu is ~seconds).  `inject` feeds a tap from the host side for guest-RX benchmarks.  Both run
 * flat out for SECONDS and print one line: "frames=N errors=E seconds=S fps=F cpu=C" (fps =
 * frames the kernel took per second, C = CPU seconds used).  inject: each error is one frame
 * a full tap queue refused (the back-end reading the tap is slower than us) and then offered
 * again, so frames+errors is what was offered; no errors means the injector, not the
 * back-end, set the pace.  inject-gso costs the sender a fraction of a syscall per frame, so
 * it outruns any single-core reader: frames the tap could not queue are not errors here but
 * the tap's tx_dropped counter.
 *
 * Run it inside the network namespace that should hold the tap, pinned with taskset. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 9018
#define BATCH 64
/* Check the clock every this many frames: clock_gettime must not weigh on the loop. */
#define CLOCK_EVERY 1024

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* A frame nobody in the namespace answers or routes: locally administered MACs and the
 * IEEE "local experimental" EtherType 0x88b5; the rest is zeros. */
static void fill_frame(uint8_t *f, size_t size)
{
    static const uint8_t dst[6] = { 0x02, 0, 0, 0, 0, 0x02 };
    static const uint8_t src[6] = { 0x02, 0, 0, 0, 0, 0x01 };
    memset(f, 0, size);
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x88;
    f[13] = 0xb5;
}

static void set_up(const char *ifname)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr = { 0 };
    if (s < 0)
        die("socket");
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        die("SIOCSIFFLAGS");
    close(s);
}

static int open_tap(const char *ifname)
{
    int fd = open("/dev/net/tun", O_RDWR);
    struct ifreq ifr = { 0 };
    if (fd < 0)
        die("/dev/net/tun");
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    /* A tap that is down drops what is written to it before counting it. */
    set_up(ifname);
    return fd;
}

/* cpu= (user+system seconds of this process) gives the cost per frame even when the CPU
 * was shared with something else and fps came out low. */
static void report(unsigned long long frames, unsigned long long errors, double seconds)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    printf("frames=%llu errors=%llu seconds=%.6f fps=%.0f cpu=%.6f\n", frames, errors, seconds,
           (double)frames / seconds, cpu);
}

/* One write (or read) of buf per call on fd for SECONDS, then the report and close: the
 * whole of the write and read bounds.  A call that moves nothing is an error (write: the
 * tap refused the frame) or an empty poll (read). */
static void spin(int fd, bool writing, uint8_t *buf, size_t len, double seconds)
{
    unsigned long long frames = 0, misses = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < CLOCK_EVERY; i++) {
            ssize_t r = writing ? write(fd, buf, len) : read(fd, buf, len);
            if (r > 0)
                frames++;
            else
                misses++;
        }
        t = now();
    }
    report(frames, misses, t - start);
    close(fd);
}

static void run_write(const char *ifname, double seconds, size_t size)
{
    int fd = open_tap(ifname);
    static uint8_t frame[MAX_FRAME];
    fill_frame(frame, size);
    spin(fd, true, frame, size, seconds);
}

static void run_read(const char *ifname, double seconds)
{
    int fd = open_tap(ifname);
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        die("O_NONBLOCK");
    static uint8_t buf[65536] __attribute__((aligned(64)));
    spin(fd, false, buf, sizeof(buf), seconds);
}

/* A send-only AF_PACKET socket bound to ifname, with the SOL_PACKET option `option` on. */
static int packet_socket(const char *ifname, uint16_t ethertype, int option)
{
    int s = socket(AF_PACKET, SOCK_RAW, 0);   /* protocol 0: send only, receive nothing */
    if (s < 0)
        die("socket(AF_PACKET)");
    int one = 1;
    if (setsockopt(s, SOL_PACKET, option, &one, sizeof(one)) < 0)
        die("setsockopt(SOL_PACKET)");
    struct ifreq ifr = { 0 };
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0)
        die("SIOCGIFINDEX");
    struct sockaddr_ll addr = { .sll_family = AF_PACKET, .sll_ifindex = ifr.ifr_ifindex,
                                .sll_protocol = htons(ethertype), .sll_halen = 6 };
    if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("bind");
    return s;
}

static void run_inject(const char *ifname, double seconds, size_t size)
{
    /* Straight to the driver: the qdisc would only add a lock and a queue to the path. */
    int s = packet_socket(ifname, 0x88b5, PACKET_QDISC_BYPASS);
    static uint8_t frame[MAX_FRAME];
    fill_frame(frame, size);
    struct iovec iov = { frame, size };
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long frames = 0, errors = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < CLOCK_EVERY / BATCH; i++) {
            /* On a refused frame sendmmsg stops: it returns the count before it, or -1 if it
             * was the first; the rest of the batch goes again in the next call. */
            int n = sendmmsg(s, msgs, BATCH, 0);
            if (n < 0) {
                /* ENOBUFS: the tap's queue is full, the back-end is behind.  Go on. */
                if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR)
                    die("sendmmsg");
                errors++;
            } else {
                frames += (unsigned long long)n;
                errors += n < BATCH;
            }
        }
        t = now();
    }
    report(frames, errors, t - start);
    close(s);
}

#define GSO_SEGMENTS 64          /* the kernel's UDP_MAX_SEGMENTS on 5.x */
#define UDP_GSO_TYPE 5           /* VIRTIO_NET_HDR_GSO_UDP_L4 (not in older uapi headers) */
#define FRAME_HDRS (ETH_HLEN + 20 + 8)

static uint16_t ip_checksum(const uint8_t *h, size_t len)
{
    uint32_t sum = 0;
    for (size_t i = 0; i < len; i += 2)
        sum += (uint32_t)(h[i] << 8 | h[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* [virtio_net_hdr][Ethernet][IPv4][UDP][segments x payload]: a datagram of `segs` payloads
 * of size - FRAME_HDRS bytes each, which the kernel cuts into `segs` frames of `size`. */
static size_t build_gso_packet(uint8_t *pkt, size_t size, unsigned segs)
{
    struct virtio_net_hdr *h = (struct virtio_net_hdr *)pkt;
    uint8_t *f = pkt + sizeof(*h);
    size_t payload = size - FRAME_HDRS, ip_len = 20 + 8 + payload * segs;
    fill_frame(f, FRAME_HDRS);
    f[12] = 0x08;                      /* IPv4 */
    f[13] = 0x00;
    uint8_t *ip = f + ETH_HLEN, *udp = ip + 20;
    ip[0] = 0x45;
    ip[2] = (uint8_t)(ip_len >> 8);
    ip[3] = (uint8_t)ip_len;
    ip[8] = 64;                        /* TTL */
    ip[9] = 17;                        /* UDP */
    memcpy(ip + 12, (uint8_t[]){ 198, 18, 0, 1, 198, 18, 0, 2 }, 8);   /* RFC 2544 range */
    uint16_t c = ip_checksum(ip, 20);
    ip[10] = (uint8_t)(c >> 8);
    ip[11] = (uint8_t)c;
    udp[0] = 0x30, udp[1] = 0x39, udp[2] = 0x30, udp[3] = 0x3a;   /* ports 12345 -> 12346 */
    udp[4] = (uint8_t)((8 + payload * segs) >> 8);
    udp[5] = (uint8_t)(8 + payload * segs);
    /* The checksum is the kernel's to finish per segment (NEEDS_CSUM); the tap either takes
     * it partial (TUN_F_CSUM) or has the kernel complete it. */
    *h = (struct virtio_net_hdr){ .flags = VIRTIO_NET_HDR_F_NEEDS_CSUM, .gso_type = UDP_GSO_TYPE,
                                  .hdr_len = FRAME_HDRS, .gso_size = (uint16_t)payload,
                                  .csum_start = ETH_HLEN + 20, .csum_offset = 6 };
    return sizeof(*h) + ETH_HLEN + ip_len;
}

static void run_inject_gso(const char *ifname, double seconds, size_t size)
{
    if (size <= FRAME_HDRS) {
        fprintf(stderr, "inject-gso: SIZE must exceed %d (Ethernet + IPv4 + UDP)\n", FRAME_HDRS);
        exit(2);
    }
    unsigned segs = GSO_SEGMENTS;
    while ((size - FRAME_HDRS) * segs + 28 > 65535)
        segs--;
    /* No PACKET_QDISC_BYPASS: the direct path refuses GSO packets the device cannot take,
     * where the normal path segments them. */
    int s = packet_socket(ifname, ETH_P_IP, PACKET_VNET_HDR);
    static uint8_t pkt[sizeof(struct virtio_net_hdr) + 65536];
    size_t len = build_gso_packet(pkt, size, segs);
    unsigned long long frames = 0, errors = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < CLOCK_EVERY / GSO_SEGMENTS; i++) {
            if (send(s, pkt, len, 0) < 0) {
                if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR)
                    die("send");
                errors += segs;
            } else {
                frames += segs;
            }
        }
        t = now();
    }
    report(frames, errors, t - start);
    close(s);
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s write|read|inject|inject-gso IFNAME SECONDS [SIZE]\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[3]);
    long size = argc == 5 ? atol(argv[4]) : 64;
    if (seconds <= 0 || size < ETH_HLEN || size > MAX_FRAME) {
        fprintf(stderr, "%s: bad SECONDS or SIZE (%d..%d)\n", argv[0], ETH_HLEN, MAX_FRAME);
        return 2;
    }
    /* Line-buffered even into a pipe: the one result line must not sit in a buffer. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(argv[1], "write") == 0)
        run_write(argv[2], seconds, (size_t)size);
    else if (strcmp(argv[1], "read") == 0)
        run_read(argv[2], seconds);
    else if (strcmp(argv[1], "inject") == 0)
        run_inject(argv[2], seconds, (size_t)size);
    else if (strcmp(argv[1], "inject-gso") == 0)
        run_inject_gso(argv[2], seconds, (size_t)size);
    else {
        fprintf(stderr, "%s: unknown mode %s\n", argv[0], argv[1]);
        return 2;
    }
    return 0;
}
