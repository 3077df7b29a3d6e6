"""Interoperability of Ferry's MQTT server with the Eclipse Paho Python client.

Usage: python3 interop.py HOST PORT VERSION   (VERSION: 311 or 5)

Checks, for the protocol version given: the QoS 2 exactly-once flow, retained messages, the
will message on an abnormal disconnect, a shared subscription, and SUBSCRIBE and PUBLISH sent
right behind the CONNECT (before the CONNACK). Prints one "ok ..." line per
check; exits with 1 and a reason at the first failure.
"""

import queue
import sys
import time
import uuid

import paho.mqtt.client as mqtt

TIMEOUT = 5.0

HOST, PORT, VERSION = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PROTOCOL = mqtt.MQTTv5 if VERSION == "5" else mqtt.MQTTv311
RUN = uuid.uuid4().hex[:8]
BASE = f"py/{VERSION}/{RUN}"


def fail(why):
    print(f"FAIL ({VERSION}): {why}", flush=True)
    sys.exit(1)


def new_client(name, will=None):
    """A client whose received messages go to client.inbox (a queue)."""
    kwargs = {"client_id": f"{name}-{VERSION}-{RUN}", "protocol": PROTOCOL}
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
    if PROTOCOL == mqtt.MQTTv311:
        kwargs["clean_session"] = True
    c = mqtt.Client(**kwargs)
    c.inbox = queue.Queue()
    c.subacks = queue.Queue()
    c.on_message = lambda client, userdata, msg: client.inbox.put(msg)
    c.on_subscribe = lambda client, userdata, mid, *rest: client.subacks.put(mid)
    if will:
        c.will_set(will[0], will[1], qos=1, retain=False)
    return c


def connect(c, loop=True):
    c.connect(HOST, PORT, keepalive=30)
    if loop:
        c.loop_start()
        deadline = time.time() + TIMEOUT
        while not c.is_connected():
            if time.time() > deadline:
                fail(f"{c._client_id!r} did not connect")
            time.sleep(0.01)


def subscribe(c, topic, qos):
    result, _mid = c.subscribe(topic, qos)
    if result != mqtt.MQTT_ERR_SUCCESS:
        fail(f"subscribe {topic}: {result}")
    try:
        c.subacks.get(timeout=TIMEOUT)
    except queue.Empty:
        fail(f"no SUBACK for {topic}")


def receive(c, what):
    try:
        return c.inbox.get(timeout=TIMEOUT)
    except queue.Empty:
        fail(f"nothing received: {what}")


def nothing_more(c, what, wait=0.5):
    try:
        msg = c.inbox.get(timeout=wait)
    except queue.Empty:
        return
    fail(f"unexpected message {msg.topic} {msg.payload!r}: {what}")


def stop(*clients):
    for c in clients:
        c.disconnect()
        c.loop_stop()


def qos2_exactly_once():
    topic = f"{BASE}/q2"
    sub, pub = new_client("q2sub"), new_client("q2pub")
    connect(sub)
    connect(pub)
    subscribe(sub, topic, 2)
    for i in range(5):
        info = pub.publish(topic, f"m{i}", qos=2)
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            fail(f"QoS 2 publish m{i} not completed (PUBREC/PUBREL/PUBCOMP)")
    got = []
    for i in range(5):
        msg = receive(sub, f"QoS 2 message {i}")
        if msg.qos != 2:
            fail(f"delivered at QoS {msg.qos}, expected 2")
        got.append(msg.payload.decode())
    if got != [f"m{i}" for i in range(5)]:
        fail(f"QoS 2 messages out of order or wrong: {got}")
    nothing_more(sub, "a QoS 2 message was delivered twice")
    stop(sub, pub)
    print("ok qos2 exactly once", flush=True)


