//! `warren dev` (a supervised local cluster of real processes) and the single-role entry
//! points `warren storage` and `warren compute`.
//!
//! The supervisor creates the cluster CA and node certificates, writes one config file per
//! node, and starts every node as its own OS process (so tests can kill, pause and restart
//! them one by one). Each child gets a pipe on its standard input and exits when that pipe
//! closes: children never outlive the supervisor, even when it is killed with SIGKILL.

use anyhow::Context;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, Command};
use warren_common::config::Replication;

/// Certificate name of the supervisor itself.
const SUPERVISOR_NAME: &str = "dev-supervisor";

/// How long a child gets to stop gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long the supervisor waits for the compute nodes to accept AMQP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Zone names go zone-a .. zone-z.
const MAX_ZONES: usize = 26;

/// The replication profile of the queue logs compute nodes write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationProfile {
    /// Three copies in distinct zones, two must ack.
    Default,
    /// Six copies, two per zone, four must ack: survives a zone plus one more node.
    Strict,
}

impl ReplicationProfile {
    fn name(self) -> &'static str {
        match self {
            ReplicationProfile::Default => "default",
            ReplicationProfile::Strict => "strict",
        }
    }

    fn replication(self) -> Replication {
        match self {
            ReplicationProfile::Default => Replication::default(),
            ReplicationProfile::Strict => Replication::strict(),
        }
    }
}

/// Options of `warren dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where all cluster data lives; reused on restart.
    #[arg(long, default_value = "./warren-data")]
    pub data_dir: PathBuf,
    /// AMQP port of compute-0; compute-i listens on this port + i. 0: any free ports.
    #[arg(long, default_value_t = 5672)]
    pub amqp_port: u16,
    /// Management HTTP port of the compute node.
    #[arg(long, default_value_t = 15672)]
    pub http_port: u16,
    /// Number of compute nodes (compute-i runs in zone i mod --zones).
    #[arg(long, default_value_t = 1)]
    pub compute: usize,
    /// Number of zones (zone-a, zone-b, ...).
    #[arg(long, default_value_t = 3)]
    pub zones: usize,
    /// Storage nodes per zone (storage-i runs in zone i mod --zones).
    #[arg(long, default_value_t = 1)]
    pub storage_per_zone: usize,
    /// Replication profile of queue logs.
    #[arg(long, value_enum, default_value_t = ReplicationProfile::Default)]
    pub replication: ReplicationProfile,
    /// Override one key of every compute node's config, e.g. `cluster.lease_ms=2000`
    /// (the value is TOML; repeatable).
    #[arg(long = "compute-config", value_name = "KEY=VALUE")]
    pub compute_config: Vec<String>,
}

impl DevArgs {
    /// Refuse cluster shapes that cannot place a full ensemble, naming the flag.
    fn validate(&self) -> anyhow::Result<()> {
        if self.compute == 0 {
            anyhow::bail!("--compute must be at least 1");
        }
        if self.zones == 0 || self.zones > MAX_ZONES {
            anyhow::bail!("--zones must be between 1 and {MAX_ZONES}");
        }
        if self.storage_per_zone == 0 {
            anyhow::bail!("--storage-per-zone must be at least 1");
        }
        let replication = self.replication.replication();
        let storage = self.zones * self.storage_per_zone;
        if storage < replication.write_quorum {
            anyhow::bail!(
                "--replication {} writes {} copies but --zones {} x --storage-per-zone {} \
                 gives only {storage} storage nodes",
                self.replication.name(),
                replication.write_quorum,
                self.zones,
                self.storage_per_zone
            );
        }
        // The profile promises at most `per_zone` copies in any one zone, so that losing a
        // zone leaves the ack quorum.
        let placeable = self.zones * self.storage_per_zone.min(replication.per_zone);
        if placeable < replication.write_quorum {
            anyhow::bail!(
                "--replication {} places {} copies with at most {} per zone, which needs \
                 --zones x min(--storage-per-zone, {}) >= {} (e.g. --zones 3 \
                 --storage-per-zone {})",
                self.replication.name(),
                replication.write_quorum,
                replication.per_zone,
                replication.per_zone,
                replication.write_quorum,
                replication.per_zone
            );
        }
        let last = usize::from(self.amqp_port) + self.compute - 1;
        if last > usize::from(u16::MAX) {
            anyhow::bail!(
                "--amqp-port {} + --compute {} runs past port 65535",
                self.amqp_port,
                self.compute
            );
        }
        Ok(())
    }

    /// The AMQP port of compute node `i`.
    fn amqp_port_of(&self, i: usize) -> anyhow::Result<u16> {
        u16::try_from(usize::from(self.amqp_port) + i).context("AMQP port out of range")
    }
}

