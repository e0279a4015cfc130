//! Fault injection on a multi-process cluster, judged by the queue checker
//! (`warren_tests::checker`): producers publish unique persistent messages with confirms,
//! consumers ack, a fault is injected and healed, the queues are drained, and every message
//! is classified. Each scenario passes only with zero confirmed-and-lost messages, every queue
//! drained to empty, and duplicates only from abandoned deliveries.
//!
//! Each scenario prints its report as one line of JSON (`checker report: {...}`) and, when
//! `WARREN_RELIABILITY_DIR` is set, writes it to `<dir>/<scenario>.json`
//! (`scripts/reliability.sh` builds `docs/reliability.md` from those files).
//!
//! The network partition drops, on loopback, every packet sent by the isolated zone's
//! processes (nftables `meta cgroup` on a net_cls cgroup they are moved into) and every packet
//! sent to a port their sockets use; see [`Partition`].
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use warren_tests::checker::{Report, Workload, WorkloadConfig, classify};
use warren_tests::{ClusterOpts, WarrenDev, unique_name, warren_bin};

/// The environment variable naming a directory that receives one JSON report per scenario.
const REPORT_DIR_ENV: &str = "WARREN_RELIABILITY_DIR";

/// Confirms to see before a fault (load is established) and after healing (publishing
/// resumed); at the default rate of 2 x 100/s each takes about 2 s.
const WARMUP: u64 = 300;

/// Upper bound for the waits above: reaching it means publishing did not resume, which
/// fails the scenario (a liveness guard, not a timing assertion).
const PROGRESS_LIMIT: Duration = Duration::from_secs(60);

/// Upper bound on a whole scenario, so a hang fails instead of blocking CI.
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

/// The compute lease the cluster runs with (compute config `cluster.lease_ms`).
const LEASE: Duration = Duration::from_millis(3000);

/// A cluster shared with blocking harness calls run off the async workers.
type Dev = Arc<WarrenDev>;

/// Start a cluster of the given shape (a blocking call, off the async workers).
async fn cluster(opts: ClusterOpts) -> Dev {
    let dev = tokio::task::spawn_blocking(move || WarrenDev::start_cluster(opts))
        .await
        .unwrap()
        .unwrap();
    Arc::new(dev)
}

/// Run a blocking harness action (kill, restart, ...) off the async workers, so that confirm
/// timestamps are not delayed by it.
async fn harness<T: Send + 'static>(
    dev: &Dev,
    what: &str,
    f: impl FnOnce(&WarrenDev) -> anyhow::Result<T> + Send + 'static,
) -> T {
    let dev = dev.clone();
    let what_owned = what.to_string();
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || f(&dev))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{what_owned}: {e:#}"));
    eprintln!("harness: {what} took {:?}", started.elapsed());
    out
}

/// The workload every scenario runs: two producers and two consumers over the cluster's
/// compute nodes, client `i` starting at compute node `i mod n`.
async fn start_workload(dev: &Dev, scenario: &str) -> Workload {
    start_workload_on(dev, scenario, &unique_name(scenario)).await
}

/// [`start_workload`] on a queue that `owner` owns (when the cluster has membership, and
/// with it rendezvous ownership), so that the fault hits the queue's owner.
async fn start_workload_owned(dev: &Dev, scenario: &str, owner: &str) -> Workload {
    let queue = if has_membership() {
        queue_owned_by(dev, scenario, owner)
    } else {
        unique_name(scenario)
    };
    eprintln!("{scenario}: queue {queue}, meant to be owned by {owner}");
    start_workload_on(dev, scenario, &queue).await
}

/// [`start_workload`] on a given queue.
async fn start_workload_on(dev: &Dev, scenario: &str, queue: &str) -> Workload {
    start_workload_queues(dev, scenario, vec![queue.to_string()]).await
}

