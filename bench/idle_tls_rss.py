"""Idle-connection RSS of a running gateway, plain or TLS (BENCHMARKS.md).

Usage: python3 idle_tls_rss.py GATEWAY_PID PORT COUNT plain|tls
Connects COUNT service clients (config [[services]] meas / measure-password-1,
keep alive 0) and prints the gateway's VmRSS growth per connection. For tls,
the CA of the gateway's certificate is read from /tmp/tlsmeas/ca.pem.
"""
import socket, ssl, struct, sys, time
pid, port, n, use_tls = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "tls"
def rss(): 
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
def s(b): return struct.pack(">H", len(b)) + b
def connect_pkt(cid):
    vh = s(b"MQTT") + bytes([4, 0xC2, 0, 0])
    pl = s(cid.encode()) + s(b"meas") + s(b"measure-password-1")
    body = vh + pl
    rl = len(body); enc = b""
    while True:
        d = rl % 128; rl //= 128
        enc += bytes([d | (0x80 if rl else 0)])
        if not rl: break
    return b"\x10" + enc + body
ctx = ssl.create_default_context(cafile="/tmp/tlsmeas/ca.pem")
before = rss(); conns = []
for i in range(n):
    raw = socket.create_connection(("127.0.0.1", port))
    c = ctx.wrap_socket(raw, server_hostname="localhost") if use_tls else raw
    c.sendall(connect_pkt(f"meas-{sys.argv[4]}-{i}"))
    ack = c.recv(4)
    assert ack[:1] == b"\x20" and ack[3:4] == b"\x00", ack
    conns.append(c)
time.sleep(2)
after = rss()
print(f"{sys.argv[4]}: {n} idle connections: RSS {before} kB -> {after} kB, {(after-before)*1024/n:.0f} B per connection")