fn zone_name(i: usize) -> String {
    format!("zone-{}", char::from(b'a' + (i % MAX_ZONES) as u8))
}

/// The files and addresses of one local cluster, derived from the data directory.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }
    fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    fn node_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }
}

/// Free loopback ports for the nodes of one run. Every probe socket stays bound until the
/// reservation is dropped, just before the nodes start, so no port is handed out twice in one
/// run (the kernel may otherwise return a just-released port to the next probe). Another
/// process may still take a port between the drop and the node's bind: a small race a
/// development cluster accepts.
#[derive(Default)]
struct PortReservations {
    tcp: Vec<TcpListener>,
    udp: Vec<std::net::UdpSocket>,
}

impl PortReservations {
    /// Hold `addr`, a port the caller chose.
    fn hold_tcp(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        self.tcp.push(TcpListener::bind(addr)?);
        Ok(())
    }

    fn tcp(&mut self) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let addr = listener.local_addr()?;
        self.tcp.push(listener);
        Ok(addr)
    }

    /// A free UDP port (QUIC listeners bind UDP, which a TCP probe says nothing about).
    fn udp(&mut self) -> anyhow::Result<SocketAddr> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
        let addr = socket.local_addr()?;
        self.udp.push(socket);
        Ok(addr)
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Apply `KEY=VALUE` overrides (dotted keys, TOML values) to a serialized config and read it
/// back, so an unknown key or a bad value is refused by the config's own rules.
fn apply_overrides<T>(config: &T, overrides: &[String]) -> anyhow::Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    if overrides.is_empty() {
        return toml::from_str(&toml::to_string(config)?).context("re-reading a node config");
    }
    let mut table: toml::Table =
        toml::from_str(&toml::to_string(config)?).context("re-reading a node config")?;
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--compute-config {item}: expected KEY=VALUE"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            // A bare word is taken as a string, so `zone=zone-x` needs no quotes.
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts
            .pop()
            .filter(|k| !k.is_empty())
            .with_context(|| format!("--compute-config {item}: empty key"))?;
        let mut at = &mut table;
        for part in parts {
            at = at
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--compute-config {item}: {part} is not a table"))?;
        }
        at.insert(last.to_string(), value);
    }
    toml::from_str(&toml::to_string(&table)?).context("applying --compute-config")
}

/// A running child node.
struct Node {
    name: String,
    child: Child,
    /// Held apart from `child` because `Child::wait` closes the child's stdin, which would
    /// tell it to stop; dropping this is the graceful stop signal.
    stdin: Option<ChildStdin>,
}

