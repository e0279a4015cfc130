//! `warren ctl`: cluster administration through the metadata registers. It reaches the
//! storage nodes' control plane with a cluster certificate: a dev cluster's supervisor
//! identity (`--data-dir`), or the seeds and TLS material of any node's config (`--config`).

use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use warren_common::config::TlsPaths;
use warren_common::{Generation, NodeId};
use warren_storage::client::Registers;
use warren_storage::meta::{
    self, COMPUTE_NODES_KEY, ComputeRegistry, MemberState, NODES_KEY, NodeRegistry,
};

/// Arguments of `warren ctl`.
#[derive(clap::Args)]
pub struct CtlArgs {
    /// A `warren dev` data directory: use its node configs and its supervisor certificate.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    data_dir: Option<PathBuf>,
    /// Any node's config file (storage or compute): use its seeds and TLS material.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand)]
enum CtlCommand {
    /// List every node of both roles: zone, generation, state, lease, addresses.
    Nodes {
        /// How long to watch heartbeats to tell renewing nodes from stalled ones (ms).
        #[arg(long, default_value_t = 1200)]
        sample_ms: u64,
    },
    /// Evict a node by name or id (prefix): mark it evicted and raise its generation, so
    /// storage refuses that process; a live node that finds itself evicted joins again.
    Evict {
        /// The node's name (e.g. compute-0) or id.
        node: String,
    },
}

/// Name of the supervisor identity `warren dev` creates certificates for.
const SUPERVISOR_NAME: &str = "dev-supervisor";

/// Exit status for a node that does not exist (or a name that is ambiguous).
const EXIT_UNKNOWN_NODE: i32 = 2;

/// Run `warren ctl`.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let (seeds, tls) = match (&args.data_dir, &args.config) {
        (Some(dir), _) => from_dev_dir(dir)?,
        (None, Some(file)) => from_config(file)?,
        (None, None) => anyhow::bail!("give --data-dir or --config"),
    };
    let regs = Registers::connect(&seeds, &tls).context("connecting to the metadata registers")?;
    match args.command {
        CtlCommand::Nodes { sample_ms } => nodes(&regs, sample_ms, args.json).await,
        CtlCommand::Evict { node } => evict(&regs, &node, args.json).await,
    }
}

/// Seeds and TLS of a node config, whichever role it is for.
fn from_config(file: &Path) -> anyhow::Result<(Vec<SocketAddr>, TlsPaths)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let seeds = value
        .get("storage_seeds")
        .or_else(|| value.get("seeds"))
        .cloned()
        .with_context(|| format!("{}: no storage_seeds or seeds", file.display()))?;
    let seeds: Vec<SocketAddr> = seeds
        .try_into()
        .with_context(|| format!("{}: seeds", file.display()))?;
    let tls: TlsPaths = value
        .get("tls")
        .cloned()
        .with_context(|| format!("{}: no tls table", file.display()))?
        .try_into()
        .with_context(|| format!("{}: tls", file.display()))?;
    Ok((seeds, tls))
}

/// Seeds from a dev cluster's configs, TLS from its supervisor identity.
fn from_dev_dir(dir: &Path) -> anyhow::Result<(Vec<SocketAddr>, TlsPaths)> {
    let config_dir = dir.join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&config_dir)
        .with_context(|| format!("reading {}", config_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let file = files
        .first()
        .with_context(|| format!("no node configs in {}", config_dir.display()))?;
    let (seeds, _) = from_config(file)?;
    let tls_dir = dir.join("tls");
    let tls = TlsPaths {
        ca_cert: tls_dir.join("ca.pem"),
        cert: tls_dir.join(format!("{SUPERVISOR_NAME}.pem")),
        key: tls_dir.join(format!("{SUPERVISOR_NAME}.key.pem")),
    };
    Ok((seeds, tls))
}

/// One node as listed.
#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    role: &'static str,
    name: String,
    id: String,
    zone: String,
    generation: u64,
    state: MemberState,
    heartbeat: u64,
    /// Whether the heartbeat (or generation) moved while this command watched.
    renewing: bool,
    addresses: BTreeMap<&'static str, SocketAddr>,
}

async fn read_registries(regs: &Registers) -> anyhow::Result<(NodeRegistry, ComputeRegistry)> {
    let storage = match regs.get(NODES_KEY).await? {
        Some(b) => meta::decode(&b)?,
        None => NodeRegistry::default(),
    };
    let compute = match regs.get(COMPUTE_NODES_KEY).await? {
        Some(b) => meta::decode(&b)?,
        None => ComputeRegistry::default(),
    };
    Ok((storage, compute))
}