def retained():
    topic = f"{BASE}/retained"
    pub = new_client("retpub")
    connect(pub)
    pub.publish(topic, "kept", qos=1, retain=True).wait_for_publish(TIMEOUT)
    late = new_client("retsub")
    connect(late)
    subscribe(late, topic, 1)
    msg = receive(late, "retained message")
    if msg.payload != b"kept" or not msg.retain:
        fail(f"retained: got {msg.payload!r} retain={msg.retain}")
    # Clearing it: a later subscriber gets nothing.
    pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    later = new_client("retsub2")
    connect(later)
    subscribe(later, topic, 1)
    nothing_more(later, "cleared retained message still sent")
    stop(pub, late, later)
    print("ok retained", flush=True)


def will():
    topic = f"{BASE}/will"
    watcher = new_client("watcher")
    connect(watcher)
    subscribe(watcher, topic, 1)
    dying = new_client("dying", will=(topic, "gone"))
    connect(dying, loop=False)
    deadline = time.time() + TIMEOUT
    while not dying.is_connected():
        dying.loop(0.1)
        if time.time() > deadline:
            fail("dying client did not connect")
    dying.socket().close()  # no DISCONNECT: the will must be published
    msg = receive(watcher, "will message")
    if msg.payload != b"gone":
        fail(f"will payload {msg.payload!r}")
    # A normal DISCONNECT publishes no will.
    polite = new_client("polite", will=(topic, "should not appear"))
    connect(polite)
    stop(polite)
    nothing_more(watcher, "will published after a normal DISCONNECT")
    stop(watcher)
    print("ok will", flush=True)


def pipelined_behind_connect(rounds=20):
    """SUBSCRIBE and PUBLISH sent right after CONNECT, before the CONNACK is read: each must be
    answered without the client sending anything more."""
    for i in range(rounds):
        topic = f"{BASE}/pipe/{i}"
        c = new_client(f"pipe{i}")
        c.connect(HOST, PORT, keepalive=30)
        result, _mid = c.subscribe(topic, 1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            fail(f"subscribe right after connect: {result}")
        info = c.publish(topic, f"p{i}", qos=1)
        c.loop_start()
        try:
            c.subacks.get(timeout=TIMEOUT)
        except queue.Empty:
            fail(f"round {i}: no SUBACK for a SUBSCRIBE sent behind the CONNECT")
        msg = receive(c, f"round {i}: own message published behind the CONNECT")
        if msg.payload != f"p{i}".encode():
            fail(f"round {i}: got {msg.payload!r}")
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            fail(f"round {i}: no PUBACK")
        stop(c)
    print(f"ok pipelined behind CONNECT ({rounds} rounds)", flush=True)


def shared_subscription():
    topic = f"{BASE}/shared"
    a, b, pub = new_client("sharea"), new_client("shareb"), new_client("sharepub")
    for c in (a, b, pub):
        connect(c)
    subscribe(a, f"$share/workers/{topic}", 1)
    subscribe(b, f"$share/workers/{topic}", 1)
    n = 20
    for i in range(n):
        pub.publish(topic, f"job{i}", qos=1).wait_for_publish(TIMEOUT)
    seen = []
    deadline = time.time() + TIMEOUT
    while len(seen) < n and time.time() < deadline:
        for c in (a, b):
            try:
                seen.append((c, c.inbox.get(timeout=0.05).payload.decode()))
            except queue.Empty:
                pass
    payloads = sorted(p for _, p in seen)
    if payloads != sorted(f"job{i}" for i in range(n)):
        fail(f"shared subscription: each message once expected, got {payloads}")
    nothing_more(a, "shared message delivered twice", 0.3)
    nothing_more(b, "shared message delivered twice", 0.3)
    split = (sum(1 for c, _ in seen if c is a), sum(1 for c, _ in seen if c is b))
    stop(a, b, pub)
    print(f"ok shared subscription (split {split[0]}/{split[1]})", flush=True)


if __name__ == "__main__":
    qos2_exactly_once()
    retained()
    will()
    shared_subscription()
    pipelined_behind_connect()
    print(f"all ok (MQTT {VERSION})", flush=True)
