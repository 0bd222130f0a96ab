"""MQTT 3.1.1 conformance checks of the vendgate hub, driven by Eclipse paho-mqtt
(a third-party client), one check per invocation:

    python3 paho_checks.py CHECK HOST PORT USERNAME PASSWORD

Exits 0 and prints PASS, or fails with a traceback saying what differed.
`tests/tests/conformance.rs` starts a gateway and runs each check.
Every wait has a deadline; nothing sleeps to synchronise.
"""

import queue
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

DEADLINE = 15.0
HOST, PORT, USER, PASS = "", 0, "", ""


class Client:
    """A paho client on its own network thread that never reconnects by itself
    (paho's loop_start would, and a take-over test must see the loss)."""

    KINDS = ("connack", "suback", "unsuback", "disconnect")

    def __init__(self, client_id, clean=True, keepalive=30, will=None):
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            protocol=mqtt.MQTTv311,
        )
        self.c.username_pw_set(USER, PASS)
        if will is not None:
            self.c.will_set(*will)
        self.keepalive = keepalive
        self.msgs = queue.Queue()
        self.q = {k: queue.Queue() for k in self.KINDS}
        self.c.on_connect = lambda c, u, flags, rc, p: self.q["connack"].put(
            (flags.session_present, rc.value)
        )
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.q["suback"].put(
            (mid, [r.value for r in rcs])
        )
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.q["unsuback"].put(mid)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.q["disconnect"].put(rc.value)
        self.stop = threading.Event()
        self.thread = None

    def _run(self):
        while not self.stop.is_set():
            if self.c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                return

    def connect(self):
        """Connect; returns CONNACK's session present flag."""
        self.c.connect(HOST, PORT, keepalive=self.keepalive)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        present, rc = self.wait("connack")
        assert rc == 0, f"CONNACK return code {rc}"
        return present

    def wait(self, kind):
        try:
            return self.q[kind].get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no {kind} within {DEADLINE}s") from None

    def subscribe(self, *filters):
        """filters: (filter, qos) pairs in one SUBSCRIBE; returns its codes."""
        rc, mid = self.c.subscribe(list(filters))
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        got_mid, codes = self.wait("suback")
        assert got_mid == mid
        return codes

    def unsubscribe(self, f):
        rc, mid = self.c.unsubscribe(f)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert self.wait("unsuback") == mid

    def publish(self, topic, payload, qos=1, retain=False):
        """Publish and wait until the flow is complete (PUBACK / PUBCOMP)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=DEADLINE)
        assert info.is_published(), f"{topic} not acknowledged"

    def message(self):
        try:
            return self.msgs.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no message within {DEADLINE}s") from None

    def until(self, topic):
        """Messages received before the first one on `topic` (a marker)."""
        seen = []
        while True:
            m = self.message()
            if m.topic == topic:
                return seen
            seen.append(m)

    def disconnect(self):
        """Clean DISCONNECT."""
        self.c.disconnect()
        self.wait("disconnect")
        self.close_thread()

    def kill(self):
        """Close the socket without DISCONNECT (an abnormal close)."""
        self.close_thread()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def close_thread(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(DEADLINE)


def check_qos():
    """QoS 0, 1 and 2 both ways; delivered at min(publish, subscription)."""
    sub = Client("conf-qos-sub")
    sub.connect()
    assert sub.subscribe(("q/#", 2)) == [2], "QoS 2 granted"
    low = Client("conf-qos-low")
    low.connect()
    assert low.subscribe(("q/#", 1)) == [1]
    pub = Client("conf-qos-pub")
    pub.connect()
    for qos in (0, 1, 2):
        pub.publish(f"q/{qos}", f"m{qos}", qos=qos)
    pub.publish("q/end", "end", qos=1)
    # paho hands a QoS 2 message to the application at PUBREL (§4.3.3
    # method B), so it may come after a later QoS 1 one: compare as sets.
    got = sorted((m.topic, m.payload, m.qos) for m in (sub.message() for _ in range(4)))
    assert got == [("q/0", b"m0", 0), ("q/1", b"m1", 1), ("q/2", b"m2", 2), ("q/end", b"end", 1)], got
    got = sorted((m.topic, m.qos) for m in (low.message() for _ in range(4)))
    assert got == [("q/0", 0), ("q/1", 1), ("q/2", 1), ("q/end", 1)], got
    # Exactly once: nothing more than those four came.
    pub.publish("q/end2", "end", qos=1)
    assert sub.until("q/end2") == [], "no duplicates"
    # The subscriber publishes at QoS 2 too (inbound exactly once).
    sub.publish("q/self", "s", qos=2)
    m = sub.message()
    assert (m.topic, m.qos) == ("q/self", 2), (m.topic, m.qos)


def check_persistent():
    """clean_session = 0: subscriptions and QoS 1/2 messages kept while away."""
    p = Client("conf-persist", clean=False)
    assert p.connect() is False, "a new session is not present"
    assert p.subscribe(("p/#", 2)) == [2]
    p.disconnect()
    pub = Client("conf-persist-pub")
    pub.connect()
    pub.publish("p/1", "one", qos=1)
    pub.publish("p/2", "two", qos=2)
    back = Client("conf-persist", clean=False)
    assert back.connect() is True, "session present on return"
    got = sorted((m.topic, m.payload, m.qos) for m in (back.message() for _ in range(2)))
    assert got == [("p/1", b"one", 1), ("p/2", b"two", 2)], got
    # The subscription itself survived: new messages arrive without SUBSCRIBE.
    pub.publish("p/3", "three", qos=1)
    m = back.message()
    assert (m.topic, m.payload) == ("p/3", b"three")
    back.disconnect()
    # clean_session = 1 discards the stored session...
    clean = Client("conf-persist", clean=True)
    assert clean.connect() is False
    clean.disconnect()
    # ...so the next persistent connect starts afresh.
    again = Client("conf-persist", clean=False)
    assert again.connect() is False, "clean session discarded the state"
    again.disconnect()


def check_retained():
    """Retained messages go to new subscribers; an empty retained one clears."""
    pub = Client("conf-ret-pub")
    pub.connect()
    pub.publish("r/a", "x", qos=1, retain=True)
    s1 = Client("conf-ret-1")
    s1.connect()
    s1.subscribe(("r/#", 1))
    m = s1.message()
    assert (m.topic, m.payload, m.retain) == ("r/a", b"x", True), (m.topic, m.payload, m.retain)
    pub.publish("r/a", "", qos=1, retain=True)
    m = s1.message()
    assert (m.topic, m.payload, m.retain) == ("r/a", b"", False), "live subscribers get retain 0"
    s2 = Client("conf-ret-2")
    s2.connect()
    s2.subscribe(("r/#", 1), ("m/r", 1))
    pub.publish("m/r", "marker", qos=1)
    assert s2.until("m/r") == [], "cleared: nothing retained"


def check_will():
    """The will is published on an abnormal close only."""
    obs = Client("conf-will-obs")
    obs.connect()
    obs.subscribe(("w/#", 1))
    a = Client("conf-will-a", will=("w/a", "gone", 1, False))
    a.connect()
    a.disconnect()
    b = Client("conf-will-b", will=("w/b", "lost", 1, False))
    b.connect()
    b.kill()
    m = obs.message()
    assert (m.topic, m.payload) == ("w/b", b"lost"), (m.topic, m.payload)


def check_keepalive_zero():
    """Keep alive 0 turns the mechanism off (§3.1.2.10): accepted and usable."""
    c = Client("conf-ka0", keepalive=0)
    c.connect()
    c.subscribe(("k/x", 1))
    c.publish("k/x", "alive", qos=1)
    m = c.message()
    assert (m.topic, m.payload) == ("k/x", b"alive")


def check_take_over():
    """A second CONNECT with the same client id closes the first (§3.1.4)."""
    a = Client("conf-same")
    a.connect()
    b = Client("conf-same")
    b.connect()
    a.wait("disconnect")
    b.subscribe(("t/x", 1))
    b.publish("t/x", "new owner", qos=1)
    m = b.message()
    assert m.payload == b"new owner"


def check_unsubscribe():
    c = Client("conf-unsub")
    c.connect()
    c.subscribe(("u/#", 1), ("m/u", 1))
    c.publish("u/1", "before", qos=1)
    assert c.message().topic == "u/1"
    c.unsubscribe("u/#")
    c.publish("u/2", "after", qos=1)
    c.publish("m/u", "marker", qos=1)
    assert c.until("m/u") == [], "nothing after UNSUBACK"


def check_overlap():
    """Overlapping subscriptions: one copy, at the highest granted QoS."""
    c = Client("conf-overlap")
    c.connect()
    # The marker at QoS 2 as well, so paho hands both over in order (at PUBREL).
    assert c.subscribe(("o/#", 1), ("o/+", 2), ("m/o", 2)) == [1, 2, 2]
    c.publish("o/a", "x", qos=2)
    c.publish("m/o", "marker", qos=2)
    got = [(m.topic, m.qos) for m in c.until("m/o")]
    assert got == [("o/a", 2)], got


def check_deny():
    """`mqtt.deny_filters` (here `secret/#`) as a broker's ACL: a filter
    wholly inside a denied one gets 0x80; a wider one (`#`) is granted and
    the denied topics are withheld from it at delivery."""
    c = Client("conf-deny")
    c.connect()
    codes = c.subscribe(("secret/x", 1), ("#", 1), ("open/x", 1))
    assert codes == [0x80, 1, 1], codes
    c.publish("secret/x", "hidden", qos=1)
    c.publish("open/x", "ok", qos=1)
    # `#` and `open/x` overlap: one copy (§3.3.5); the denied topic, published
    # first, never arrives.
    m = c.message()
    assert (m.topic, m.payload) == ("open/x", b"ok"), (m.topic, m.payload)


CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}


def main():
    global HOST, PORT, USER, PASS
    if len(sys.argv) != 6 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: paho_checks.py {{{'|'.join(CHECKS)}}} HOST PORT USERNAME PASSWORD")
    name, HOST, port, USER, PASS = sys.argv[1:]
    PORT = int(port)
    started = time.monotonic()
    CHECKS[name]()
    print(f"PASS {name} ({time.monotonic() - started:.2f}s)")


if __name__ == "__main__":
    main()