fn rows(storage: &NodeRegistry, compute: &ComputeRegistry) -> Vec<Row> {
    let mut out = Vec::new();
    for (id, r) in &storage.nodes {
        out.push(Row {
            role: "storage",
            name: r.name.clone(),
            id: id.0.to_string(),
            zone: r.zone.0.clone(),
            generation: r.generation.0,
            state: r.state,
            heartbeat: r.heartbeat,
            renewing: false,
            addresses: BTreeMap::from([("data", r.data_addr), ("control", r.control_addr)]),
        });
    }
    for (id, r) in &compute.nodes {
        out.push(Row {
            role: "compute",
            name: r.name.clone(),
            id: id.0.to_string(),
            zone: r.zone.0.clone(),
            generation: r.generation.0,
            state: r.state,
            heartbeat: r.heartbeat,
            renewing: false,
            addresses: BTreeMap::from([("amqp", r.amqp_addr), ("peer", r.peer_addr)]),
        });
    }
    out.sort_by(|a, b| (a.role, &a.name, &a.id).cmp(&(b.role, &b.name, &b.id)));
    out
}

async fn nodes(regs: &Registers, sample_ms: u64, json: bool) -> anyhow::Result<()> {
    let (s0, c0) = read_registries(regs).await?;
    let before = rows(&s0, &c0);
    // Leases are judged by whether heartbeats move, never by comparing clocks.
    tokio::time::sleep(Duration::from_millis(sample_ms)).await;
    let (s1, c1) = read_registries(regs).await?;
    let mut after = rows(&s1, &c1);
    for row in &mut after {
        row.renewing = before.iter().any(|b| {
            b.id == row.id
                && b.role == row.role
                && (b.heartbeat != row.heartbeat || b.generation != row.generation)
        });
    }
    #[allow(clippy::print_stdout)]
    if json {
        println!("{}", serde_json::to_string_pretty(&after)?);
    } else {
        println!(
            "{:<8} {:<12} {:<36} {:<8} {:>4} {:<8} {:>9} {:<8} ADDRESSES",
            "ROLE", "NAME", "ID", "ZONE", "GEN", "STATE", "HEARTBEAT", "LEASE"
        );
        for r in &after {
            let addrs: Vec<String> = r
                .addresses
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "{:<8} {:<12} {:<36} {:<8} {:>4} {:<8} {:>9} {:<8} {}",
                r.role,
                r.name,
                r.id,
                r.zone,
                r.generation,
                state_name(r.state),
                r.heartbeat,
                if r.renewing { "renewing" } else { "stalled" },
                addrs.join(" ")
            );
        }
    }
    Ok(())
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Active => "active",
        MemberState::Leaving => "leaving",
        MemberState::Evicted => "evicted",
    }
}

/// Which registry a node is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Storage,
    Compute,
}

