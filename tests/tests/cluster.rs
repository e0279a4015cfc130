//! The multi-node `warren dev` cluster and the harness that drives it: every node is its own
//! process that a test can find by name and zone, kill, pause, stop and restart, and the
//! harness leaves nothing behind.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use warren_tests::{ClusterOpts, WarrenDev, assert_broker_serves, pid_alive};

/// Wait until `pred` holds (a hang guard, not a timing assertion).
fn eventually(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_are_named_zoned_and_controlled_one_by_one() {
    let dev = WarrenDev::start_cluster(ClusterOpts::new(3, 3)).unwrap();
    let root = dev.data_dir();

    // Names, zones (round robin) and one URL per compute node on consecutive ports.
    assert_eq!(
        dev.node_names(),
        [
            "storage-0",
            "storage-1",
            "storage-2",
            "compute-0",
            "compute-1",
            "compute-2"
        ]
    );
    for (i, zone) in ["zone-a", "zone-b", "zone-c"].iter().enumerate() {
        assert_eq!(dev.zone_of(&format!("storage-{i}")).unwrap(), *zone);
        assert_eq!(dev.zone_of(&format!("compute-{i}")).unwrap(), *zone);
    }
    assert_eq!(dev.amqp_urls().len(), 3);
    assert_eq!(dev.amqp_url(), dev.amqp_urls()[0]);
    let mut ports = std::collections::BTreeSet::new();
    for url in dev.amqp_urls() {
        // Started with `--amqp-port 0`: a free port each, all different.
        let port: u16 = url
            .strip_prefix("amqp://guest:guest@127.0.0.1:")
            .and_then(|rest| rest.strip_suffix("/%2f"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected URL {url}"));
        assert!(
            port != 0 && ports.insert(port),
            "ports {ports:?} and {port}"
        );
        assert_broker_serves(url).await.unwrap();
    }

    // A storage node restarts again and again from its config, as a child of the harness.
    for _ in 0..2 {
        let before = dev.pid_of("storage-1").unwrap();
        dev.kill("storage-1").unwrap();
        assert!(!dev.is_running("storage-1"));
        assert!(!pid_alive(before));
        dev.restart_node("storage-1").unwrap();
        assert!(dev.is_running("storage-1"));
        assert_ne!(dev.pid_of("storage-1").unwrap(), before);
    }
    assert!(dev.restart_node("storage-1").is_err(), "a running node");

    // `warren ctl nodes` lists every node with its zone.
    let ids_of = |name: &str| -> Vec<String> {
        let rows = dev.ctl_json(&["nodes", "--sample-ms", "300"]).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["name"] == name)
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let rows = dev.ctl_json(&["nodes"]).unwrap();
    for name in dev.node_names() {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} missing from {rows}"));
        assert_eq!(row["zone"], dev.zone_of(&name).unwrap().as_str(), "{name}");
    }

    // A wiped storage node gets a fresh data directory and joins as a new identity.
    let old_ids = ids_of("storage-0");
    dev.stop_node("storage-0").unwrap();
    let data = dev.node_info("storage-0").unwrap().data_dir.unwrap();
    let marker = data.join("harness-marker");
    std::fs::write(&marker, b"old identity").unwrap();
    dev.wipe_and_restart("storage-0").unwrap();
    assert!(dev.is_running("storage-0"));
    assert!(!marker.exists());
    eventually("storage-0 registered anew", Duration::from_secs(30), || {
        ids_of("storage-0").iter().any(|id| !old_ids.contains(id))
    });

    // Pause and resume a compute node; restart one after SIGKILL on the same URL.
    dev.pause("compute-2").unwrap();
    assert!(dev.is_running("compute-2"), "a paused node still runs");
    dev.resume("compute-2").unwrap();
    assert_broker_serves(&dev.url_of("compute-2").unwrap())
        .await
        .unwrap();
    dev.kill("compute-0").unwrap();
    dev.restart_node("compute-0").unwrap();
    dev.wait_member("compute-0", Duration::from_secs(30))
        .unwrap();
    assert_broker_serves(dev.amqp_url()).await.unwrap();

    // A zone goes down as a whole; the other zones keep running.
    let killed = dev.kill_zone("zone-c").unwrap();
    assert_eq!(killed, ["storage-2", "compute-2"]);
    for name in dev.node_names() {
        assert_eq!(dev.is_running(&name), !killed.contains(&name), "{name}");
    }

    // Dropping the cluster stops every process it ran, restarted ones included, and
    // removes its directory.
    let pids: Vec<u32> = dev
        .node_names()
        .iter()
        .map(|n| dev.pid_of(n).unwrap())
        .chain(dev.process_group())
        .collect();
    drop(dev);
    eventually("every process gone", Duration::from_secs(30), || {
        pids.iter().all(|pid| !pid_alive(*pid))
    });
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn impossible_cluster_shape_is_refused_by_flag() {
    let opts = ClusterOpts {
        strict: true,
        ..ClusterOpts::new(1, 3)
    };
    let err = match WarrenDev::start_cluster(opts) {
        Ok(_) => panic!("strict replication with one storage node per zone started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--storage-per-zone"), "{err}");
}

#[test]
fn taken_amqp_port_is_refused_by_node_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    // compute-1 would listen on port + 1; the taken port is compute-0's.
    let out = std::process::Command::new(warren_tests::warren_bin().unwrap())
        .args(["dev", "--compute", "2", "--amqp-port", &port.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("AMQP port {port} for compute-0 is not free")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_cluster_spreads_six_storage_nodes_and_confirms_durable_messages() {
    use futures_lite::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;

    let opts = ClusterOpts {
        storage_per_zone: 2,
        strict: true,
        ..ClusterOpts::new(1, 3)
    };
    let dev = tokio::task::spawn_blocking(move || WarrenDev::start_cluster(opts))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dev.storage_names().len(), 6);
    for (i, name) in dev.storage_names().iter().enumerate() {
        let zone = ["zone-a", "zone-b", "zone-c"][i % 3];
        assert_eq!(dev.zone_of(name).unwrap(), zone, "{name}");
    }
    let compute_config =
        std::fs::read_to_string(dev.node_info("compute-0").unwrap().config).unwrap();
    let replication: Vec<&str> = compute_config
        .lines()
        .skip_while(|l| l.trim() != "[replication]")
        .take(4)
        .collect();
    assert_eq!(
        replication,
        [
            "[replication]",
            "write_quorum = 6",
            "ack_quorum = 4",
            "per_zone = 2"
        ]
    );

    let work = async {
        let conn =
            lapin::Connection::connect(dev.amqp_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = warren_tests::unique_name("strict");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        for i in 0..10u32 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    i.to_string().as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "message {i}: {confirm:?}");
        }
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "strict".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for i in 0..10u32 {
            let delivery = consumer.next().await.unwrap().unwrap();
            assert_eq!(delivery.data, i.to_string().as_bytes());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .expect("strict round trip did not finish");
}
