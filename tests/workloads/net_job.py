"""A job's view of its own network: prints PID, HOST (its host name), ADDR (its eth0 address),
RESOLVED (what its host name resolves to), connects to the test's server at argv[1]:argv[2]
(outside the job, on the node) and says "hello", then listens on TCP port argv[3] and prints
READY.  It serves one client: each line it gets is answered with "<count> <host> <address>";
the line "end" makes it print PASS and exit."""

import fcntl
import os
import socket
import struct
import sys

SIOCGIFADDR = 0x8915


def eth0_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", b"eth0")
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])


def main() -> None:
    node, node_port, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    host, address = socket.gethostname(), eth0_address()
    print(f"PID {os.getpid()}\nHOST {host}\nADDR {address}\n"
          f"RESOLVED {socket.gethostbyname(host)}", flush=True)
    with socket.create_connection((node, node_port)) as out:
        out.sendall(b"hello\n")
    listener = socket.socket()
    listener.bind(("0.0.0.0", port))
    listener.listen(1)
    print("READY", flush=True)
    conn, _ = listener.accept()
    count = 0
    with conn, conn.makefile("rw") as peer:
        for line in peer:
            if line.strip() == "end":
                break
            count += 1
            peer.write(f"{count} {socket.gethostname()} {eth0_address()}\n")
            peer.flush()
    print("PASS", flush=True)


main()