/// [`start_workload`] with messages spread over several queues.
async fn start_workload_queues(dev: &Dev, scenario: &str, queues: Vec<String>) -> Workload {
    let mut config = WorkloadConfig::new(dev.amqp_urls().to_vec(), &queues[0]);
    config.queues = queues;
    let workload = Workload::start(config).await.unwrap();
    assert!(
        workload.wait_for_confirms(WARMUP, PROGRESS_LIMIT).await,
        "{scenario}: the workload never got going ({} confirms)",
        workload.confirmed()
    );
    workload
}

/// Wait until publishing makes progress again (after a fault, or after healing it).
async fn progress(workload: &Workload, scenario: &str, when: &str) {
    assert!(
        workload.wait_for_confirms(WARMUP, PROGRESS_LIMIT).await,
        "{scenario}: publishing did not resume {when} ({} confirms in all)",
        workload.confirmed()
    );
}

/// Stop the workload, drain, classify, publish the report, and assert the pass condition.
async fn conclude(scenario: &str, workload: Workload) -> Report {
    let history = workload.finish().await;
    let report = classify(scenario, &history);
    let json = report.to_json();
    eprintln!("checker report: {json}");
    if let Some(dir) = std::env::var_os(REPORT_DIR_ENV) {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{scenario}.json")), format!("{json}\n")).unwrap();
    }
    report.assert_passed();
    report
}

async fn bounded(scenario: &str, test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(SCENARIO_LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("{scenario} did not finish within {SCENARIO_LIMIT:?}"));
}

/// The help text of a `warren` subcommand (empty if it has none).
fn help(args: &[&str]) -> String {
    let out = std::process::Command::new(warren_bin().unwrap())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Several compute nodes in one cluster (`warren dev --compute N`).
fn has_multi_compute() -> bool {
    help(&["dev"]).contains("--compute")
}

/// Compute membership with leases and eviction (`warren ctl` lists and evicts members).
fn has_membership() -> bool {
    help(&[]).lines().any(|l| l.trim_start().starts_with("ctl"))
}

/// Say loudly why a scenario cannot run on this build, and skip it (with a report that says
/// so, for `scripts/reliability.sh`).
fn skip(scenario: &str, missing: &str) {
    let reason = format!("this build lacks {missing}");
    eprintln!("SKIPPED {scenario}: {reason}");
    if let Some(dir) = std::env::var_os(REPORT_DIR_ENV) {
        let json = serde_json::json!({ "scenario": scenario, "skipped": reason });
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{scenario}.json")), format!("{json}\n")).unwrap();
    }
}

// ---- the checker itself, end to end -------------------------------------------------------

/// Without faults the workload passes and sees no duplicate and no failed connection. With
/// `WARREN_TEST_AMQP_URL` this runs against that broker (e.g. RabbitMQ), which proves the
/// workload's expectations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checker_passes_without_faults() {
    const NAME: &str = "no-fault";
    bounded(NAME, async {
        let broker = warren_tests::Broker::from_env_or_start().unwrap();
        let config = WorkloadConfig::new(vec![broker.url().to_string()], &unique_name(NAME));
        let workload = Workload::start(config).await.unwrap();
        progress(&workload, NAME, "at all").await;
        let report = classify(NAME, &workload.finish().await);
        eprintln!("checker report: {}", report.to_json());
        report.assert_passed();
        assert!(report.confirmed >= WARMUP, "{}", report.to_json());
        assert_eq!(report.duplicated, 0, "{}", report.to_json());
        assert!(report.failed_sessions.is_empty(), "{}", report.to_json());
    })
    .await;
}