/// The one node `wanted` names: by exact name (preferring a record not already evicted, as
/// an identity replaced after a disk loss keeps its name), by full id, or by id prefix.
fn resolve(
    wanted: &str,
    storage: &NodeRegistry,
    compute: &ComputeRegistry,
) -> Result<(Role, NodeId), String> {
    let all: Vec<(Role, NodeId, &str, MemberState)> = storage
        .nodes
        .iter()
        .map(|(id, r)| (Role::Storage, *id, r.name.as_str(), r.state))
        .chain(
            compute
                .nodes
                .iter()
                .map(|(id, r)| (Role::Compute, *id, r.name.as_str(), r.state)),
        )
        .collect();
    let wanted_lower = wanted.to_ascii_lowercase();
    let by_id: Vec<_> = all
        .iter()
        .filter(|(_, id, _, _)| {
            id.0.to_string() == wanted_lower
                || (wanted_lower.len() >= 4 && id.0.simple().to_string().starts_with(&wanted_lower))
        })
        .collect();
    let by_name: Vec<_> = all.iter().filter(|(_, _, n, _)| *n == wanted).collect();
    let candidates = if by_name.is_empty() { by_id } else { by_name };
    let live: Vec<_> = candidates
        .iter()
        .filter(|(_, _, _, s)| *s != MemberState::Evicted)
        .collect();
    match (candidates.as_slice(), live.as_slice()) {
        ([], _) => Err(format!("no node named or with id '{wanted}'")),
        ([(role, id, _, _)], _) | (_, [(role, id, _, _)]) => Ok((*role, *id)),
        _ => Err(format!(
            "'{wanted}' names several nodes: {}; give a full id",
            candidates
                .iter()
                .map(|(_, id, _, _)| id.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// What an eviction did.
#[derive(Debug, serde::Serialize)]
struct Evicted {
    role: &'static str,
    name: String,
    id: String,
    from_generation: u64,
    generation: u64,
    previous_state: MemberState,
}

async fn evict(regs: &Registers, wanted: &str, json: bool) -> anyhow::Result<()> {
    let (storage, compute) = read_registries(regs).await?;
    let (role, id) = match resolve(wanted, &storage, &compute) {
        Ok(found) => found,
        Err(message) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("warren ctl evict: {message}");
            }
            std::process::exit(EXIT_UNKNOWN_NODE);
        }
    };
    let key = match role {
        Role::Storage => NODES_KEY,
        Role::Compute => COMPUTE_NODES_KEY,
    };
    let mut done: Option<Evicted> = None;
    let result = regs
        .update(key, |cur| {
            done = None;
            let Some(cur) = cur else {
                return Err(anyhow::anyhow!("the {key} register is empty"));
            };
            let (value, what) = match role {
                Role::Storage => {
                    let mut reg: NodeRegistry = meta::decode(cur)?;
                    let r = reg
                        .nodes
                        .get_mut(&id)
                        .context("the node left the registry")?;
                    let what = mark_evicted(&mut r.generation, &mut r.state);
                    let name = r.name.clone();
                    (meta::encode(&reg), ("storage", name, what))
                }
                Role::Compute => {
                    let mut reg: ComputeRegistry = meta::decode(cur)?;
                    let r = reg
                        .nodes
                        .get_mut(&id)
                        .context("the node left the registry")?;
                    let what = mark_evicted(&mut r.generation, &mut r.state);
                    let name = r.name.clone();
                    (meta::encode(&reg), ("compute", name, what))
                }
            };
            let (role, name, (from, to, previous_state)) = what;
            done = Some(Evicted {
                role,
                name,
                id: id.0.to_string(),
                from_generation: from,
                generation: to,
                previous_state,
            });
            Ok(Some(value))
        })
        .await?;
    result?;
    let done = done.context("eviction did not run")?;
    #[allow(clippy::print_stdout)]
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "evicted {} node {} ({}): state {} -> evicted, generation {} -> {}",
            done.role,
            done.name,
            done.id,
            state_name(done.previous_state),
            done.from_generation,
            done.generation
        );
    }
    Ok(())
}

/// Mark a record evicted with the next generation; returns (old, new, previous state).
fn mark_evicted(generation: &mut Generation, state: &mut MemberState) -> (u64, u64, MemberState) {
    let before = (*generation, *state);
    *generation = Generation(generation.0 + 1);
    *state = MemberState::Evicted;
    (before.0.0, generation.0, before.1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use warren_storage::meta::{ComputeRecord, NodeRecord};

    #[test]
    fn nodes_resolve_by_name_preferring_live_records_then_by_id() {
        let mut storage = NodeRegistry::default();
        let (old, new, c0) = (NodeId::random(), NodeId::random(), NodeId::random());
        let rec = |state| NodeRecord {
            name: "storage-0".into(),
            zone: warren_common::Zone("zone-a".into()),
            data_addr: "127.0.0.1:1".parse().unwrap(),
            control_addr: "127.0.0.1:2".parse().unwrap(),
            generation: Generation(1),
            state,
            heartbeat: 0,
        };
        storage.nodes.insert(old, rec(MemberState::Evicted));
        storage.nodes.insert(new, rec(MemberState::Active));
        let mut compute = ComputeRegistry::default();
        compute.nodes.insert(
            c0,
            ComputeRecord {
                name: "compute-0".into(),
                zone: warren_common::Zone("zone-a".into()),
                amqp_addr: "127.0.0.1:3".parse().unwrap(),
                peer_addr: "127.0.0.1:4".parse().unwrap(),
                generation: Generation(2),
                state: MemberState::Active,
                heartbeat: 9,
            },
        );
        assert_eq!(
            resolve("storage-0", &storage, &compute),
            Ok((Role::Storage, new))
        );
        assert_eq!(
            resolve("compute-0", &storage, &compute),
            Ok((Role::Compute, c0))
        );
        assert_eq!(
            resolve(&old.0.to_string(), &storage, &compute),
            Ok((Role::Storage, old))
        );
        assert_eq!(
            resolve(&c0.0.simple().to_string()[..8], &storage, &compute),
            Ok((Role::Compute, c0))
        );
        assert!(resolve("compute-9", &storage, &compute).is_err());
    }
}
