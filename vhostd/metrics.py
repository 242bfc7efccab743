"""Prometheus metrics (`metrics_listen` / `--metrics-listen`): the same
counters as `vhostd status`, labelled by device and queue.

The exposition is produced by prometheus-client from a custom collector;
the HTTP endpoint is a small trio server, so collection runs on the event
loop and never races the control plane's data structures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

StatusFn = Callable[[], dict[str, Any]]

RING_COUNTERS = {
    "requests": "Requests (blk) or frames (net) completed",
    "bytes_read": "Bytes moved from guest memory to the back-end",
    "bytes_written": "Bytes moved from the back-end into guest memory",
    "errors": "Requests completed with an error status",
    "kicks": "Notifications received from the front-end",
    "calls": "Notifications sent to the front-end",
}
NET_COUNTERS = ("rx_frames", "rx_bytes", "rx_dropped", "rx_bad_desc",
                "tx_frames", "tx_bytes", "tx_dropped", "tx_bad_hdr")


class StatusCollector:
    def __init__(self, status: StatusFn) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        connected = GaugeMetricFamily("vhostd_device_frontend_connected",
                                      "1 if a front-end is attached", labels=["device", "type"])
        failed = GaugeMetricFamily("vhostd_device_failed", "1 for a configured device that is not running",
                                   labels=["device"])
        broken = GaugeMetricFamily("vhostd_ring_broken", "1 if the guest broke the ring (needs reset)",
                                   labels=["device", "queue"])
        rings = {k: CounterMetricFamily(f"vhostd_ring_{k}", v, labels=["device", "queue"])
                 for k, v in RING_COUNTERS.items()}
        net = {k: CounterMetricFamily(f"vhostd_net_{k}", f"virtio-net {k.replace('_', ' ')}",
                                      labels=["device", "pair"]) for k in NET_COUNTERS}
        log_on = GaugeMetricFamily("vhostd_dirty_log_enabled",
                                   "1 while the front-end has dirty-page logging on (live migration)",
                                   labels=["device"])
        log_pages = CounterMetricFamily("vhostd_dirty_log_pages", "Page bits set in the dirty log "
                                        "(this front-end connection)", labels=["device"])
        log_refused = CounterMetricFamily("vhostd_dirty_log_refused", "Pages not logged: past the end of "
                                          "the front-end's log (its error)", labels=["device"])
        qos_limit = GaugeMetricFamily("vhostd_qos_limit", "A QoS limit in force (libvirt iotune names; "
                                      "per second, or seconds for *_max_length)", labels=["device", "limit"])
        qos_throttled = CounterMetricFamily("vhostd_qos_throttled_seconds", "Ring-seconds a QoS limit held "
                                            "requests back (rings of a device add up)", labels=["device"])
        qos_throttles = CounterMetricFamily("vhostd_qos_throttles", "Times a ring stopped for a QoS limit",
                                            labels=["device"])
        qos_rate = GaugeMetricFamily("vhostd_qos_rate", "Current rate over the last second (iops, "
                                     "read_bytes, write_bytes; net tx/rx packets and bytes)",
                                     labels=["device", "what"])
        for dev in st["devices"]:
            name = dev["name"]
            if (q := dev.get("qos")) is not None:
                for k, v in q["limits"].items():
                    if k != "group":
                        qos_limit.add_metric([name, k], float(v))
                qos_throttled.add_metric([name], q["throttled_seconds"])
                qos_throttles.add_metric([name], q["throttles"])
                for k, v in q.get("rates", {}).items():
                    qos_rate.add_metric([name, k], v)
            connected.add_metric([name, dev["type"]], 1.0 if dev["frontend"] else 0.0)
            if (log := dev.get("dirty_log")) is not None:
                log_on.add_metric([name], 1.0 if log["enabled"] else 0.0)
                log_pages.add_metric([name], log["pages"])
                log_refused.add_metric([name], log["refused"])
            for ring in dev.get("rings", []):
                labels = [name, str(ring["index"])]
                for k, fam in rings.items():
                    fam.add_metric(labels, ring[k])
                broken.add_metric(labels, 1.0 if ring["broken"] else 0.0)
            for i, pair in enumerate(dev.get("device", {}).get("queue_pairs", [])):
                for k, fam in net.items():
                    fam.add_metric([name, str(i)], pair[k])
        for name in st.get("failed", {}):
            failed.add_metric([name], 1.0)
        yield connected
        yield failed
        yield broken
        yield from rings.values()
        yield from net.values()
        yield from (log_on, log_pages, log_refused)
        yield from (qos_limit, qos_throttled, qos_throttles, qos_rate)


def exposition(status: StatusFn) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return bytes(generate_latest(registry))


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """Opens the endpoint; raises OSError, for the daemon to report."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve(listeners: list[trio.SocketListener], status: StatusFn) -> None:
    await trio.serve_listeners(lambda stream: _handle(stream, status), listeners)


async def _handle(stream: Any, status: StatusFn) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < 8192:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
            body, head = exposition(status), b"200 OK\r\nContent-Type: text/plain; version=0.0.4"
        else:
            body, head = b"not found\n", b"404 Not Found\r\nContent-Type: text/plain"
        await stream.send_all(b"HTTP/1.1 " + head + b"\r\nContent-Length: " + str(len(body)).encode()
                              + b"\r\nConnection: close\r\n\r\n" + body)
