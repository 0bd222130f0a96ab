//! The OpenAPI document of the open API (`GET /api/openapi/v1/openapi.json`),
//! checked against the gateway that serves it: it is OpenAPI 3.1, it names
//! exactly the routes below (and each answers), every endpoint's real
//! answers (a success and an error each) validate against its schema, the
//! real webhook bodies validate against theirs, and API.md's error codes are
//! all in its code enum.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use vendgate_e2e::{ready_sim, sim_config, wait_until, Api, TestGateway};
use vendgate_sim::Behaviour;

const M1: &str = "31000001";

/// Every route of the open API. The router and the document are built from
/// one list (gateway `http/openapi.rs`), so a route added to the router is
/// in the document, and fails here until it is added below and exercised.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/orders"),
    ("get", "/orders"),
    ("get", "/orders/{order_id}"),
    ("post", "/orders/{order_id}/pay"),
    ("post", "/orders/{order_id}/cancel"),
    ("post", "/orders/{order_id}/refund"),
    ("get", "/machines"),
    ("get", "/machines/{machine_no}"),
    ("post", "/machines/{machine_no}/ping"),
    ("get", "/merchant"),
    ("put", "/merchant"),
    ("get", "/events"),
    ("post", "/events/{event_id}/replay"),
    ("get", "/openapi.json"),
];

/// The document, and what each exercised (method, path) answered.
struct Checker {
    doc: Value,
    seen: Mutex<BTreeSet<(String, String, bool)>>,
}

impl Checker {
    /// Validate `instance` against `schema`, a schema of the document whose
    /// `$ref`s point into `#/components`. Object schemas with properties are
    /// closed for the check (`additionalProperties: false`): a field the
    /// gateway sends and the document does not name fails here, while the
    /// published document leaves objects open for extensions (API.md).
    fn validate(&self, what: &str, schema: &Value, instance: &Value) {
        let errors = self.errors(what, schema, instance);
        assert!(
            errors.is_empty(),
            "{what}: {instance} does not match the document:\n{}",
            errors.join("\n")
        );
    }

    fn errors(&self, what: &str, schema: &Value, instance: &Value) -> Vec<String> {
        fn close(v: &mut Value) {
            match v {
                Value::Object(m) => {
                    if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                        m.insert("additionalProperties".into(), json!(false));
                    }
                    m.values_mut().for_each(close);
                }
                Value::Array(a) => a.iter_mut().for_each(close),
                _ => {}
            }
        }
        let mut root = schema.clone();
        root["components"] = self.doc["components"].clone();
        close(&mut root);
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{what}: schema does not compile: {e}"));
        validator
            .iter_errors(instance)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect()
    }

    fn schema_of(&self, method: &str, path: &str) -> &Value {
        &self.doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]
            ["schema"]
    }

    /// Check an answer of `method path` against the document's HTTP 200
    /// schema for it, and record whether it was a success.
    fn answer(&self, method: &str, path: &str, body: &Value) {
        let schema = self.schema_of(method, path);
        assert!(schema.is_object(), "no 200 schema for {method} {path}");
        self.validate(&format!("{method} {path}"), schema, body);
        let ok = body["code"] == 0;
        self.seen
            .lock()
            .expect("seen")
            .insert((method.to_string(), path.to_string(), ok));
    }

    /// Check a webhook body against the document's `webhooks` entry.
    fn webhook(&self, body: &Value) {
        let kind = body["type"].as_str().unwrap_or("");
        let hook = if kind.starts_with("order.") {
            "order"
        } else {
            "machine"
        };
        let schema = &self.doc["webhooks"][hook]["post"]["requestBody"]["content"]
            ["application/json"]["schema"];
        self.validate(&format!("webhook {kind}"), schema, body);
    }
}

/// A delivery: its `Vendgate-Signature` header and its body.
type Hit = (Option<String>, Value);

