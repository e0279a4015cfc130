//! Helpers for Warren's cluster-level tests: start real `warren` processes on free ports.
//!
//! Every test either starts its own `warren dev` cluster ([`WarrenDev`]) in a fresh temporary
//! directory, or, when `WARREN_TEST_AMQP_URL` is set and the test needs no process control,
//! runs against that broker instead ([`Broker::from_env_or_start`]). Pointing the suite at
//! RabbitMQ that way proves the expectations themselves are right.

pub mod checker;
pub mod raw;

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// The environment variable that points client tests at an already running broker.
pub const AMQP_URL_ENV: &str = "WARREN_TEST_AMQP_URL";

/// The environment variable that overrides the `warren` binary under test.
pub const WARREN_BIN_ENV: &str = "WARREN_BIN";

/// How long `warren dev` gets to print its AMQP URL.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a stopped cluster gets to exit after SIGTERM before it is killed (the guard
/// script waits 15 s itself).
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How long a node restarted by the harness gets to listen again.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Pick a free loopback port (released before use: a small race tests accept).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// The `warren` binary under test: `$WARREN_BIN`, or `target/debug/warren` of this workspace.
pub fn warren_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(WARREN_BIN_ENV) {
        return Ok(PathBuf::from(bin));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join("warren");
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build -p warren` or set {WARREN_BIN_ENV}",
            bin.display()
        );
    }
    Ok(bin)
}

/// The URL with an explicit vhost: by the AMQP URI spec `amqp://host:port/` names the vhost
/// `""`, which no broker has, while `amqp://host:port` names the default vhost `/`. A URL
/// whose path is a lone `/` is read as meaning the default vhost.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        None => format!("{url}/%2f"),
        Some(i) if after_scheme + i + 1 == url.len() => format!("{url}%2f"),
        Some(_) => url.to_string(),
    }
}

/// `host:port` of an `amqp://user:pass@host:port/vhost` URL.
pub fn amqp_addr(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("amqp://")
        .with_context(|| format!("not an amqp:// URL: {url}"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    if host_port.contains(':') {
        Ok(host_port.to_string())
    } else {
        Ok(format!("{host_port}:5672"))
    }
}

/// Send `signal` (a name such as `KILL`) to one process, or with `group` to its process group.
pub fn send_signal(pid: u32, signal: &str, group: bool) -> anyhow::Result<()> {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(&target)
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {target} failed ({status})");
    }
    Ok(())
}

/// True while process `pid` exists and is no zombie.
pub fn pid_alive(pid: u32) -> bool {
    alive(pid, false)
}

/// True while process `pid` (or, with `group`, any member of its group) exists. A zombie
/// (killed, not yet reaped by its parent) counts as gone.
fn alive(pid: u32, group: bool) -> bool {
    if !group {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name, which may contain spaces.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            return state != Some("Z");
        }
        return false;
    }
    send_signal(pid, "0", group).is_ok()
}

/// The shape of a `warren dev` cluster ([`WarrenDev::start_cluster`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOpts {
    /// Compute nodes (compute-i runs in zone i mod `zones`).
    pub compute: usize,
    /// Zones (zone-a, zone-b, ...).
    pub zones: usize,
    /// Storage nodes per zone.
    pub storage_per_zone: usize,
    /// The strict replication profile (six copies, two per zone, ack four).
    pub strict: bool,
    /// Overrides of every compute node's config: (dotted key, TOML value), e.g.
    /// `("cluster.lease_ms", "2000")`.
    pub compute_config: Vec<(String, String)>,
}

impl Default for ClusterOpts {
    /// What `warren dev` runs without flags: one compute node, three zones, one storage node
    /// per zone.
    fn default() -> Self {
        ClusterOpts {
            compute: 1,
            zones: 3,
            storage_per_zone: 1,
            strict: false,
            compute_config: Vec::new(),
        }
    }
}

impl ClusterOpts {
    /// `compute` compute nodes over `zones` zones, one storage node per zone.
    pub fn new(compute: usize, zones: usize) -> Self {
        ClusterOpts {
            compute,
            zones,
            ..ClusterOpts::default()
        }
    }