/// Run the local cluster until SIGINT or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    args.validate()?;
    let layout = Layout {
        root: args.data_dir.clone(),
    };
    for dir in [
        layout.root.clone(),
        layout.tls_dir(),
        layout.config_dir(),
        layout.run_dir(),
        layout.objects_dir(),
    ] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let storage_count = args.zones * args.storage_per_zone;
    let storage_names: Vec<String> = (0..storage_count).map(|i| format!("storage-{i}")).collect();
    let compute_names: Vec<String> = (0..args.compute).map(|i| format!("compute-{i}")).collect();
    let mut ports = PortReservations::default();
    let amqp_addrs: Vec<SocketAddr> = if args.amqp_port == 0 {
        // Port 0: any free ports (they are printed, one URL per compute node).
        (0..args.compute)
            .map(|_| ports.tcp())
            .collect::<anyhow::Result<_>>()?
    } else {
        let addrs: Vec<SocketAddr> = (0..args.compute)
            .map(|i| args.amqp_port_of(i).map(loopback))
            .collect::<anyhow::Result<_>>()?;
        for (name, addr) in compute_names.iter().zip(&addrs) {
            // Fail here, by name, rather than with a child that dies on a taken port.
            ports
                .hold_tcp(*addr)
                .with_context(|| format!("AMQP port {} for {name} is not free", addr.port()))?;
        }
        addrs
    };
    let mut all_names: Vec<&str> = storage_names.iter().map(String::as_str).collect();
    all_names.extend(compute_names.iter().map(String::as_str));
    // The supervisor's own identity, to read the node registry while starting up.
    all_names.push(SUPERVISOR_NAME);
    let tls = warren_common::tls::create_dev_cluster_tls(&layout.tls_dir(), &all_names)
        .context("creating the cluster CA and node certificates")?;

    let grpc_addrs: Vec<SocketAddr> = (0..storage_count)
        .map(|_| ports.tcp())
        .collect::<anyhow::Result<_>>()?;
    let mut configs = Vec::new();
    let mut storage_data_addrs = Vec::new();
    for (i, name) in storage_names.iter().enumerate() {
        let config = warren_storage::config::StorageNodeConfig {
            name: name.clone(),
            zone: warren_common::Zone(zone_name(i % args.zones)),
            data_dir: layout.node_dir(name),
            data_addr: ports.tcp()?,
            control_addr: grpc_addrs[i],
            advertise_data_addr: None,
            advertise_control_addr: None,
            seeds: grpc_addrs.clone(),
            tls: tls[i].clone(),
            max_batch_bytes: 8 * 1024 * 1024,
        };
        let path = layout.config_dir().join(format!("{name}.toml"));
        write_toml(&path, &config)?;
        storage_data_addrs.push((name.clone(), config.data_addr));
        configs.push((name.clone(), "storage", path));
    }
    for (i, name) in compute_names.iter().enumerate() {
        let mut compute =
            warren_compute::config::ComputeConfig::new(tls[storage_count + i].clone());
        compute.node_name = name.clone();
        compute.zone = zone_name(i % args.zones);
        compute.amqp_listen = amqp_addrs[i];
        compute.peer_listen = ports.udp()?;
        compute.storage_seeds = grpc_addrs.clone();
        compute.replication = args.replication.replication();
        let compute = apply_overrides(&compute, &args.compute_config)?;
        compute
            .validate()
            .with_context(|| format!("the config of {name}"))?;
        let path = layout.config_dir().join(format!("{name}.toml"));
        write_toml(&path, &compute)?;
        configs.push((name.clone(), "compute", path));
    }
    // Remove pid files of nodes an earlier, larger run had, so no one signals a stale pid.
    if let Ok(entries) = std::fs::read_dir(layout.run_dir()) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    let exe = std::env::current_exe().context("locating the warren binary")?;
    drop(ports);
    let mut nodes = Vec::new();
    for (name, role, path) in &configs {
        match spawn_node(&exe, &layout, name, role, path) {
            Ok(node) => nodes.push(node),
            Err(e) => {
                stop_all(&mut nodes).await;
                return Err(e);
            }
        }
    }

    let outcome = tokio::select! {
        ready = async {
            let registers = warren_storage::client::Registers::connect(
                &grpc_addrs,
                &tls[storage_count + args.compute],
            )?;
            wait_until_registered(&registers, &storage_data_addrs, &mut nodes).await?;
            wait_until_acceptors_serve(&grpc_addrs, &tls[storage_count + args.compute], &mut nodes)
                .await?;
            for addr in &amqp_addrs {
                wait_until_accepting(*addr, &mut nodes).await?;
            }
            let compute: Vec<(String, SocketAddr)> =
                compute_names.iter().cloned().zip(amqp_addrs.iter().copied()).collect();
            wait_until_joined(&registers, &compute, &mut nodes).await
        } => ready,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted before the cluster was ready")),
    };
    if let Err(e) = outcome {
        stop_all(&mut nodes).await;
        return Err(e);
    }
    #[allow(clippy::print_stdout)]
    {
        // `%2f` names the default vhost `/` explicitly: by the AMQP URI spec a bare trailing
        // slash would name the vhost "". compute-0 comes first: tools read the first line.
        for addr in &amqp_addrs {
            println!("amqp://guest:guest@{addr}/%2f");
        }
    }
    tracing::info!(
        data_dir = %layout.root.display(),
        compute = args.compute,
        storage = storage_count,
        zones = args.zones,
        "warren dev cluster ready"
    );

    // A node that exits (crash, or killed by an operator or a fault test) stays down: the
    // rest of the cluster goes on without it, as a real cluster would. Restarting a node
    // (`warren storage|compute --config <data-dir>/config/<name>.toml`) is up to whoever
    // stopped it.
    let mut running: Vec<usize> = (0..nodes.len()).collect();
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            (index, status) = first_exit(&mut nodes, &running), if !running.is_empty() => {
                running.retain(|&i| i != index);
                tracing::error!(
                    node = %nodes[index].name,
                    %status,
                    "node exited; the cluster goes on without it until warren dev is restarted"
                );
            }
        }
    }
    stop_all(&mut nodes).await;
    Ok(())
}

fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = toml::to_string_pretty(value).context("serializing a node config")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn spawn_node(
    exe: &Path,
    layout: &Layout,
    name: &str,
    role: &str,
    config: &Path,
) -> anyhow::Result<Node> {
    let mut child = Command::new(exe)
        .arg(role)
        .arg("--config")
        .arg(config)
        .arg("--exit-on-stdin-close")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pid = child.id().context("child has no pid")?;
    let pid_file = layout.run_dir().join(format!("{name}.pid"));
    std::fs::write(&pid_file, format!("{pid}\n"))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    tracing::info!(node = name, pid, "started");
    let stdin = child.stdin.take();
    Ok(Node {
        name: name.to_string(),
        child,
        stdin,
    })
}

