#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/corpus/<target>/) from readable
descriptions. Re-run after changing an input layout (docs/fuzzing.md)."""
import json, os, struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

def rl(n):  # MQTT remaining length
    out = b""
    while True:
        b = n % 128; n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n: return out

def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x

def pkt(h, body): return bytes([h]) + rl(len(body)) + body
def connect(cid="seed", user=None, pw=None, level=4):
    flags = 0x02 | (0x80 if user else 0) | (0x40 if pw else 0)
    body = s("MQTT") + bytes([level, flags]) + struct.pack(">H", 30) + s(cid)
    if user: body += s(user)
    if pw: body += s(pw)
    return pkt(0x10, body)
def publish(topic, payload=b"", qos=0, pkid=1, dup=False, retain=False):
    h = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return pkt(h, body)
def subscribe(filters, pkid=1):
    return pkt(0x82, struct.pack(">H", pkid) + b"".join(s(f) + bytes([q]) for f, q in filters))
def unsubscribe(filters, pkid=2):
    return pkt(0xA2, struct.pack(">H", pkid) + b"".join(s(f) for f in filters))
PINGREQ, DISCONNECT = b"\xc0\x00", b"\xe0\x00"
M = "10000001"

# The broker CVE shapes named in issue 7, and ordinary traffic.
packets = {
    "connack_v5_kill": bytes.fromhex("2a0100"),
    "connack": bytes.fromhex("20020000"),
    "unsuback": bytes.fromhex("b0020001"),
    "publish_empty_topic": publish(""),
    "publish_empty_topic_qos1": publish("", b"x", qos=1),
    "huge_len_not_connect": bytes.fromhex("30ffffff7f"),
    "huge_len_subscribe": bytes.fromhex("82ffffff7f00"),
    "huge_len_connect": bytes.fromhex("10ffffff7f"),
    "qos2_dup_no_pubrel": publish(f"vend/v1/{M}/state", b'{"online":true}', 2, 7)
        + publish(f"vend/v1/{M}/state", b'{"online":true}', 2, 7, dup=True)
        + publish(f"vend/v1/{M}/state", b'{"online":true}', 2, 7),
    "subscribe_no_filters": bytes.fromhex("82020001"),
    "connect_v5": connect(level=5),
    "connect_v3": connect(level=3),
    "connect": connect(),
    "subscribe_ok": subscribe([(f"vend/v1/{M}/cmd/#", 1)]),
    "pubrel_pubcomp": bytes.fromhex("62020007") + bytes.fromhex("70020007"),
    "ping_disconnect": PINGREQ + DISCONNECT,
    "multibyte_topic": publish("é/x", b"1"),
    "wildcard_topic": publish("a/+/b", b"1"),
}
edge = {
    # mode 0: the bytes as they are (pre-CONNECT rules)
    **{f"raw_{k}": b"\x00" + v for k, v in packets.items()},
    # mode 1: after a valid machine CONNECT
    **{f"machine_{k}": b"\x01" + v for k, v in packets.items() if not k.startswith("connect_")},
    "machine_second_connect": b"\x01" + connect(),
    "machine_acl_other_machine": b"\x01" + publish("vend/v1/10000002/state", b'{"online":false}', 1),
    "machine_acl_subscribe_all": b"\x01" + subscribe([("#", 1), ("vend/v1/+/ack", 1), (f"vend/v1/{M}/#", 2)]),
    "machine_ack_result": b"\x01" + publish(f"vend/v1/{M}/ack", b'{"order_id":1,"accepted":true}', 1)
        + publish(f"vend/v1/{M}/result", b'{"order_id":1,"items":[{"product_id":1,"quantity":1,"dispensed":1}]}', 1),
    "machine_bad_payloads": b"\x01" + publish(f"vend/v1/{M}/inventory", b'{"items":[{"product_id":1,"stock":-1,"price":1}]}')
        + publish(f"vend/v1/{M}/pong", b"\xff\xfe") + publish(f"vend/v1/{M}/state", b'{"online":false}', retain=True),
    "machine_unsubscribe": b"\x01" + subscribe([(f"vend/v1/{M}/cmd/#", 1)]) + unsubscribe([f"vend/v1/{M}/cmd/#", "#"]),
    # mode 2: after a valid service CONNECT
    "service_subscribe_all": b"\x02" + subscribe([("#", 2), ("vend/v1/#", 1), ("bad/#/x", 1)]) + PINGREQ,
    "service_publish_protocol": b"\x02" + publish("vend/v1/10000001/cmd/dispense", b"{}", 1),
    "service_publish_free": b"\x02" + publish("ops/x", b"hello", 2, 3, retain=True) + bytes.fromhex("62020003"),
    "service_qos2_dup_no_pubrel": b"\x02" + publish("ops/y", b"1", 2, 9) + publish("ops/y", b"1", 2, 9, dup=True),
    "service_empty_subscribe": b"\x02" + bytes.fromhex("82020001"),
}

def dev(*parts):
    out = b""
    for p in parts:
        out += p if isinstance(p, bytes) else bytes([p])
    return out
def lb(x):
    x = x.encode() if isinstance(x, str) else x
    return bytes([len(x)]) + x
device = {
    # lines: count-1, then (product-1, qty-1) per line; then ops.
    "no_ops": dev(0, 0, 0),
    "accept_full_result": dev(0, 0, 1, 0x00, 1, lb(""), 0x01, 1, 2, lb("")),
    "refuse": dev(0, 0, 0, 0x00, 0, lb("door_open")),
    "result_before_ack": dev(1, 0, 0, 1, 1, 0x01, 2, 1, 0, lb("motor_jam")),
    "duplicate_results": dev(0, 2, 2, 0x00, 1, lb(""), 0x01, 1, 1, lb(""), 0x01, 1, 3, lb(""), 0x01, 1, 0, lb("")),
    "partial": dev(0, 1, 2, 0x00, 1, lb(""), 0x01, 1, 1, lb("out_of_stock")),
    "foreign_machine": dev(0, 0, 0, 0x10, 1, lb(""), 0x11, 1, 0, lb("")),
    "bad_result_lines": dev(0, 0, 0, 0x00, 1, lb(""), 0x01, 3, 0x80, 9, 9, 0x80, 9, 9, 0x80, 1, 0, lb("")),
    "random_ids": dev(0, 0, 0, 0x60, 1, 2, 3, 4, 5, 6, 7, 8, 1, lb(""), 0x61, 0, 0, 0, 0, 0, 0, 0, 0, 0, lb("")),
    "inventory_zero": dev(0, 0, 0, 0x03, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 255, 255, 255, 255, 0, 0, 0, 0),
    "state_pong": dev(0, 0, 0, 0x04, 0x09),
    "raw_json_result": dev(0, 0, 0, 0x88, lb('{"order_id":1,"items":[{"product_id":1,"quantity":1,"dispensed":9}]}')),
    "raw_json_ack": dev(0, 0, 0, 0xa8 + 2, lb('{"order_id":18446744073709551615,"accepted":true,"reason":null}')),
    "json_result_text": b'{"order_id":1111111,"items":[{"product_id":1,"quantity":2,"dispensed":1}],"error":"motor_jam"}',
    "json_inventory_text": b'{"items":[{"product_id":1,"stock":4294967295,"price":-9223372036854775808}]}',
    "json_deep": b"[" * 200 + b"]" * 200,
}
# Crashes found, kept as regression inputs (docs/fuzzing.md).
device_crashes = {
    # Two lines of product 1: every result was refused ("product listed
    # twice"), the order went unknown with a full refund.
    "repeated_product_lines": dev(1, 0, 0, 0, 0),
    "repeated_product_lines_partial": dev(2, 0, 1, 0, 0, 0, 1, 0x00, 1, lb(""), 0x01, 3, 1, 0, 2, lb("motor_jam")),
}

GET, POST, PUT, DELETE = 0, 1, 2, 3
T = {"orders": 0, "order": 1, "pay": 2, "refund": 3, "machines": 4, "machine": 5, "events": 6,
     "replay": 7, "api_any": 8, "healthz": 9, "readyz": 10, "metrics": 11, "dashboard": 12,
     "summary": 14, "dash_order": 16, "any": 17}
def http(method, t, auth, seg_mode, seg=b"", query="", hname="", hval="", body=b""):
    seg_bytes = {0: lb(seg), 1: b"\x00", 2: b"", 3: b"\x01" * 8}[seg_mode % 4]
    body = body.encode() if isinstance(body, str) else body
    return bytes([method, T[t], auth, seg_mode]) + seg_bytes + lb(query) + lb(hname) + lb(hval) + body
order = json.dumps({"machine_no": "10000003", "products": [{"product_id": 1, "quantity": 1}]})
later = json.dumps({"machine_no": "10000003", "products": [{"product_id": 2, "quantity": 2}], "pay_later": True, "out_trade_no": "t-1"})
api = {
    "place": http(POST, "orders", 0x81, 2, body=order),
    "place_pay_later": http(POST, "orders", 0x81, 2, body=later),
    "get_order": http(GET, "order", 1, 1),
    "pay": http(POST, "pay", 1, 1),
    "refund": http(POST, "refund", 1, 1),
    "other_merchant_order": http(GET, "order", 3, 1),
    "machines": http(GET, "machines", 1, 2),
    "machine": http(GET, "machine", 1, 2),
    "events_dead": http(GET, "events", 1, 2, query="status=dead&limit=-1"),
    "replay": http(POST, "replay", 1, 0, seg="evt_0000"),
    "no_auth": http(POST, "orders", 0, 2, body=order),
    "wrong_secret": http(POST, "orders", 2, 2, body=order),
    "bad_json": http(POST, "orders", 0x81, 2, body='{"machine_no":'),
    "wrong_types": http(POST, "orders", 0x81, 2, body='{"machine_no":12345678,"products":"x"}'),
    "huge_quantity": http(POST, "orders", 0x81, 2, body='{"machine_no":"10000003","products":[{"product_id":-1,"quantity":4294967296}]}'),
    "many_lines": http(POST, "orders", 0x81, 2, body=json.dumps({"machine_no": "10000003", "products": [{"product_id": 1, "quantity": 1}] * 50})),
    "oversized_body": http(POST, "orders", 0x81, 2, body=b"{" + b" " * 70000 + b"}"),
    "non_utf8_body": http(POST, "orders", 0x81, 2, body=b"\xff\xfe\x00"),
    "order_id_words": http(GET, "order", 1, 0, seg="-1"),
    "order_id_huge": http(GET, "order", 1, 0, seg="99999999999999999999999"),
    "machine_no_bad": http(GET, "machine", 1, 0, seg="%E9%00"),
    "wrong_method": http(DELETE, "orders", 1, 2),
    "put_order": http(PUT, "order", 1, 1, body=order),
    "unknown_route": http(GET, "any", 0, 0, seg="nope"),
    "unknown_api_route": http(GET, "api_any", 1, 0, seg="nope"),
    "content_length_lie": http(POST, "orders", 0x81, 2, hname="content-length", hval="5", body=order),
    "healthz": http(GET, "healthz", 0, 0),
    "readyz": http(GET, "readyz", 0, 0),
    "metrics": http(GET, "metrics", 0, 0),
    "dashboard_summary": http(GET, "summary", 0x40, 0),
    "dashboard_order": http(GET, "dash_order", 0x40, 1),
    "dashboard_summary_no_login": http(GET, "summary", 0, 0),
}

# Crashes found: a path segment that is not UTF-8 once percent-decoded was
# answered by axum's plain-text 400 outside the envelope.
http_crashes = {
    "path_not_utf8_machine": http(GET, "machine", 1, 0, seg="%E9%00"),
    "path_not_utf8_order": http(GET, "order", 1, 0, seg="%ff"),
    "path_not_utf8_replay": http(POST, "replay", 1, 0, seg="%C3%28"),
}

for target, crashes in [("device_payload", device_crashes), ("http_api", http_crashes)]:
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for name, data in crashes.items():
        with open(os.path.join(d, "crash-" + name), "wb") as f:
            f.write(data)

for target, seeds in [("mqtt_decode", packets), ("edge_session", edge), ("device_payload", device), ("http_api", api)]:
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    print(target, len(seeds))