    /// Add one compute config override (dotted key, TOML value).
    pub fn compute_config(mut self, key: &str, value: &str) -> Self {
        self.compute_config
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Compute membership lease timing, in milliseconds.
    pub fn lease(self, renew_ms: u64, lease_ms: u64) -> Self {
        self.compute_config("cluster.renew_ms", &renew_ms.to_string())
            .compute_config("cluster.lease_ms", &lease_ms.to_string())
    }

    fn storage_count(&self) -> usize {
        self.zones * self.storage_per_zone
    }
}

/// The role of a cluster node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A storage node (`warren storage`).
    Storage,
    /// A compute node (`warren compute`, the AMQP server).
    Compute,
}

impl Role {
    fn subcommand(self) -> &'static str {
        match self {
            Role::Storage => "storage",
            Role::Compute => "compute",
        }
    }
}

/// What a node's config file says about it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Its name, e.g. `storage-1`.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its zone, e.g. `zone-b`.
    pub zone: String,
    /// Its config file (what a restart runs it from).
    pub config: PathBuf,
    /// Storage: its data directory (its identity lives there).
    pub data_dir: Option<PathBuf>,
    /// The TCP address that accepts once it serves: AMQP for compute, gRPC for storage.
    pub listen: SocketAddr,
}

/// A node process the harness itself started ([`WarrenDev::restart_node`]).
struct OwnedNode {
    child: Child,
    /// Closing it asks the node to stop (`--exit-on-stdin-close`).
    stdin: Option<ChildStdin>,
}

/// A `warren dev` cluster (supervisor plus storage and compute children) in its own process
/// group, with all data in a private temporary directory. Nodes restarted by the harness
/// join that process group, so everything the cluster ran is stopped with it.
pub struct WarrenDev {
    root: tempfile::TempDir,
    opts: ClusterOpts,
    child: Option<Child>,
    amqp_urls: Vec<String>,
    http_port: u16,
    owned: Mutex<BTreeMap<String, OwnedNode>>,
}

impl WarrenDev {
    /// Start a fresh cluster on free ports and wait until it prints its AMQP URL.
    pub fn start() -> anyhow::Result<WarrenDev> {
        WarrenDev::start_cluster(ClusterOpts::default())
    }

    /// Start a fresh cluster of the given shape on free ports and wait until every compute
    /// node accepts connections and every storage node registered.
    pub fn start_cluster(opts: ClusterOpts) -> anyhow::Result<WarrenDev> {
        let root = tempfile::Builder::new()
            .prefix("warren-test-")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut dev = WarrenDev {
            root,
            opts,
            child: None,
            amqp_urls: Vec::new(),
            http_port: 0,
            owned: Mutex::new(BTreeMap::new()),
        };
        dev.spawn()?;
        Ok(dev)
    }

    /// The URL clients connect to (compute-0's).
    pub fn amqp_url(&self) -> &str {
        self.amqp_urls.first().map(String::as_str).unwrap_or("")
    }

    /// One URL per compute node, compute-0 first.
    pub fn amqp_urls(&self) -> &[String] {
        &self.amqp_urls
    }

    /// The shape this cluster was started with.
    pub fn opts(&self) -> &ClusterOpts {
        &self.opts
    }

