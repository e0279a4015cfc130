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

/// Certificate name of the supervisor itself.
const SUPERVISOR_NAME: &str = "dev-supervisor";

/// Number of storage nodes (and zones) `warren dev` starts.
const STORAGE_NODES: usize = 3;

/// How long a child gets to stop gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long the supervisor waits for the compute node to accept AMQP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `warren dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where all cluster data lives; reused on restart.
    #[arg(long, default_value = "./warren-data")]
    pub data_dir: PathBuf,
    /// AMQP port of the compute node.
    #[arg(long, default_value_t = 5672)]
    pub amqp_port: u16,
    /// Management HTTP port of the compute node.
    #[arg(long, default_value_t = 15672)]
    pub http_port: u16,
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

/// Pick a free loopback port. The port is released before the child binds it, which is a
/// small race a development cluster accepts.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
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
    let storage_names: Vec<String> = (0..STORAGE_NODES).map(|i| format!("storage-{i}")).collect();
    let compute_name = "compute-0".to_string();
    let mut all_names: Vec<&str> = storage_names.iter().map(String::as_str).collect();
    all_names.push(&compute_name);
    // The supervisor's own identity, to read the node registry while starting up.
    all_names.push(SUPERVISOR_NAME);
    let tls = warren_common::tls::create_dev_cluster_tls(&layout.tls_dir(), &all_names)
        .context("creating the cluster CA and node certificates")?;

    let grpc_addrs: Vec<SocketAddr> = (0..STORAGE_NODES)
        .map(|_| free_port().map(loopback))
        .collect::<anyhow::Result<_>>()?;
    let mut configs = Vec::new();
    let mut storage_data_addrs = Vec::new();
    for (i, name) in storage_names.iter().enumerate() {
        let config = warren_storage::config::StorageNodeConfig {
            name: name.clone(),
            zone: warren_common::Zone(format!("zone-{}", (b'a' + i as u8) as char)),
            data_dir: layout.node_dir(name),
            data_addr: loopback(free_port()?),
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
    let amqp_addr = loopback(args.amqp_port);
    let mut compute = warren_compute::config::ComputeConfig::new(tls[STORAGE_NODES].clone());
    compute.node_name = compute_name.clone();
    compute.zone = "zone-a".into();
    compute.amqp_listen = amqp_addr;
    compute.storage_seeds = grpc_addrs.clone();
    let compute_path = layout.config_dir().join(format!("{compute_name}.toml"));
    write_toml(&compute_path, &compute)?;
    configs.push((compute_name.clone(), "compute", compute_path));

    let exe = std::env::current_exe().context("locating the warren binary")?;
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
                &tls[STORAGE_NODES + 1],
            )?;
            wait_until_registered(&registers, &storage_data_addrs, &mut nodes).await?;
            wait_until_accepting(amqp_addr, &mut nodes).await
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
        // slash would name the vhost "".
        println!("amqp://guest:guest@{amqp_addr}/%2f");
    }
    tracing::info!(data_dir = %layout.root.display(), "warren dev cluster ready");

    // A node that exits (crash, or killed by an operator or a fault test) stays down: the
    // rest of the cluster goes on without it, as a real cluster would.
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
