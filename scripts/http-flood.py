#!/usr/bin/env python3
"""Opens many silent TCP connections to a `ferry serve` HTTP port and, meanwhile, checks that
MQTT still connects and publishes and what `GET /health` answers.

    scripts/http-flood.py HTTP_PORT MQTT_PORT [--total 20000] [--sources 1] [--procs 2]

The connections come from `--sources` loopback addresses (127.0.1.1, 127.0.1.2, ...) and are
held by `--procs` processes (each has its own open-file limit). /health is asked from
127.0.0.2, an address the flood does not use, and from 127.0.1.1, one it does.
"""

import argparse
import multiprocessing as mp
import resource
import socket
import time


def hold(port, count, sources, first, ready, done):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failed = [], 0
    for i in range(count):
        src = f"127.0.1.{1 + (first + i) % sources}"
        s = socket.socket()
        try:
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    time.sleep(1.0)
    # Which ones has the server closed (refused: a 503 and EOF)?
    closed = refused_503 = 0
    for s in socks:
        try:
            data = s.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # open and silent
        except OSError:
            data = b""
        closed += 1
        if data.startswith(b"HTTP/1.1 503"):
            refused_503 += 1
    ready.put((len(socks), failed, closed, refused_503))
    done.wait()
    for s in socks:
        s.close()


def health(port, src):
    s = socket.socket()
    try:
        s.settimeout(5)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        line = data.split(b"\r\n", 1)[0].decode() or "closed without an answer"
        body = data.split(b"\r\n\r\n", 1)[-1][:90].decode(errors="replace")
        return f"{line} {body}"
    except OSError as e:
        return f"error: {e}"
    finally:
        s.close()


def mqtt(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 2]) + b"fl")
        connack = s.recv(4)
        s.sendall(bytes([0x32, 7, 0, 1]) + b"t" + bytes([0, 1]) + b"hi")
        puback = s.recv(4)
        ok = connack == bytes([0x20, 2, 0, 0]) and puback == bytes([0x40, 2, 0, 1])
        return "connected and published (CONNACK 0, PUBACK)" if ok else f"{connack!r} {puback!r}"
    except OSError as e:
        return f"error: {e}"
    finally:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("http", type=int)
    p.add_argument("mqtt", type=int)
    p.add_argument("--total", type=int, default=20000)
    p.add_argument("--sources", type=int, default=1)
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args()
    ready, done = mp.Queue(), mp.Event()
    per = a.total // a.procs
    began = time.time()
    procs = [
        mp.Process(target=hold, args=(a.http, per, a.sources, i * per, ready, done))
        for i in range(a.procs)
    ]
    for pr in procs:
        pr.start()
    opened = failed = closed = refused = 0
    for _ in procs:
        o, f, c, r = ready.get()
        opened, failed, closed = opened + o, failed + f, closed + c
        refused += r
    print(f"{opened} connections opened ({failed} failed) in {time.time() - began:.1f} s; "
          f"{closed} closed by the server, {refused} of them after a 503, "
          f"{opened - closed} held open")
    print(f"MQTT during the flood: {mqtt(a.mqtt)}")
    for t in (0, 12):
        if t:
            time.sleep(t)
            print(f"after {t} more s (header read timeout 10 s):")
        print(f"  /health from 127.0.0.2: {health(a.http, '127.0.0.2')}")
        print(f"  /health from 127.0.1.1: {health(a.http, '127.0.1.1')}")
    done.set()
    for pr in procs:
        pr.join()


if __name__ == "__main__":
    main()