    /// The management HTTP port of the compute node.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The `--data-dir` of the cluster (kept across [`WarrenDev::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The id of the cluster's process group (its leader is the guard around `warren dev`).
    pub fn process_group(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The pid that `warren dev` recorded for a child, e.g. `pid("storage", 1)`.
    pub fn pid(&self, role: &str, n: usize) -> anyhow::Result<u32> {
        self.pid_of(&format!("{role}-{n}"))
    }

    /// The pid last recorded for a node (by `warren dev` or by [`WarrenDev::restart_node`]),
    /// e.g. `pid_of("compute-2")`. The process may have exited since.
    pub fn pid_of(&self, name: &str) -> anyhow::Result<u32> {
        let path = self.data_dir().join("run").join(format!("{name}.pid"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("parsing {}", path.display()))
    }

    /// Every node name of this cluster: storage-0.. then compute-0...
    pub fn node_names(&self) -> Vec<String> {
        let mut names = self.storage_names();
        names.extend(self.compute_names());
        names
    }

    /// storage-0..M-1.
    pub fn storage_names(&self) -> Vec<String> {
        (0..self.opts.storage_count())
            .map(|i| format!("storage-{i}"))
            .collect()
    }

    /// compute-0..N-1.
    pub fn compute_names(&self) -> Vec<String> {
        (0..self.opts.compute)
            .map(|i| format!("compute-{i}"))
            .collect()
    }

    /// The zone names of this cluster: zone-a, zone-b, ...
    pub fn zone_names(&self) -> Vec<String> {
        (0..self.opts.zones)
            .map(|i| format!("zone-{}", char::from(b'a' + (i % 26) as u8)))
            .collect()
    }

    /// What a node's config file says about it.
    pub fn node_info(&self, name: &str) -> anyhow::Result<NodeInfo> {
        let config = self.data_dir().join("config").join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
        let string = |key: &str| -> anyhow::Result<String> {
            table
                .get(key)
                .and_then(toml::Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{} has no string `{key}`", config.display()))
        };
        let role = if name.starts_with("storage-") {
            Role::Storage
        } else if name.starts_with("compute-") {
            Role::Compute
        } else {
            bail!("{name} is no node of this cluster");
        };
        let (listen, data_dir) = match role {
            Role::Storage => (
                string("control_addr")?,
                Some(PathBuf::from(string("data_dir")?)),
            ),
            Role::Compute => (string("amqp_listen")?, None),
        };
        Ok(NodeInfo {
            name: name.to_string(),
            role,
            zone: string("zone")?,
            config,
            data_dir,
            listen: listen
                .parse()
                .with_context(|| format!("bad listen address {listen} of {name}"))?,
        })
    }

    /// The zone a node runs in, e.g. `zone_of("compute-1") == "zone-b"`.
    pub fn zone_of(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.node_info(name)?.zone)
    }

    /// The AMQP URL of a compute node.
    pub fn url_of(&self, name: &str) -> anyhow::Result<String> {
        let i: usize = name
            .strip_prefix("compute-")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{name} is not a compute node"))?;
        self.amqp_urls
            .get(i)
            .cloned()
            .with_context(|| format!("{name} is not a compute node of this cluster"))
    }

    /// True while the node runs (and has not been paused into a zombie; a paused node counts
    /// as running).
    pub fn is_running(&self, name: &str) -> bool {
        self.live_pid(name).is_ok()
    }

    /// The pid of a running node of this cluster (never a recycled pid of another process).
    fn live_pid(&self, name: &str) -> anyhow::Result<u32> {
        let pid = self.pid_of(name)?;
        let group = self.process_group().context("the cluster is not running")?;
        if !is_child_of(pid, group) || !alive(pid, false) {
            bail!("{name} (pid {pid}) is not running under this cluster");
        }
        Ok(pid)
    }

    /// SIGKILL storage node `n` (the rest of the cluster keeps running).
    pub fn kill_storage(&self, n: usize) -> anyhow::Result<()> {
        self.kill(&format!("storage-{n}"))
    }

    /// SIGKILL one node (the rest of the cluster keeps running) and wait until it is gone.
    pub fn kill(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.live_pid(name)?;
        send_signal(pid, "KILL", false)?;
        self.reap(name, pid);
        Ok(())
    }

    /// Wait until `pid` is gone, reaping it if the harness started it.
    fn reap(&self, name: &str, pid: u32) {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = owned.get_mut(name)
            && node.child.id() == pid
        {
            let _ = node.child.wait();
            owned.remove(name);
            return;
        }
        drop(owned);
        wait_gone(pid, false, Duration::from_secs(10));
    }

    /// Stop one node gracefully (it leaves as on an operator's stop) and wait until it is
    /// gone; SIGKILL after a grace period.
    pub fn stop_node(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.live_pid(name)?;
        let owned_stdin = {
            let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
            owned
                .get_mut(name)
                .filter(|n| n.child.id() == pid)
                .map(|n| n.stdin.take())
        };
        match owned_stdin {
            Some(stdin) => drop(stdin),
            None => send_signal(pid, "TERM", false)?,
        }
        // A paused node must run to see the request.
        let _ = send_signal(pid, "CONT", false);
        wait_gone(pid, false, STOP_GRACE);
        if alive(pid, false) {
            let _ = send_signal(pid, "KILL", false);
        }
        self.reap(name, pid);
        Ok(())
    }

    /// SIGKILL every node of a zone (storage and compute); returns the names killed.
    pub fn kill_zone(&self, zone: &str) -> anyhow::Result<Vec<String>> {
        let mut killed = Vec::new();
        for name in self.node_names() {
            if self.zone_of(&name)? == zone && self.is_running(&name) {
                let pid = self.live_pid(&name)?;
                send_signal(pid, "KILL", false)?;
                killed.push((name, pid));
            }
        }
        for (name, pid) in &killed {
            self.reap(name, *pid);
        }
        Ok(killed.into_iter().map(|(name, _)| name).collect())
    }

    /// SIGSTOP a node, e.g. `pause("compute-1")`: it keeps its sockets but answers nothing.
    pub fn pause(&self, name: &str) -> anyhow::Result<()> {
        send_signal(self.live_pid(name)?, "STOP", false)
    }

    /// SIGCONT a node paused with [`WarrenDev::pause`].
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        send_signal(self.live_pid(name)?, "CONT", false)
    }

    /// Start a node that is down again from its config file, as a child of this process in
    /// the cluster's process group, and wait until it listens (compute: AMQP; storage: gRPC).
    /// A storage node keeps its data directory, so it comes back as the same identity.
    pub fn restart_node(&self, name: &str) -> anyhow::Result<()> {
        if self.is_running(name) {
            bail!("{name} is still running; kill or stop it first");
        }
        let info = self.node_info(name)?;
        let group = self.process_group().context("the cluster is not running")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the cluster log")?;
        let bin = warren_bin()?;
        let mut child = Command::new(&bin)
            .arg(info.role.subcommand())
            .arg("--config")
            .arg(&info.config)
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            // The cluster's group: a whole-cluster kill or stop takes this node too.
            .process_group(group as i32)
            .spawn()
            .with_context(|| format!("restarting {name}"))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let pid_file = self.data_dir().join("run").join(format!("{name}.pid"));
        std::fs::write(&pid_file, format!("{pid}\n"))
            .with_context(|| format!("writing {}", pid_file.display()))?;
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), OwnedNode { child, stdin });

        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&info.listen, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            let exited = {
                let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
                match owned.get_mut(name) {
                    Some(node) => node.child.try_wait()?,
                    None => bail!("{name} was stopped while restarting"),
                }
            };
            if let Some(status) = exited {
                bail!(
                    "{name} exited while restarting ({status}); log:\n{}",
                    self.start_failure_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not listen on {} within {NODE_READY_TIMEOUT:?}",
                    info.listen
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Delete a stopped storage node's data directory and start it again: it rejoins as a
    /// new identity, as a replaced disk would.
    pub fn wipe_and_restart(&self, name: &str) -> anyhow::Result<()> {
        if self.is_running(name) {
            bail!("{name} is still running; kill or stop it first");
        }
        let info = self.node_info(name)?;
        let data_dir = info
            .data_dir
            .with_context(|| format!("{name} is not a storage node"))?;
        match std::fs::remove_dir_all(&data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("wiping {}", data_dir.display())),
        }
        self.restart_node(name)
    }

    /// Run `warren ctl --data-dir <this cluster> --json <args>` (e.g. `["nodes"]`,
    /// `["evict", "compute-1"]`) and parse what it prints (`Null` if nothing). A non-zero
    /// exit is an error that carries the status and standard error.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(warren_bin()?)
            .arg("ctl")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--json")
            .args(args)
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output()
            .context("running warren ctl")?;
        if !out.status.success() {
            bail!(
                "warren ctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("warren ctl {} printed no JSON: {stdout}", args.join(" ")))
    }

    /// Wait until `warren ctl nodes` lists `name` as an active member whose lease is being
    /// renewed (e.g. after [`WarrenDev::restart_node`] of a compute node, before the next
    /// fault, so that every node agrees on it again).
    pub fn wait_member(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            // Long enough to see a heartbeat move at the default renewal period (1 s).
            match self.ctl_json(&["nodes", "--sample-ms", "1300"]) {
                Ok(rows) => {
                    let member = rows.as_array().is_some_and(|rows| {
                        rows.iter().any(|r| {
                            r["name"] == name && r["state"] == "active" && r["renewing"] == true
                        })
                    });
                    if member {
                        return Ok(());
                    }
                    last = rows.to_string();
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        bail!("{name} is not a renewing member after {timeout:?}; last: {last}")
    }

    /// Stop the nodes the harness started (gracefully, then SIGKILL) and reap them.
    fn stop_owned(&self, grace: Duration) {
        let mut owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        for node in owned.values_mut() {
            drop(node.stdin.take());
        }
        let deadline = Instant::now() + grace;
        for node in owned.values_mut() {
            while Instant::now() < deadline && matches!(node.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    /// SIGKILL the supervisor and every child at once, as a power cut would.
    pub fn kill_all_sigkill(&mut self) -> anyhow::Result<()> {
        let pids: Vec<u32> = self
            .node_names()
            .iter()
            .filter_map(|name| self.pid_of(name).ok())
            .collect();
        if let Some(child) = self.child.as_mut() {
            let pgid = child.id();
            let _ = send_signal(pgid, "KILL", true);
            for pid in &pids {
                // Children normally share the group; this also covers one that left it (but
                // never a recycled pid that is no longer ours).
                if is_child_of(*pid, pgid) {
                    let _ = send_signal(*pid, "KILL", false);
                }
            }
            let _ = child.wait();
            wait_gone(pgid, true, Duration::from_secs(10));
        }
        self.child = None;
        self.stop_owned(Duration::ZERO);
        for pid in pids {
            wait_gone(pid, false, Duration::from_secs(10));
        }
        Ok(())
    }

    /// Stop the cluster gracefully (the guard sends SIGTERM to `warren dev` when its stdin
    /// closes), killing whatever is left after a grace period.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(group) = self.process_group() {
            // A paused node would sit out the whole grace period.
            let _ = send_signal(group, "CONT", true);
        }
        self.stop_owned(STOP_GRACE);
        if let Some(mut child) = self.child.take() {
            let pgid = child.id();
            drop(child.stdin.take());
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = send_signal(pgid, "KILL", true);
            let _ = child.wait();
            wait_gone(pgid, true, Duration::from_secs(10));
        }
        Ok(())
    }

    /// Start the cluster again on the same data directory (after a stop or a kill), on new
    /// ports; [`WarrenDev::amqp_url`] changes accordingly.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// The last `lines` lines of the cluster's combined log (all starts).
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.log_path();
        let Ok(mut file) = std::fs::File::open(&path) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// What explains a failed start: every error and warning line of the cluster's log (a
    /// node that died early logged why long before the tail), then the last 40 lines.
    fn start_failure_log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains(" WARN ") || l.starts_with("Error"))
            .collect();
        format!(
            "errors and warnings:\n{}\n... last lines:\n{}",
            errors[errors.len().saturating_sub(40)..].join("\n"),
            self.log_tail(40)
        )
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("warren-dev.log")
    }

    /// The `warren dev` flags for this cluster's shape (none for the default shape, so that
    /// [`WarrenDev::start`] runs `warren dev` exactly as a user would).
    fn cluster_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let default = ClusterOpts::default();
        if self.opts == default {
            return args;
        }
        args.extend([
            "--compute".to_string(),
            self.opts.compute.to_string(),
            "--zones".to_string(),
            self.opts.zones.to_string(),
            "--storage-per-zone".to_string(),
            self.opts.storage_per_zone.to_string(),
            "--replication".to_string(),
            if self.opts.strict {
                "strict"
            } else {
                "default"
            }
            .to_string(),
        ]);
        for (key, value) in &self.opts.compute_config {
            args.push("--compute-config".to_string());
            args.push(format!("{key}={value}"));
        }
        args
    }

    /// Start `warren dev`; again, on new ports, when a port it picked was taken by another
    /// process in the moment between its probe and the node's bind (tests run in parallel).
    fn spawn(&mut self) -> anyhow::Result<()> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            match self.spawn_once() {
                Err(e)
                    if attempt < ATTEMPTS
                        && format!("{e:#}").contains("Address already in use") =>
                {
                    eprintln!(
                        "harness: a port picked for the cluster was taken meanwhile; starting it again on new ports"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn spawn_once(&mut self) -> anyhow::Result<()> {
        let bin = warren_bin()?;
        self.http_port = free_port()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the cluster log")?;
        // The guard stops the cluster when our end of its stdin pipe closes, so a test that
        // dies (panic = abort, SIGKILL from a runner, Ctrl-C) leaves no cluster behind.
        let guard = Path::new(env!("CARGO_MANIFEST_DIR")).join("warren-dev-guard.sh");
        let mut child = Command::new("/bin/sh")
            .arg(&guard)
            .arg(&bin)
            .arg("dev")
            .arg("--data-dir")
            .arg(self.data_dir())
            // Any free ports, held by `warren dev` until it starts the nodes (only the moment
            // between that and a node's bind is left to race, hence `spawn`'s retry). The
            // URLs it prints say which.
            .arg("--amqp-port")
            .arg("0")
            .arg("--http-port")
            .arg(self.http_port.to_string())
            .args(self.cluster_args())
            // An error's message, not a backtrace of where it was built, ends the log.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group, so that exactly this cluster can be killed at once.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} dev", bin.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        self.child = Some(child);

        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim_start().starts_with("amqp://") {
                    let _ = tx.send(line.trim().to_string());
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        self.amqp_urls.clear();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(url) => {
                    self.amqp_urls.push(normalize_url(&url));
                    if self.amqp_urls.len() == self.opts.compute {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    let _ = self.stop();
                    bail!(
                        "warren dev closed its output before printing an amqp:// URL \
                         (exit: {status:?}); log:\n{}",
                        self.start_failure_log()
                    );
                }
            }
            if Instant::now() > deadline {
                let _ = self.stop();
                bail!(
                    "warren dev printed no amqp:// URL within {READY_TIMEOUT:?}; log:\n{}",
                    self.start_failure_log()
                );
            }
        }
    }
}

impl Drop for WarrenDev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- warren dev log ({}) ----\n{}\n----",
                self.root.path().display(),
                self.log_tail(60)
            );
            // The whole log, for a failure that only shows up now and then.
            if let Some(dir) = std::env::var_os("WARREN_TEST_KEEP_LOGS") {
                let name = self.root.path().file_name().unwrap_or_default().to_owned();
                let to = Path::new(&dir).join(name).with_extension("log");
                let copied = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::copy(self.log_path(), &to));
                match copied {
                    Ok(_) => eprintln!("the whole log is kept in {}", to.display()),
                    Err(e) => eprintln!("could not keep the log in {}: {e}", to.display()),
                }
            }
        }
        if self.child.is_some() {
            let _ = self.kill_all_sigkill();
        }
    }
}

