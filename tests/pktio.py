"""Send or capture raw Ethernet frames on an interface (AF_PACKET).

Run inside a test's network namespace (`ip netns exec NS python pktio.py ...`):
  pktio.py send IFACE HEX [COUNT]        send the frame COUNT times
  pktio.py capture IFACE SECONDS [ETHERTYPE]
      print each frame received on IFACE (hex, one per line) for SECONDS,
      only those with the given ethertype (hex, e.g. 8035) if one is given.
A frame vhostd writes into its tap is *received* on the tap interface; a
frame sent on the tap interface is what vhostd reads from it.
"""

from __future__ import annotations

import socket
import sys
import time

ETH_P_ALL = 0x0003


def main(argv: list[str]) -> int:
    mode, iface = argv[1], argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    if mode == "send":
        frame = bytes.fromhex(argv[3])
        for _ in range(int(argv[4]) if len(argv) > 4 else 1):
            s.send(frame)
        return 0
    deadline = time.monotonic() + float(argv[3])
    want = int(argv[4], 16) if len(argv) > 4 else None
    print("READY", flush=True)
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(65536)
        except TimeoutError:
            break
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        if want is None or int.from_bytes(data[12:14], "big") == want:
            print(data.hex(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
