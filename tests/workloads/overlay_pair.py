"""Two parts of one job on two nodes, talking over the job's overlay.  argv: ROLE PORT CONTROL.
Both print PID, HOST (their host name) and ADDR (their overlay address, hpccr0's).

server (slot 0): listens on PORT, prints READY, answers each line N of its one client with
"N <its host name>", and on "end" prints PASS and exits.
client (slot 1): connects to the host name of slot 0 (<job>-0), prints READY, then sends
1, 2, 3, … each after the last answer, checks every answer (the count it sent and the same
server host name), prints COUNT N HOST ADDR (its own) every 20; once the file CONTROL/stop
exists it sends "end" and prints PASS."""

import fcntl
import os
import socket
import struct
import sys
import time

SIOCGIFADDR = 0x8915


def overlay_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", b"hpccr0")
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port))
    print("READY", flush=True)
    conn, _ = listener.accept()
    with conn, conn.makefile("rw") as peer:
        for line in peer:
            if line.strip() == "end":
                break
            peer.write(f"{int(line)} {socket.gethostname()}\n")
            peer.flush()
    print("PASS", flush=True)


def ask(port: int, control: str) -> None:
    server = socket.gethostname().rpartition("-")[0] + "-0"
    with socket.create_connection((server, port)) as conn, conn.makefile("rw") as peer:
        print("READY", flush=True)
        count = 0
        while not os.path.exists(os.path.join(control, "stop")):
            count += 1
            peer.write(f"{count}\n")
            peer.flush()
            answer = peer.readline()
            if answer != f"{count} {server}\n":
                print(f"FAIL sent {count}, got {answer!r}", flush=True)
                return
            if count % 20 == 0:
                print(f"COUNT {count} {socket.gethostname()} {overlay_address()}", flush=True)
            time.sleep(0.005)
        peer.write("end\n")
        peer.flush()
    print("PASS", flush=True)


def main() -> None:
    role, port, control = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(f"PID {os.getpid()}\nHOST {socket.gethostname()}\nADDR {overlay_address()}",
          flush=True)
    serve(port) if role == "server" else ask(port, control)


main()