/// The checker fails a run that loses confirmed messages: confirmed messages purged from the
/// queue behind the workload's back are reported lost. Also runs against
/// `WARREN_TEST_AMQP_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checker_reports_purged_confirmed_messages_as_lost() {
    const NAME: &str = "purged";
    bounded(NAME, async {
        use lapin::options::QueuePurgeOptions;
        let broker = warren_tests::Broker::from_env_or_start().unwrap();
        let queue = unique_name(NAME);
        let mut config = WorkloadConfig::new(vec![broker.url().to_string()], &queue);
        // No consumer, so confirmed messages wait in the queue to be purged; the final
        // basic.get drain collects what is published after the purge.
        config.consumers = 0;
        config.drain_silence = Duration::from_millis(500);
        config.drain_limit = Duration::from_secs(3);
        let workload = Workload::start(config).await.unwrap();
        progress(&workload, NAME, "before the purge").await;
        let conn = lapin::Connection::connect(broker.url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let purged = channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        conn.close(200, "bye".into()).await.unwrap();
        progress(&workload, NAME, "after the purge").await;
        let report = classify(NAME, &workload.finish().await);
        eprintln!("purged {purged}; checker report: {}", report.to_json());
        assert!(purged > 0);
        assert!(!report.passed(), "a run that lost {purged} messages passed");
        assert!(
            report.confirmed_lost > 0 && report.confirmed_lost <= u64::from(purged),
            "purged {purged}, report {}",
            report.to_json()
        );
        assert!(
            report.drained && report.unexpected == 0,
            "{}",
            report.to_json()
        );
    })
    .await;
}

