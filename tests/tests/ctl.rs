//! `warren ctl` against real `warren dev` clusters: it lists every node of both roles, and
//! an eviction (by hand, or by lease after a SIGSTOP) makes the compute node drop its
//! clients with 320 CONNECTION_FORCED and come back under a new generation, serving again.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use warren_tests::{ClusterOpts, WarrenDev, warren_bin};

/// A hang guard for things that take a few lease periods, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(90);

fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(warren_bin().unwrap())
        .arg("ctl")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn nodes(dir: &Path) -> Vec<Value> {
    let out = ctl(dir, &["nodes", "--json", "--sample-ms", "1500"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn node<'a>(rows: &'a [Value], name: &str) -> Option<&'a Value> {
    // A name may have several identities (a wiped storage node); the live one matters.
    rows.iter()
        .filter(|r| r["name"] == name)
        .max_by_key(|r| r["generation"].as_u64())
}

fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{what}: not reached in {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait for the broker to close `conn`; returns the reply code.
async fn closed_by_broker(
    events: &mut (impl futures_lite::Stream<Item = lapin::Event> + Unpin),
) -> u16 {
    tokio::time::timeout(LIMIT, async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event
                && let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
            {
                return amqp.get_id();
            }
        }
        0
    })
    .await
    .expect("the client was never disconnected")
}

/// A durable queue takes a confirmed persistent message and gives it back.
async fn serves(url: &str, queue: &str) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the confirmed message");
    assert_eq!(&got.delivery.data[..], b"m");
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_the_cluster_and_evicts_a_compute_node_that_comes_back() {
    let dev = WarrenDev::start().unwrap();
    let dir = dev.data_dir();

    let rows = eventually("every node renewing", || {
        let rows = nodes(&dir);
        rows.iter()
            .all(|r| r["state"] == "active" && r["renewing"] == true)
            .then_some(rows)
    });
    let roles: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["role"].as_str().unwrap(), r["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("compute", "compute-0"),
            ("storage", "storage-0"),
            ("storage", "storage-1"),
            ("storage", "storage-2"),
        ]
    );
    let compute = node(&rows, "compute-0").unwrap();
    assert_eq!(compute["generation"], 1);
    assert_eq!(compute["zone"], "zone-a");
    let amqp = compute["addresses"]["amqp"].as_str().unwrap();
    assert!(
        dev.amqp_url().contains(amqp),
        "{amqp} vs {}",
        dev.amqp_url()
    );
    for (name, zone) in [
        ("storage-0", "zone-a"),
        ("storage-1", "zone-b"),
        ("storage-2", "zone-c"),
    ] {
        assert_eq!(node(&rows, name).unwrap()["zone"], zone);
    }

    // Any node's config works as well as the dev data directory.
    let out = Command::new(warren_bin().unwrap())
        .args(["ctl", "--config"])
        .arg(dir.join("config").join("storage-1.toml"))
        .args(["nodes", "--json", "--sample-ms", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .len(),
        4
    );

    let conn = Connection::connect(dev.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let mut events = conn.events_listener();
    let _ch = conn.create_channel().await.unwrap();

    let out = ctl(&dir, &["evict", "compute-0", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let did: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&did["name"], &did["from_generation"], &did["generation"]),
        (&Value::from("compute-0"), &Value::from(1), &Value::from(2))
    );

    assert_eq!(
        closed_by_broker(&mut events).await,
        320,
        "CONNECTION_FORCED"
    );
    eventually("compute-0 back with a fresh generation", || {
        let rows = nodes(&dir);
        let c = node(&rows, "compute-0")?;
        (c["state"] == "active" && c["generation"] == 3).then_some(())
    });
    serves(dev.amqp_url(), "after-evict").await;

    // A restart keeps the identity (one record per name) and takes the next generation.
    dev.kill("compute-0").unwrap();
    dev.restart_node("compute-0").unwrap();
    let rows = eventually("compute-0 restarted", || {
        let rows = nodes(&dir);
        let c = node(&rows, "compute-0")?;
        (c["state"] == "active" && c["generation"] == 4).then_some(rows)
    });
    assert_eq!(rows.iter().filter(|r| r["name"] == "compute-0").count(), 1);
    assert_eq!(node(&rows, "compute-0").unwrap()["id"], did["id"]);
    serves(dev.amqp_url(), "after-restart").await;

    let out = ctl(&dir, &["evict", "compute-9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compute-9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_compute_node_is_evicted_by_its_peer_and_rejoins_when_resumed() {
    let dev = WarrenDev::start_cluster(ClusterOpts::new(2, 3).lease(200, 1500)).unwrap();
    let dir = dev.data_dir();
    eventually("both compute nodes active", || {
        let rows = nodes(&dir);
        ["compute-0", "compute-1"]
            .iter()
            .all(|n| node(&rows, n).is_some_and(|r| r["state"] == "active"))
            .then_some(())
    });
    let url = dev.amqp_urls()[1].clone();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let mut events = conn.events_listener();

    dev.pause("compute-1").unwrap();
    eventually("compute-0 evicts the paused compute-1", || {
        let rows = nodes(&dir);
        let c = node(&rows, "compute-1")?;
        (c["state"] == "evicted" && c["generation"] == 2).then_some(())
    });
    dev.resume("compute-1").unwrap();

    assert_eq!(
        closed_by_broker(&mut events).await,
        320,
        "CONNECTION_FORCED"
    );
    eventually("compute-1 joins again", || {
        let rows = nodes(&dir);
        let c = node(&rows, "compute-1")?;
        (c["state"] == "active" && c["generation"] == 3).then_some(())
    });
    serves(&url, "after-pause").await;
}