/// True if `pid` is a child of `parent` or a member of process group `parent`.
fn is_child_of(pid: u32, parent: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // After the parenthesised command name: state, ppid, pgrp, ...
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
    field(1) == Some(parent) || field(2) == Some(parent)
}

fn wait_gone(pid: u32, group: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid, group) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The broker a test talks to: an external one named by `WARREN_TEST_AMQP_URL`, or a
/// `warren dev` cluster the test owns.
pub enum Broker {
    /// A broker the test does not control (e.g. RabbitMQ started by `scripts/rabbitmq.sh`).
    External(String),
    /// A cluster started for this test.
    Warren(WarrenDev),
}

impl Broker {
    /// `WARREN_TEST_AMQP_URL` if set, otherwise a fresh `warren dev` cluster.
    pub fn from_env_or_start() -> anyhow::Result<Broker> {
        match std::env::var(AMQP_URL_ENV) {
            Ok(url) if !url.is_empty() => Ok(Broker::External(normalize_url(&url))),
            _ => Ok(Broker::Warren(WarrenDev::start()?)),
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> &str {
        match self {
            Broker::External(url) => url,
            Broker::Warren(dev) => dev.amqp_url(),
        }
    }

    /// `host:port` of the broker's AMQP listener.
    pub fn addr(&self) -> String {
        amqp_addr(self.url()).unwrap_or_else(|_| self.url().to_string())
    }
}

/// A name unique to this process and call, for queues and exchanges that must not collide
/// with other tests sharing a broker.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Connect with lapin and push one confirmed message through a fresh queue: proof that the
/// broker still serves well-behaved clients.
pub async fn assert_broker_serves(url: &str) -> anyhow::Result<()> {
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    let work = async {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .context("connecting a healthy client")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = unique_name("healthy");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"still serving",
                lapin::BasicProperties::default(),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("publish on a healthy connection was not acked: {confirm:?}");
        }
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
            .context("the message published on a healthy connection is missing")?;
        if got.delivery.data != b"still serving" {
            bail!(
                "wrong body on a healthy connection: {:?}",
                got.delivery.data
            );
        }
        conn.close(200, "bye".into()).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .context("healthy round trip timed out")?
}

/// The environment variable that runs the restartable-cluster tests against a throwaway
/// RabbitMQ (`rabbitmq`) instead of `warren dev`, to prove their expectations.
pub const REFERENCE_ENV: &str = "WARREN_TEST_REFERENCE";

/// A broker whose processes a test controls as a whole: SIGKILL everything, stop, restart on
/// the same data.
pub trait Restartable: Send {
    /// The URL clients connect to (may change on restart).
    fn amqp_url(&self) -> &str;
    /// SIGKILL every process of the broker at once.
    fn kill_all_sigkill(&mut self) -> anyhow::Result<()>;
    /// Stop gracefully.
    fn stop(&mut self) -> anyhow::Result<()>;
    /// Start again on the same data.
    fn restart(&mut self) -> anyhow::Result<()>;
}

impl Restartable for WarrenDev {
    fn amqp_url(&self) -> &str {
        WarrenDev::amqp_url(self)
    }
    fn kill_all_sigkill(&mut self) -> anyhow::Result<()> {
        WarrenDev::kill_all_sigkill(self)
    }
    fn stop(&mut self) -> anyhow::Result<()> {
        WarrenDev::stop(self)
    }
    fn restart(&mut self) -> anyhow::Result<()> {
        WarrenDev::restart(self)
    }
}

/// A fresh `warren dev` cluster, or with `WARREN_TEST_REFERENCE=rabbitmq` a fresh RabbitMQ.
pub fn start_restartable() -> anyhow::Result<Box<dyn Restartable>> {
    match std::env::var(REFERENCE_ENV).as_deref() {
        Ok("rabbitmq") => Ok(Box::new(ReferenceRabbit::start()?)),
        Ok("") | Err(_) => Ok(Box::new(WarrenDev::start()?)),
        Ok(other) => bail!("unknown {REFERENCE_ENV}={other} (expected `rabbitmq`)"),
    }
}

/// A RabbitMQ started with `scripts/rabbitmq.sh` in a private directory.
pub struct ReferenceRabbit {
    dir: tempfile::TempDir,
    port: u16,
    url: String,
    running: bool,
}

impl ReferenceRabbit {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq.sh")
    }

    /// Start RabbitMQ on a free port.
    pub fn start() -> anyhow::Result<ReferenceRabbit> {
        let dir = tempfile::Builder::new()
            .prefix("warren-reference-rabbitmq-")
            .tempdir()?;
        let mut rabbit = ReferenceRabbit {
            dir,
            port: free_port()?,
            url: String::new(),
            running: false,
        };
        rabbit.run_script("start")?;
        Ok(rabbit)
    }

    fn run_script(&mut self, action: &str) -> anyhow::Result<()> {
        let out = Command::new("bash")
            .arg(Self::script())
            .arg(action)
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .output()
            .context("running scripts/rabbitmq.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/rabbitmq.sh {action} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if action == "start" {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let url = stdout
                .lines()
                .find(|l| l.starts_with("amqp://"))
                .context("scripts/rabbitmq.sh printed no URL")?;
            self.url = normalize_url(url);
        }
        self.running = action == "start";
        Ok(())
    }
}

impl Restartable for ReferenceRabbit {
    fn amqp_url(&self) -> &str {
        &self.url
    }
    fn kill_all_sigkill(&mut self) -> anyhow::Result<()> {
        let pgid_file = self.dir.path().join("state").join("server.pgid");
        let pgid: u32 = std::fs::read_to_string(&pgid_file)?.trim().parse()?;
        send_signal(pgid, "KILL", true)?;
        wait_gone(pgid, true, Duration::from_secs(10));
        Ok(())
    }
    fn stop(&mut self) -> anyhow::Result<()> {
        self.run_script("stop")
    }
    fn restart(&mut self) -> anyhow::Result<()> {
        // `start` first clears what is left of the previous run (epmd, a killed server).
        self.run_script("start")
    }
}

impl Drop for ReferenceRabbit {
    fn drop(&mut self) {
        let _ = self.run_script("stop");
    }
}