// ---- storage faults ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_node_kill9() {
    const NAME: &str = "storage-node-kill9";
    bounded(NAME, async {
        let dev = cluster(ClusterOpts::new(1, 3)).await;
        let workload = start_workload(&dev, NAME).await;
        workload.fault("kill -9 storage-1");
        harness(&dev, "kill storage-1", |d| d.kill("storage-1")).await;
        progress(&workload, NAME, "after the kill").await;
        harness(&dev, "restart storage-1", |d| d.restart_node("storage-1")).await;
        workload.heal("storage-1 restarted");
        progress(&workload, NAME, "after the restart").await;
        conclude(NAME, workload).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_node_wiped_disk() {
    const NAME: &str = "storage-node-wiped-disk";
    bounded(NAME, async {
        let dev = cluster(ClusterOpts::new(1, 3)).await;
        let workload = start_workload(&dev, NAME).await;
        workload.fault("kill -9 storage-1, wipe its disk, restart it");
        harness(&dev, "kill storage-1", |d| d.kill("storage-1")).await;
        harness(&dev, "wipe and restart storage-1", |d| {
            d.wipe_and_restart("storage-1")
        })
        .await;
        workload.heal("storage-1 back with an empty disk");
        progress(&workload, NAME, "after the wiped node rejoined").await;
        conclude(NAME, workload).await;
    })
    .await;
}

// ---- zone faults ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zone_loss() {
    const NAME: &str = "zone-loss";
    if !has_multi_compute() {
        return skip(NAME, "several compute nodes (`warren dev --compute`)");
    }
    bounded(NAME, async {
        // compute-0 in zone-a, compute-1 in zone-b: losing zone-b loses storage-1 and
        // compute-1 and every client connected to compute-1.
        let dev = cluster(ClusterOpts::new(2, 3)).await;
        let workload = start_workload_owned(&dev, NAME, "compute-1").await;
        workload.fault("kill -9 zone-b (storage-1, compute-1)");
        let killed = harness(&dev, "kill zone-b", |d| d.kill_zone("zone-b")).await;
        assert_eq!(killed.len(), 2, "zone-b held {killed:?}");
        progress(&workload, NAME, "after losing zone-b").await;
        harness(&dev, "restart zone-b", move |d| {
            for name in &killed {
                d.restart_node(name)?;
            }
            Ok(())
        })
        .await;
        workload.heal("zone-b restarted");
        progress(&workload, NAME, "after zone-b came back").await;
        conclude(NAME, workload).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zone_partition() {
    const NAME: &str = "zone-partition";
    if !has_multi_compute() {
        return skip(NAME, "several compute nodes (`warren dev --compute`)");
    }
    bounded(NAME, async {
        let dev = cluster(ClusterOpts::new(2, 3)).await;
        let workload = start_workload_owned(&dev, NAME, "compute-1").await;
        let isolated_url = dev.url_of("compute-1").unwrap();
        let isolated = ["storage-1", "compute-1"];
        let pids: Vec<u32> = isolated.iter().map(|n| dev.pid_of(n).unwrap()).collect();
        workload.fault("partition zone-b (storage-1, compute-1) from the rest");
        let partition = Partition::isolate(&pids).unwrap();
        progress(&workload, NAME, "during the partition").await;
        // Long enough for leases to lapse on both sides.
        tokio::time::sleep(LEASE * 2).await;
        drop(partition);
        workload.heal("partition healed");
        progress(&workload, NAME, "after healing").await;
        let report = conclude(NAME, workload).await;
        // Proof that the cut was real: the clients of the isolated compute node lost it.
        assert!(
            report.failures_at(&isolated_url) > 0,
            "no client of the isolated compute-1 noticed the partition: report {}",
            report.to_json()
        );
    })
    .await;
}

// ---- compute faults ------------------------------------------------------------------------

/// The active compute members (name, id) as `warren ctl nodes` lists them.
fn compute_members(dev: &WarrenDev) -> Vec<(String, warren_common::NodeId)> {
    let out = std::process::Command::new(warren_bin().unwrap())
        .arg("ctl")
        .arg("--data-dir")
        .arg(dev.data_dir())
        .args(["nodes", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warren ctl nodes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    nodes
        .iter()
        .filter(|n| n["role"] == "compute" && n["state"] == "active")
        .map(|n| {
            let id = n["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap();
            (
                n["name"].as_str().unwrap().to_string(),
                warren_common::NodeId(id),
            )
        })
        .collect()
}

/// A fresh queue name whose owner, by rendezvous hashing over the live compute members (as
/// every compute node computes it), is `owner`.
fn queue_owned_by(dev: &WarrenDev, scenario: &str, owner: &str) -> String {
    use warren_compute::cluster::ownership::{queue_key, rendezvous};
    let members = compute_members(dev);
    assert!(
        members.len() >= 2,
        "{scenario}: expected every compute node to be a member: {members:?}"
    );
    let want = members
        .iter()
        .find(|(name, _)| name == owner)
        .unwrap_or_else(|| panic!("{owner} is not a member: {members:?}"))
        .1;
    loop {
        let queue = unique_name(scenario);
        let ids = members.iter().map(|(_, id)| id);
        if rendezvous(ids, &queue_key("/", &queue)) == Some(want) {
            return queue;
        }
    }
}

/// Kill -9 compute-1 under load and restart it, with the workload's queue owned by `owner`.
async fn compute_kill(scenario: &str, owner: &str) {
    let dev = cluster(ClusterOpts::new(2, 3)).await;
    let workload = start_workload_owned(&dev, scenario, owner).await;
    workload.fault(&format!("kill -9 compute-1 ({owner} owns the queue)"));
    harness(&dev, "kill compute-1", |d| d.kill("compute-1")).await;
    progress(&workload, scenario, "after the kill").await;
    harness(&dev, "restart compute-1", |d| d.restart_node("compute-1")).await;
    workload.heal("compute-1 restarted");
    progress(&workload, scenario, "after the restart").await;
    conclude(scenario, workload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compute_node_kill9_owner() {
    const NAME: &str = "compute-node-kill9-owner";
    if !has_multi_compute() || !has_membership() {
        return skip(NAME, "several compute nodes with membership (`warren ctl`)");
    }
    bounded(NAME, compute_kill(NAME, "compute-1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compute_node_kill9_non_owner() {
    const NAME: &str = "compute-node-kill9-non-owner";
    if !has_multi_compute() || !has_membership() {
        return skip(NAME, "several compute nodes with membership (`warren ctl`)");
    }
    bounded(NAME, compute_kill(NAME, "compute-0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compute_node_paused_beyond_its_lease() {
    const NAME: &str = "compute-node-paused-beyond-its-lease";
    if !has_multi_compute() {
        return skip(NAME, "several compute nodes (`warren dev --compute`)");
    }
    if !has_membership() {
        return skip(NAME, "compute membership with leases (`warren ctl`)");
    }
    bounded(NAME, async {
        let dev = cluster(ClusterOpts::new(2, 3)).await;
        let workload = start_workload_owned(&dev, NAME, "compute-1").await;
        let paused_url = dev.url_of("compute-1").unwrap();
        workload.fault("SIGSTOP compute-1 beyond its lease");
        harness(&dev, "pause compute-1", |d| d.pause("compute-1")).await;
        tokio::time::sleep(LEASE * 2).await;
        harness(&dev, "resume compute-1", |d| d.resume("compute-1")).await;
        workload.heal("SIGCONT compute-1");
        progress(&workload, NAME, "after the pause").await;
        let report = conclude(NAME, workload).await;
        assert!(
            report.failures_at(&paused_url) > 0,
            "no client of the paused compute-1 saw an error: report {}",
            report.to_json()
        );
    })
    .await;
}

// ---- everything, one by one ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart() {
    const NAME: &str = "rolling-restart";
    let compute = if has_multi_compute() { 2 } else { 1 };
    bounded(NAME, async {
        let dev = cluster(ClusterOpts::new(compute, 3)).await;
        // One queue per compute node, each owned by it, so every compute restart moves one.
        let queues = if has_membership() {
            dev.compute_names()
                .iter()
                .map(|owner| queue_owned_by(&dev, NAME, owner))
                .collect()
        } else {
            vec![unique_name(NAME)]
        };
        let workload = start_workload_queues(&dev, NAME, queues).await;
        for name in dev.node_names() {
            workload.fault(&format!("restart {name}"));
            let node = name.clone();
            harness(&dev, "stop and restart", move |d| {
                d.stop_node(&node)?;
                d.restart_node(&node)
            })
            .await;
            workload.heal(&format!("{name} back"));
            progress(&workload, NAME, &format!("after restarting {name}")).await;
        }
        conclude(NAME, workload).await;
    })
    .await;
}

// ---- the partition -------------------------------------------------------------------------

/// A network partition on loopback that cuts a set of processes off from everything else,
/// removed when dropped (also on panic).
///
/// The processes are moved into a fresh net_cls cgroup with a unique class id (which also
/// retags the sockets they already hold). An nftables table of its own marks, at the output
/// hook, every packet sent from such a socket and records its source port; at the input hook
/// (a packet on loopback no longer knows its socket there) it drops every marked packet not
/// addressed to another isolated port, and every unmarked packet addressed to one. Dropping
/// at input, not output, makes the sender see silence, as on a real network, instead of an
/// immediate EPERM.
struct Partition {
    table: String,
    cgroup: PathBuf,
    pids: Vec<u32>,
}

const NET_CLS: &str = "/sys/fs/cgroup/net_cls";

impl Partition {
    fn isolate(pids: &[u32]) -> anyhow::Result<Partition> {
        use anyhow::Context;
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let me = std::process::id();
        let name = format!("warren_partition_{me}_{n}");
        // net_cls class ids are major:minor; a major of our own and a per-partition minor.
        let classid: u32 = 0x5a57_0000 | ((me.wrapping_mul(31).wrapping_add(n)) & 0xffff);
        let mark = classid;
        ensure_net_cls()?;
        remove_stale_partitions();
        let cgroup = PathBuf::from(NET_CLS).join(&name);
        std::fs::create_dir_all(&cgroup).context("creating the net_cls cgroup")?;
        let partition = Partition {
            table: name.clone(),
            cgroup: cgroup.clone(),
            pids: pids.to_vec(),
        };
        std::fs::write(cgroup.join("net_cls.classid"), classid.to_string())
            .context("setting the class id")?;
        let ports = local_ports(pids)?;
        let port_list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let elements = if ports.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {port_list} }}")
        };
        // Output: tag what the isolated processes send, and remember every port they send
        // from (new connections included). Input: the isolated processes still reach each
        // other; nothing else reaches them, and nothing they send reaches anyone else.
        let rules = format!(
            "table inet {name} {{\n\
             set isolated_ports {{ type inet_service; flags dynamic; {elements} }}\n\
             chain output {{\n type filter hook output priority -10; policy accept;\n\
             meta cgroup {classid:#x} meta mark set {mark:#x}\n\
             meta mark {mark:#x} add @isolated_ports {{ tcp sport }}\n\
             meta mark {mark:#x} add @isolated_ports {{ udp sport }}\n }}\n\
             chain input {{\n type filter hook input priority -10; policy accept;\n\
             meta mark {mark:#x} tcp dport @isolated_ports accept\n\
             meta mark {mark:#x} udp dport @isolated_ports accept\n\
             meta mark {mark:#x} drop\n\
             tcp dport @isolated_ports drop\n\
             udp dport @isolated_ports drop\n }}\n}}\n"
        );
        nft_file(&rules).context("installing the partition rules")?;
        for pid in pids {
            // Moving the process retags every socket it holds with the class id.
            std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving pid {pid} into {}", cgroup.display()))?;
        }
        eprintln!(
            "partition {name}: pids {pids:?} cut off (class {classid:#x}, ports {port_list})"
        );
        Ok(partition)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Each step is attempted whatever happened before it.
        let root_procs = PathBuf::from(NET_CLS).join("cgroup.procs");
        let members = std::fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in members
            .split_whitespace()
            .map(str::to_string)
            .chain(self.pids.iter().map(u32::to_string))
        {
            let _ = std::fs::write(&root_procs, &pid);
        }
        let status = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "partition {}: removing the nftables table failed",
                self.table
            );
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        eprintln!("partition {} healed", self.table);
    }
}

/// Remove the tables and cgroups of partitions whose test process died without its Drop
/// (killed by a runner's timeout, say), so a dead run never keeps a zone cut off.
fn remove_stale_partitions() {
    let dead = |name: &str| {
        name.strip_prefix("warren_partition_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(table) = line.strip_prefix("table inet ")
                && dead(table)
            {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", "inet", table])
                    .status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(NET_CLS) {
        let root_procs = PathBuf::from(NET_CLS).join("cgroup.procs");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !dead(&name) {
                continue;
            }
            let procs = std::fs::read_to_string(entry.path().join("cgroup.procs"));
            for pid in procs.unwrap_or_default().split_whitespace() {
                let _ = std::fs::write(&root_procs, pid);
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Mount the net_cls cgroup controller if it is not mounted yet.
fn ensure_net_cls() -> anyhow::Result<()> {
    use anyhow::Context;
    if PathBuf::from(NET_CLS).join("net_cls.classid").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(NET_CLS).context("creating the net_cls mount point")?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup", "-o", "net_cls", "net_cls", NET_CLS])
        .status()
        .context("running mount")?;
    anyhow::ensure!(status.success(), "mounting the net_cls cgroup failed");
    Ok(())
}

fn nft_file(rules: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables: scripts/install-test-deps.sh)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "nft -f failed on:\n{rules}");
    Ok(())
}

/// Every local TCP and UDP port the sockets of these processes are bound to.
fn local_ports(pids: &[u32]) -> anyhow::Result<std::collections::BTreeSet<u16>> {
    use std::collections::{BTreeSet, HashSet};
    let mut inodes = HashSet::new();
    for pid in pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let Ok(target) = std::fs::read_link(fd?.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                && port != 0
            {
                ports.insert(port);
            }
        }
    }
    Ok(ports)
}