/// Wait until every storage node of this run is in the node registry (with the address it
/// has in this run, not one left from an earlier run), so that the first queue declared gets
/// a full ensemble.
async fn wait_until_registered(
    registers: &warren_storage::client::Registers,
    expected: &[(String, SocketAddr)],
    nodes: &mut [Node],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(value)) = registers.get(warren_storage::meta::NODES_KEY).await
            && let Ok(registry) =
                serde_json::from_slice::<warren_storage::meta::NodeRegistry>(&value)
        {
            let registered = expected.iter().all(|(name, addr)| {
                registry
                    .nodes
                    .values()
                    .any(|n| &n.name == name && n.data_addr == *addr)
            });
            if registered {
                return Ok(());
            }
        }
        check_children(nodes)?;
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("storage nodes did not all register in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the register acceptor of every storage node answers on its own (a new one
/// first catches up from the others), so that the cluster is ready with every copy of its
/// metadata: a fault from then on finds the redundancy it is meant to find.
async fn wait_until_acceptors_serve(
    acceptors: &[SocketAddr],
    tls: &warren_common::config::TlsPaths,
    nodes: &mut [Node],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for addr in acceptors {
        let alone = warren_storage::client::Registers::connect(&[*addr], tls)?;
        while alone.get(warren_storage::meta::NODES_KEY).await.is_err() {
            check_children(nodes)?;
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the register acceptor at {addr} did not catch up in time");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Wait until every compute node of this run is an active member (with the AMQP address it
/// has in this run), so that every node sees the same members, and so the same queue owners,
/// from the first client on.
async fn wait_until_joined(
    registers: &warren_storage::client::Registers,
    expected: &[(String, SocketAddr)],
    nodes: &mut [Node],
) -> anyhow::Result<()> {
    use warren_storage::meta::{COMPUTE_NODES_KEY, ComputeRegistry, MemberState};
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(value)) = registers.get(COMPUTE_NODES_KEY).await
            && let Ok(registry) = serde_json::from_slice::<ComputeRegistry>(&value)
        {
            let joined = expected.iter().all(|(name, addr)| {
                registry.nodes.values().any(|n| {
                    &n.name == name && n.amqp_addr == *addr && n.state == MemberState::Active
                })
            });
            if joined {
                return Ok(());
            }
        }
        check_children(nodes)?;
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("compute nodes did not all join the cluster in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_children(nodes: &mut [Node]) -> anyhow::Result<()> {
    for node in nodes.iter_mut() {
        if let Some(status) = node.child.try_wait()? {
            anyhow::bail!("{} exited during start-up ({status})", node.name);
        }
    }
    Ok(())
}

async fn wait_until_accepting(addr: SocketAddr, nodes: &mut [Node]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        check_children(nodes)?;
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("compute node did not accept connections on {addr} in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until any of the `running` nodes exits; returns its index and exit status.
async fn first_exit(nodes: &mut [Node], running: &[usize]) -> (usize, String) {
    let waits = nodes
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| running.contains(i))
        .map(|(i, node)| {
            Box::pin(async move {
                let status = match node.child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                (i, status)
            })
        });
    let (exited, _, _) = futures_util::future::select_all(waits).await;
    exited
}

/// Stop children gracefully (close their stdin), then kill whatever is left.
async fn stop_all(nodes: &mut [Node]) {
    // Compute first, so clients are disconnected before storage goes away.
    for node in nodes.iter_mut().rev() {
        drop(node.stdin.take());
        if tokio::time::timeout(STOP_GRACE, node.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %node.name, "did not stop in time; killing it");
            let _ = node.child.kill().await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install SIGTERM handler: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Resolves on SIGINT, SIGTERM, or (when asked) end of standard input.
async fn role_shutdown(exit_on_stdin_close: bool) {
    let stdin_closed = async {
        if exit_on_stdin_close {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = stdin_closed => {}
    }
}

/// Run one storage node.
pub async fn run_storage(config: &Path, exit_on_stdin_close: bool) -> anyhow::Result<()> {
    let config: warren_storage::config::StorageNodeConfig =
        warren_common::config::load_file(config)?;
    warren_storage::node::run(config, role_shutdown(exit_on_stdin_close)).await?;
    Ok(())
}

/// Run one compute node.
pub async fn run_compute(config: &Path, exit_on_stdin_close: bool) -> anyhow::Result<()> {
    let config: warren_compute::config::ComputeConfig = warren_common::config::load_file(config)?;
    warren_compute::run(config, role_shutdown(exit_on_stdin_close)).await?;
    Ok(())
}
