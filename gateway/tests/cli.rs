//! The real `vendgate` binary: `serve` on port 0, provisioning from a second
//! process against the running gateway's database (no restart), a machine
//! connecting with the printed secret, `machine list`, secrets kept out of
//! logs, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vendgate");
const DEADLINE: Duration = Duration::from_secs(20);

fn vendgate(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run vendgate");
    assert!(
        out.status.success(),
        "vendgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn value(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
        .to_string()
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn provision_connect_list_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vendgate serve");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = serve.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log_w = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("vendgate listening: mqtt=") {
                let mqtt = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = addr_tx.send(mqtt);
            }
            log_w.lock().unwrap().push_str(&line);
            log_w.lock().unwrap().push('\n');
        }
    });
    let mqtt = addr_rx
        .recv_timeout(DEADLINE)
        .expect("gateway reports its MQTT address");

    // Provision while it runs, from other processes.
    let merchant = vendgate(dir.path(), &["merchant", "add", "--name", "shop"]);
    let appid = value(&merchant, "appid");
    let appsecret = value(&merchant, "appsecret");
    let machine = vendgate(
        dir.path(),
        &[
            "machine",
            "add",
            "--merchant",
            &appid,
            "--machine-no",
            "00000042",
        ],
    );
    let secret = value(&machine, "secret");
    let service = vendgate(dir.path(), &["service", "add", "--name", "ops"]);
    let svc_password = value(&service, "password");
    assert_eq!(secret.len(), 32, "128-bit secret, hex");

    let listed = vendgate(dir.path(), &["machine", "list"]);
    assert!(
        listed.contains("00000042") && listed.contains("offline"),
        "{listed}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A wrong secret first: refused, and logged without the secret.
        let (port_host, port) = mqtt.rsplit_once(':').unwrap();
        let mut bad = rumqttc::MqttOptions::new("00000042", port_host, port.parse().unwrap());
        bad.set_credentials("00000042", "wrong-secret-value-0123456789abcd");
        let (_c, mut el) = rumqttc::AsyncClient::new(bad, 10);
        let refused = el.poll().await;
        assert!(refused.is_err(), "wrong secret refused: {refused:?}");

        let mut o = rumqttc::MqttOptions::new("00000042", port_host, port.parse().unwrap());
        o.set_credentials("00000042", &secret);
        let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
        let ev = el.poll().await.expect("connects with the printed secret");
        assert!(matches!(
            ev,
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))
        ));
        let dir = dir.path().to_path_buf();
        // Keep the connection alive while another process lists machines.
        let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            wait("machine list shows online", || {
                vendgate(&d, &["machine", "list"]).contains("online\t")
            })
        })
        .await
        .unwrap();
        poller.abort();
    });

    // SIGTERM: stops within a bounded time with exit code 0.
    let pid = serve.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = serve.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < DEADLINE, "gateway did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    reader.join().unwrap();
    let listed = vendgate(dir.path(), &["machine", "list"]);
    assert!(
        listed.contains("offline"),
        "offline after shutdown: {listed}"
    );

    let log = log.lock().unwrap().clone();
    assert!(log.contains("MQTT CONNECT refused"), "refusal logged");
    for s in [
        secret.as_str(),
        appsecret.as_str(),
        svc_password.as_str(),
        "wrong-secret-value-0123456789abcd",
    ] {
        assert!(!log.contains(s), "a secret appears in the gateway's log");
    }
}
