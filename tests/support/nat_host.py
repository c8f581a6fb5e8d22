#!/usr/bin/env python3
"""Host-side peers for the user-mode NAT end-to-end test, all on 127.0.0.1.

- TCP 12345 sends FILE to each client, then closes (guest downloads through 10.0.2.2);
- TCP 12346 receives until EOF and writes the data's sha256 to OUT/upload.sha;
- HTTP 8000 serves OUT (guest runs wget);
- UDP 5353 answers every DNS A query with 10.1.2.3 (the NAT's configured DNS upstream);
- connects to 127.0.0.1:5555 (the hostfwd) until the guest's service answers, and
  writes what it said to OUT/hostfwd.txt.

Runs until it is killed, or for at most 600 s.
"""

import hashlib
import http.server
import os
import socket
import socketserver
import struct
import sys
import threading
import time

FILE, OUT = sys.argv[1], sys.argv[2]


def serve_download():
    with open(FILE, "rb") as f:
        data = f.read()
    srv = socket.create_server(("127.0.0.1", 12345))
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(data)


def serve_upload():
    srv = socket.create_server(("127.0.0.1", 12346))
    while True:
        conn, _ = srv.accept()
        h, n = hashlib.sha256(), 0
        with conn:
            while chunk := conn.recv(65536):
                h.update(chunk)
                n += len(chunk)
        with open(os.path.join(OUT, "upload.sha"), "w") as f:
            f.write(f"{h.hexdigest()} {n}\n")


def serve_dns():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 5353))
    while True:
        query, peer = sock.recvfrom(2048)
        if len(query) < 12:
            continue
        qid = query[:2]
        end = 12
        while end < len(query) and query[end] != 0:
            end += query[end] + 1
        question = query[12:end + 5]
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("10.1.2.3")
        header = qid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
        sock.sendto(header + question + answer, peer)


def probe_hostfwd():
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 5555), timeout=5) as c:
                data = c.recv(4096)
                if data:
                    with open(os.path.join(OUT, "hostfwd.txt"), "wb") as f:
                        f.write(data)
                    return
        except OSError:
            pass
        time.sleep(1)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=OUT, **kw)

    def log_message(self, *a):
        pass


def serve_http():
    socketserver.TCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", 8000), QuietHandler) as httpd:
        httpd.serve_forever()


for target in (serve_download, serve_upload, serve_dns, serve_http, probe_hostfwd):
    threading.Thread(target=target, daemon=True).start()
time.sleep(600)
