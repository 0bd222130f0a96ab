//! `vendgate demo`: the gateway on embedded defaults with a demo merchant and
//! a few simulated machines in the same process, and a ready-to-paste `curl`
//! that places an order. State lives in a throwaway directory.

use std::time::Duration;

use anyhow::Context;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;
use vendgate_sim::{SimConfig, SimMachine};

use crate::app::Gateway;
use crate::config::Settings;
use crate::secrets::{generate_appid, generate_secret, SecretHash};
use crate::storage::{NewMachine, NewMerchant};

/// Machines the demo simulates.
const MACHINES: [&str; 3] = ["10000001", "10000002", "10000003"];

pub async fn run(
    mut settings: Settings,
    shutdown_signal: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vendgate-demo-")
        .tempdir()
        .context("creating the demo data directory")?;
    settings.data_dir = dir.path().to_path_buf();
    settings.database_url.clear();
    // A throwaway operator credential so the dashboard works out of the box.
    if settings.operator.username.is_empty() || settings.operator.password.is_empty() {
        settings.operator.username = "demo".into();
        settings.operator.password = generate_secret();
    }
    let (op_user, op_pass) = (
        settings.operator.username.clone(),
        settings.operator.password.clone(),
    );
    let gateway = Gateway::build(settings).await?;
    let h = gateway.handle();
    let (mqtt, http) = (gateway.mqtt_addr(), gateway.http_addr());
    let run = tokio::spawn(gateway.run());

    let appid = generate_appid();
    let appsecret = generate_secret();
    h.store
        .create_merchant(NewMerchant {
            name: "demo".into(),
            notify_url: None,
            appid: appid.clone(),
            appsecret_hash: SecretHash::new(&appsecret),
            appsecret_enc: Some(h.webhook_key.encrypt(&appid, &appsecret)),
        })
        .await?;
    let mut sims = Vec::new();
    for m in MACHINES {
        let machine_no: MachineNo = m.parse()?;
        let secret = generate_secret();
        h.store
            .create_machine(NewMachine {
                machine_no,
                merchant_appid: appid.clone(),
                secret_hash: SecretHash::new(&secret),
            })
            .await?;
        let mut c = SimConfig::new(format!("127.0.0.1:{}", mqtt.port()), machine_no, secret);
        c.inventory = vec![
            InventoryItem {
                product_id: 1,
                stock: 20,
                price: 350,
            },
            InventoryItem {
                product_id: 2,
                stock: 20,
                price: 200,
            },
        ];
        sims.push(SimMachine::spawn(c));
    }
    for s in &sims {
        s.wait_ready(Duration::from_secs(10)).await;
    }
    let base = format!("http://127.0.0.1:{}/api/openapi/v1", http.port());
    println!(
        "vendgate demo: mqtt={mqtt} http={http} data={}",
        dir.path().display()
    );
    println!("merchant: appid={appid} appsecret={appsecret}");
    println!("machines online: {}", MACHINES.join(", "));
    println!();
    println!("Place an order:");
    println!(
        "  curl -s -X POST {base}/orders -H 'Appid: {appid}' -H 'AppSecret: {appsecret}' \\\n       -d '{{\"machine_no\":\"10000001\",\"products\":[{{\"product_id\":1,\"quantity\":1}}]}}'"
    );
    println!("Then look at it (use the order_id from the answer):");
    println!("  curl -s {base}/orders/ORDER_ID -H 'Appid: {appid}' -H 'AppSecret: {appsecret}'");
    println!("Machines:");
    println!("  curl -s {base}/machines -H 'Appid: {appid}' -H 'AppSecret: {appsecret}'");
    println!();
    println!("Dashboard (user {op_user}, password {op_pass}):");
    println!("  http://127.0.0.1:{}/dashboard", http.port());
    println!();
    println!("Ctrl-C stops the demo.");

    shutdown_signal.await;
    for s in &sims {
        s.shutdown().await;
    }
    h.shutdown.cancel();
    run.await.context("gateway task")??;
    Ok(())
}