/// A webhook receiver: records bodies and signature headers; answers 500
/// while `fail` is set.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    fail: Arc<AtomicBool>,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let sig = headers
        .get("vendgate-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    r.hits.lock().expect("hits").push((sig, json));
    if r.fail.load(Ordering::SeqCst) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

async fn send(api: &Api, method: &str, path: &str, body: Option<Value>) -> Value {
    send_with(api, method, path, body, &[]).await
}

async fn send_with(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Value {
    let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let mut req = api
        .http
        .request(m, format!("{}{path}", api.base))
        .header("Appid", &api.appid)
        .header("AppSecret", &api.secret);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let r = req.send().await.expect("request");
    assert_eq!(r.status(), 200, "{method} {path}");
    r.json().await.expect("JSON envelope")
}

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

#[tokio::test]
async fn the_document_describes_every_route_and_every_real_answer() {
    let rx = Receiver::default();
    rx.fail.store(true, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let rx_addr = listener.local_addr().expect("receiver address");
    let app = axum::Router::new().fallback(hook).with_state(rx.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let gw = TestGateway::start_with(|s| {
        s.notifier.allow_private_targets = true;
        s.notifier.backoff_base = Duration::from_millis(50);
        s.notifier.backoff_cap = Duration::from_millis(200);
        s.notifier.poll_interval = Duration::from_millis(50);
        // The receiver fails at first: events go dead fast, for replay.
        s.notifier.retry_for = Duration::from_secs(1);
    })
    .await;
    let (appid, secret) = gw
        .merchant_with_url("shop", &format!("http://{rx_addr}/hook"))
        .await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);

    // The document: no credentials, not enveloped, OpenAPI 3.1.
    let r = reqwest::get(format!("{}/openapi.json", api.base))
        .await
        .expect("GET openapi.json");
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json")));
    let doc: Value = r.json().await.expect("the document is JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{}",
        doc["openapi"]
    );
    assert!(doc.get("code").is_none(), "the document is not enveloped");
    if let Ok(out) = std::env::var("OPENAPI_DUMP") {
        std::fs::write(out, serde_json::to_string_pretty(&doc).expect("JSON")).expect("dump");
    }
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert!(doc["webhooks"].is_object());
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["Appid"]["in"], "header");
    assert_eq!(schemes["AppSecret"]["name"], "AppSecret");
    // The document names exactly the routes of the list.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|i| i.keys())
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, listed, "the document's routes are the list's");

    let check = Checker {
        doc: doc.clone(),
        seen: Mutex::new(BTreeSet::new()),
    };
    // Every component is a JSON Schema (2020-12) that compiles.
    for name in doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .keys()
    {
        let r = json!({ "$ref": format!("#/components/schemas/{name}") });
        check.errors(name, &r, &Value::Null);
    }

    // The check can fail: answers the document does not allow.
    let placed = check.schema_of("post", "/orders");
    for bad in [
        json!({ "code": 0, "message": "ok", "data": { "order_id": 1, "extra": 1 } }),
        json!({ "code": 0, "message": "ok", "data": {} }),
        json!({ "code": 0, "message": "ok", "data": { "order_id": 1, "status": "paid" } }),
        json!({ "code": 12345, "message": "?", "data": {} }),
        json!({ "code": 40001, "message": "订单不存在", "data": { "order_id": 1 } }),
        json!({ "code": 0, "data": { "order_id": 1 } }),
    ] {
        assert!(
            !check.errors("negative", placed, &bad).is_empty(),
            "accepted {bad}"
        );
    }

    // Request bodies: the published spellings fit the document; a body
    // naming no machine does not.
    let request =
        &doc["paths"]["/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    for body in [
        json!({ "imei": "12345678", "products": [{ "product_id": 1, "quantity": 1 }] }),
        json!({ "machine_no": "12345678", "products": [{ "product_id": 1, "quantity": 1 }],
                "out_trade_no": "o-1", "pay_later": true }),
    ] {
        check.validate("POST /orders body", request, &body);
    }
    let nameless = json!({ "products": [{ "product_id": 1, "quantity": 1 }] });
    assert!(!check
        .errors("POST /orders body", request, &nameless)
        .is_empty());
    let put =
        &doc["paths"]["/merchant"]["put"]["requestBody"]["content"]["application/json"]["schema"];
    check.validate("PUT /merchant body", put, &json!({ "notify_url": null }));
    check.validate(
        "PUT /merchant body",
        put,
        &json!({ "notify_url": "https://shop.example/hook" }),
    );

    // Every documented path is served: without credentials each answers
    // 10001 (an unknown path would answer 20001 from the fallback).
    for (method, path) in ROUTES.iter().filter(|(_, p)| *p != "/openapi.json") {
        let concrete = path
            .replace("{order_id}", "1")
            .replace("{machine_no}", M1)
            .replace("{event_id}", "evt_x");
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let v: Value = api
            .http
            .request(m, format!("{}{concrete}", api.base))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("envelope");
        assert_eq!(code(&v), 10001, "{method} {path}: {v}");
        check.answer(method, path, &v);
    }

    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;

    // POST /orders: the published `imei` spelling, with out_trade_no.
    let v = send(
        &api,
        "post",
        "/orders",
        Some(json!({ "imei": M1, "products": [{ "product_id": 1, "quantity": 1 }], "out_trade_no": "o-1" })),
    )
    .await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("post", "/orders", &v);
    let done = v["data"]["order_id"].as_u64().expect("order_id");
    api.wait_status(done, "completed").await;
    let v = send(
        &api,
        "post",
        "/orders",
        Some(json!({ "machine_no": "1234567", "products": [{ "product_id": 1, "quantity": 1 }] })),
    )
    .await;
    assert_eq!(code(&v), 20002);
    check.answer("post", "/orders", &v);

    // pay_later with Idempotency-Key, then pay it.
    let placed = send_with(
        &api,
        "post",
        "/orders",
        Some(json!({ "machine_no": M1, "products": [{ "product_id": 2, "quantity": 1 }], "pay_later": true })),
        &[("Idempotency-Key", "later-1")],
    )
    .await;
    assert_eq!(placed["data"]["status"], "awaiting_payment", "{placed}");
    check.answer("post", "/orders", &placed);
    let later = placed["data"]["order_id"].as_u64().expect("order_id");
    let pay_path = "/orders/{order_id}/pay";
    let v = send(&api, "post", &format!("/orders/{later}/pay"), None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("post", pay_path, &v);
    api.wait_status(later, "completed").await;
    let v = send(&api, "post", &format!("/orders/{later}/pay"), None).await;
    assert_eq!(code(&v), 40002, "paid twice: {v}");
    check.answer("post", pay_path, &v);

    // Cancel an unpaid order, then again.
    let placed = send(
        &api,
        "post",
        "/orders",
        Some(json!({ "machine_no": M1, "products": [{ "product_id": 1, "quantity": 1 }], "pay_later": true })),
    )
    .await;
    let unpaid = placed["data"]["order_id"].as_u64().expect("order_id");
    for want in [0, 40002] {
        let v = send(&api, "post", &format!("/orders/{unpaid}/cancel"), None).await;
        assert_eq!(code(&v), want, "{v}");
        check.answer("post", "/orders/{order_id}/cancel", &v);
    }

    // A failed order owes a refund; a completed one owes nothing.
    sim.set_behaviour(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let v = send(
        &api,
        "post",
        "/orders",
        Some(json!({ "machine_no": M1, "products": [{ "product_id": 1, "quantity": 2 }] })),
    )
    .await;
    let failed = v["data"]["order_id"].as_u64().expect("order_id");
    api.wait_status(failed, "failed").await;
    sim.set_behaviour(Behaviour::default());
    let v = send(&api, "post", &format!("/orders/{failed}/refund"), None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("post", "/orders/{order_id}/refund", &v);
    let v = send(&api, "post", &format!("/orders/{done}/refund"), None).await;
    assert_eq!(code(&v), 40002, "{v}");
    check.answer("post", "/orders/{order_id}/refund", &v);

    // GET /orders/{id}: a refunded failed order has the most fields.
    for id in [done, failed, later, unpaid] {
        let v = send(&api, "get", &format!("/orders/{id}"), None).await;
        assert_eq!(code(&v), 0, "{v}");
        check.answer("get", "/orders/{order_id}", &v);
    }
    let v = send(&api, "get", "/orders/999", None).await;
    assert_eq!(code(&v), 40001);
    check.answer("get", "/orders/{order_id}", &v);

    // GET /orders
    for q in ["", "?status=completed&page_size=1", "?out_trade_no=none"] {
        let v = send(&api, "get", &format!("/orders{q}"), None).await;
        assert_eq!(code(&v), 0, "{q}: {v}");
        check.answer("get", "/orders", &v);
    }
    let v = send(&api, "get", "/orders?page=0", None).await;
    assert_eq!(code(&v), 20001);
    check.answer("get", "/orders", &v);

    // Machines.
    let v = send(&api, "post", &format!("/machines/{M1}/ping"), None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("post", "/machines/{machine_no}/ping", &v);
    let v = send(&api, "post", "/machines/39999999/ping", None).await;
    assert_eq!(code(&v), 30001);
    check.answer("post", "/machines/{machine_no}/ping", &v);
    let v = send(&api, "get", &format!("/machines/{M1}"), None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("get", "/machines/{machine_no}", &v);
    let v = send(&api, "get", "/machines/39999999", None).await;
    assert_eq!(code(&v), 30001);
    check.answer("get", "/machines/{machine_no}", &v);
    for q in ["", "?online=true", "?online=false"] {
        let v = send(&api, "get", &format!("/machines{q}"), None).await;
        assert_eq!(code(&v), 0, "{v}");
        check.answer("get", "/machines", &v);
    }
    let v = send(&api, "get", "/machines?page_size=101", None).await;
    assert_eq!(code(&v), 20001);
    check.answer("get", "/machines", &v);

    // Events: the failing receiver made them dead; replay one.
    let mut dead = Value::Null;
    for _ in 0..300 {
        dead = send(&api, "get", "/events?status=dead", None).await;
        let has = dead["data"]["events"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["order_id"] == done));
        if has {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check.answer("get", "/events", &dead);
    let v = send(&api, "get", "/events", None).await;
    check.answer("get", "/events", &v);
    let v = send(&api, "get", "/events?status=lost", None).await;
    assert_eq!(code(&v), 20001);
    check.answer("get", "/events", &v);
    rx.fail.store(false, Ordering::SeqCst);
    let event_id = dead["data"]["events"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["order_id"] == done))
        .and_then(|e| e["event_id"].as_str())
        .expect("dead event")
        .to_string();
    let v = send(&api, "post", &format!("/events/{event_id}/replay"), None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("post", "/events/{event_id}/replay", &v);
    let v = send(&api, "post", "/events/evt_nope/replay", None).await;
    assert_eq!(code(&v), 40001);
    check.answer("post", "/events/{event_id}/replay", &v);

    // Merchant settings.
    let v = send(&api, "get", "/merchant", None).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("get", "/merchant", &v);
    let url = format!("http://{rx_addr}/hook2");
    let v = send(&api, "put", "/merchant", Some(json!({ "notify_url": url }))).await;
    assert_eq!(code(&v), 0, "{v}");
    check.answer("put", "/merchant", &v);
    let v = send(&api, "put", "/merchant", Some(json!({ "notify_url": 1 }))).await;
    assert_eq!(code(&v), 20001);
    check.answer("put", "/merchant", &v);

    // Every enveloped route answered a success and an error above.
    let seen = check.seen.lock().expect("seen").clone();
    for (method, path) in ROUTES.iter().filter(|(_, p)| *p != "/openapi.json") {
        for ok in [true, false] {
            assert!(
                seen.contains(&(method.to_string(), path.to_string(), ok)),
                "{method} {path} not exercised with {}",
                if ok { "a success" } else { "an error" }
            );
        }
    }

    // Webhook bodies: the replayed order.completed, and machine.* ones.
    drop(sim);
    wait_until("webhooks delivered", || {
        let hits = rx.hits.lock().expect("hits");
        hits.iter().any(|(_, b)| b["event_id"] == event_id.as_str())
            && hits.iter().any(|(_, b)| b["type"] == "machine.online")
    })
    .await;
    let hits = rx.hits.lock().expect("hits").clone();
    let kinds: BTreeSet<String> = hits
        .iter()
        .filter_map(|(_, b)| b["type"].as_str().map(str::to_string))
        .collect();
    assert!(kinds.contains("order.completed") && kinds.contains("order.dispense_failed"));
    let sig_pattern = doc["webhooks"]["order"]["post"]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "Vendgate-Signature"))
        .map(|p| p["schema"].clone())
        .expect("Vendgate-Signature documented");
    for (sig, body) in &hits {
        check.webhook(body);
        check.validate(
            "Vendgate-Signature",
            &sig_pattern,
            &json!(sig.clone().unwrap_or_default()),
        );
    }

    gw.stop().await;
}

/// Under `http_status = "mirror"` errors come with 4xx/5xx statuses: the
/// document describes those answers too.
#[tokio::test]
async fn mirror_mode_errors_match_the_document() {
    let gw = TestGateway::start_with(|s| {
        s.http.http_status = vendgate::config::HttpStatusMode::Mirror;
    })
    .await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let doc: Value = reqwest::get(format!("{}/openapi.json", api.base))
        .await
        .expect("GET openapi.json")
        .json()
        .await
        .expect("JSON");
    let check = Checker {
        doc,
        seen: Mutex::new(BTreeSet::new()),
    };
    for (method, path, concrete, want) in [
        ("get", "/orders/{order_id}", "/orders/999", 404),
        ("get", "/machines/{machine_no}", "/machines/123", 400),
        ("post", "/orders/{order_id}/pay", "/orders/999/pay", 404),
    ] {
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let r = api
            .http
            .request(m, format!("{}{concrete}", api.base))
            .header("Appid", &api.appid)
            .header("AppSecret", &api.secret)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        assert_eq!(status, want, "{method} {concrete}");
        let body: Value = r.json().await.expect("envelope");
        let range = format!("{}XX", status / 100);
        let schema = &check.doc["paths"][path][method]["responses"][&range]["content"]
            ["application/json"]["schema"];
        assert!(schema.is_object(), "{method} {path}: no {range} answer");
        check.validate(&format!("{method} {path} {status}"), schema, &body);
    }
    gw.stop().await;
}

/// Every code of API.md's error table is in the document's code enum, and
/// the document has no code API.md does not list.
#[tokio::test]
async fn api_md_codes_are_the_documents() {
    let gw = TestGateway::start().await;
    let doc: Value = reqwest::get(format!(
        "http://{}/api/openapi/v1/openapi.json",
        gw.http_addr
    ))
    .await
    .expect("GET openapi.json")
    .json()
    .await
    .expect("JSON");
    let schemas = &doc["components"]["schemas"];
    let mut in_doc: BTreeSet<i64> = schemas["ErrorCode"]["oneOf"]
        .as_array()
        .expect("ErrorCode is a oneOf")
        .iter()
        .map(|c| c["enum"][0].as_i64().expect("one code per entry"))
        .collect();
    in_doc.extend(
        schemas["ResultCode"]["oneOf"]
            .as_array()
            .expect("ResultCode is a oneOf")
            .iter()
            .filter_map(|c| c["enum"][0].as_i64()),
    );
    for c in schemas["ErrorCode"]["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert!(
            c["description"].as_str().is_some_and(|d| d.len() > 10),
            "{c}"
        );
    }

    // The repository's copy of the contract (docs/spec/; `contract_copies_match`
    // checks it against the published one where that is present).
    let api_md = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/spec/API.md");
    let text =
        std::fs::read_to_string(&api_md).unwrap_or_else(|e| panic!("{}: {e}", api_md.display()));
    let table = text
        .split("## Error codes")
        .nth(1)
        .expect("API.md has an error code table");
    let in_md: BTreeSet<i64> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(' ').next())
        .filter_map(|c| c.parse().ok())
        .collect();
    assert!(in_md.len() >= 16, "{in_md:?}");
    assert_eq!(in_md, in_doc);
    gw.stop().await;
}

/// The repository's copies of the contracts (docs/spec/) are the published
/// ones word for word, wherever the published ones sit beside the checkout
/// (`../shared/spec/`, as in this project's CI).
#[test]
fn contract_copies_match() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in ["API.md", "PROTOCOL.md"] {
        let copy = std::fs::read_to_string(root.join("docs/spec").join(name))
            .unwrap_or_else(|e| panic!("docs/spec/{name}: {e}"));
        if let Ok(published) = std::fs::read_to_string(root.join("../shared/spec").join(name)) {
            assert!(
                copy == published,
                "docs/spec/{name} differs from ../shared/spec/{name}: copy the published contract"
            );
        }
    }
}
