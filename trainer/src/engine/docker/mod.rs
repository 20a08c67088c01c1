//! Docker sandboxes on one machine: a pool whose source is an image (`spec.template.image`,
//! no `source.localPath`) gets use-and-destroy containers, each the pool's sandbox pod as the
//! operator renders it ([`selfplay_crds::sandbox_pod`]) run by the Docker Engine through
//! [`plan::plan_pod`].
//!
//! What differs from a cluster, and why:
//! - the static sidecar is bind-mounted read-only instead of installed by the
//!   `install-sidecar` init container (no sidecar image is needed, nothing is pulled);
//! - the network is `none` and the sidecar serves a Unix socket (`--listen-unix`) in a
//!   private host directory instead of a pod port: nothing is published, nothing is reachable;
//! - the sidecar holds a lease (`--lease-file`): the trainer keeps an exclusive lock on it
//!   for as long as it lives, and a sidecar that can take the lock (the trainer died, even by
//!   SIGKILL) stops its container. Containers and volumes carry the owner's PID and start
//!   time as labels, and every provider removes those whose owner is gone when it starts.
//! - `emptyDir`s are tmpfs volumes (they count against the host's memory).

pub mod plan;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{HostPathVolumeSource, Pod, Volume, VolumeMount};
use sandbox_sidecar::SidecarClient;
use selfplay_crds::SandboxPoolSpec;
use selfplay_crds::sandbox_pod::{
    BIN_VOLUME, INSTALL_CONTAINER, SANDBOX_CONTAINER, SandboxPodInput, SidecarImage, TOKEN_KEY,
    TOKEN_VOLUME, sandbox_pod,
};
use tokio::process::Command;

use super::error::{InfraError, InfraKind};
use super::sandbox::{Lease, Sandbox, SandboxProvider};
use plan::{HostVolume, PlanOptions, PodPlan, plan_pod};

/// Label on everything a provider creates; its value is the owner (`PID-STARTTIME`).
pub const OWNER_LABEL: &str = "selfplay.dev/local-owner";
/// Label naming the run.
pub const RUN_LABEL: &str = "selfplay.dev/local-run";
/// Where the sandbox container sees its private host directory (socket and lease).
pub const RUN_DIR: &str = "/selfplay/run";
const RUN_VOLUME: &str = "selfplay-run";
const SOCKET: &str = "sidecar.sock";
const LEASE: &str = "lease";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

fn acquire_err(msg: impl Into<String>) -> InfraError {
    InfraError::new(InfraKind::Acquire, msg)
}

/// What a Docker provider serves.
#[derive(Clone, Debug)]
pub struct DockerProviderConfig {
    /// The run's name (a label on its containers).
    pub run: String,
    /// Pool name → its spec (the template's image, workdir, profile, resources…).
    pub pools: BTreeMap<String, SandboxPoolSpec>,
    /// A statically linked sidecar (or trainer) on this machine; it runs inside images of
    /// any distribution.
    pub sidecar: PathBuf,
    /// Where sandboxes' private directories go.
    pub work_dir: PathBuf,
    /// The docker CLI.
    pub docker: String,
    /// `--pids-limit` of every container.
    pub pids_limit: u64,
}

/// Use-and-destroy Docker containers.
#[derive(Debug)]
pub struct DockerProvider {
    cfg: DockerProviderConfig,
    /// Holds the lease lock for the provider's lifetime; its path is hard-linked into each
    /// sandbox's directory.
    _lease: nix::fcntl::Flock<File>,
    lease_path: PathBuf,
    bin_dir: PathBuf,
    owner: String,
    counter: AtomicU64,
}

/// `PID-STARTTIME` of this process: unique on this machine even when PIDs are reused.
pub fn owner_id(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the command name's closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid}-{start}"))
}

fn owner_alive(owner: &str) -> bool {
    let Some((pid, _)) = owner.split_once('-') else {
        return false;
    };
    pid.parse::<u32>()
        .ok()
        .and_then(owner_id)
        .is_some_and(|now| now == owner)
}

/// Runs `docker ARGS`, returning stdout; a failure carries stderr.
async fn docker(bin: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .trim()
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "{bin} {}: {tail}",
            args.first().map(String::as_str).unwrap_or("")
        ))
    }
}

fn docker_sync(bin: &str, args: &[&str]) -> Option<String> {
    std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Removes containers and volumes whose owner process is gone (a crashed or killed trainer).
/// Returns how many containers were removed.
pub fn reap_orphans(docker: &str) -> usize {
    let mut removed = 0;
    let format = format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    if let Some(list) = docker_sync(
        docker,
        &[
            "ps",
            "-a",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            &format,
        ],
    ) {
        for line in list.lines() {
            if let Some((id, owner)) = line.split_once(' ')
                && !owner_alive(owner.trim())
                && docker_sync(docker, &["rm", "-f", "-v", id]).is_some()
            {
                removed += 1;
            }
        }
    }
    let vformat = format!("{{{{.Name}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    if let Some(list) = docker_sync(
        docker,
        &[
            "volume",
            "ls",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            &vformat,
        ],
    ) {
        for line in list.lines() {
            if let Some((name, owner)) = line.split_once(' ')
                && !owner_alive(owner.trim())
            {
                let _ = docker_sync(docker, &["volume", "rm", "-f", name]);
            }
        }
    }
    removed
}

/// Whether `path` is a statically linked ELF executable (no program interpreter), i.e. one
/// that runs inside any image.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // 64-bit little-endian ELF only (the targets we build).
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    let mut has_load = false;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > bytes.len() {
            return false;
        }
        match u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) {
            3 => return false, // PT_INTERP: needs a dynamic loader from the image
            1 => has_load = true,
            _ => {}
        }
    }
    has_load
}

/// The pool's sandbox pod with the one-machine transport: the sidecar serves a Unix socket
/// in [`RUN_DIR`] (a host directory) and holds the trainer's lease.
pub fn local_pod(pool: &str, spec: &SandboxPoolSpec) -> Pod {
    let mut pod = sandbox_pod(&SandboxPodInput {
        pool,
        namespace: "local",
        spec,
        resources: selfplay_crds::sandbox_pod::sandbox_resources(spec),
        labels: BTreeMap::new(),
        owner: None,
        // Never run: the binary is bind-mounted instead (see the module's docs).
        sidecar: SidecarImage {
            image: "selfplay.invalid/sandbox-sidecar".to_string(),
            binary_path: "/sandbox-sidecar".to_string(),
            pull_policy: Some("Never".to_string()),
        },
        token_secret: format!("{pool}-sandbox-token"),
        generate_name: format!("{pool}-"),
    });
    if let Some(ps) = pod.spec.as_mut() {
        ps.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: RUN_VOLUME.to_string(),
            host_path: Some(HostPathVolumeSource {
                path: RUN_DIR.to_string(),
                type_: None,
            }),
            ..Default::default()
        });
        for c in ps
            .containers
            .iter_mut()
            .filter(|c| c.name == SANDBOX_CONTAINER)
        {
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: RUN_VOLUME.to_string(),
                    mount_path: RUN_DIR.to_string(),
                    ..Default::default()
                });
            if let Some(cmd) = c.command.as_mut() {
                let mut out = Vec::with_capacity(cmd.len() + 4);
                let mut it = cmd.drain(..);
                while let Some(a) = it.next() {
                    if a == "--listen" {
                        it.next();
                        out.push("--listen-unix".to_string());
                        out.push(format!("{RUN_DIR}/{SOCKET}"));
                    } else {
                        out.push(a);
                    }
                }
                drop(it);
                out.push("--lease-file".to_string());
                out.push(format!("{RUN_DIR}/{LEASE}"));
                *cmd = out;
            }
        }
    }
    pod
}

impl DockerProvider {
    /// Checks the Docker Engine answers, removes what crashed runs left, and takes the lease.
    pub fn new(cfg: DockerProviderConfig) -> Result<Self, InfraError> {
        if cfg.pools.is_empty() {
            return Err(acquire_err("no image pool given"));
        }
        if docker_sync(&cfg.docker, &["version", "--format", "{{.Server.Version}}"]).is_none() {
            return Err(acquire_err(format!(
                "pools {:?} run as Docker containers, but `{} version` cannot reach a Docker \
                 Engine (is it running, and may this user use it?)",
                cfg.pools.keys().collect::<Vec<_>>(),
                cfg.docker
            )));
        }
        if !is_static_elf(&cfg.sidecar) {
            return Err(acquire_err(format!(
                "{} is not a statically linked executable; image sandboxes need one that runs \
                 inside any image (scripts/build-static-sidecar.sh builds it, or set \
                 SELFPLAY_STATIC_SIDECAR)",
                cfg.sidecar.display()
            )));
        }
        let reaped = reap_orphans(&cfg.docker);
        if reaped > 0 {
            tracing::warn!(
                reaped,
                "removed sandbox containers left by a trainer that is gone"
            );
        }
        let pid = std::process::id();
        let owner = owner_id(pid).unwrap_or_else(|| format!("{pid}-0"));
        let io = |what: &str, p: &Path, e: std::io::Error| {
            acquire_err(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(&cfg.work_dir).map_err(|e| io("creating", &cfg.work_dir, e))?;
        // Docker resolves bind sources on its own side: they must be absolute.
        let mut cfg = cfg;
        cfg.work_dir =
            std::path::absolute(&cfg.work_dir).map_err(|e| io("resolving", &cfg.work_dir, e))?;
        cfg.sidecar =
            std::path::absolute(&cfg.sidecar).map_err(|e| io("resolving", &cfg.sidecar, e))?;
        let root = cfg.work_dir.join(format!("docker-{owner}"));
        std::fs::create_dir_all(&root).map_err(|e| io("creating", &root, e))?;
        // Private on the host: the sandboxes' sockets and tokens live below.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("securing", &root, e))?;
        let bin_dir = root.join("bin");
        std::fs::create_dir_all(&bin_dir).map_err(|e| io("creating", &bin_dir, e))?;
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("securing", &bin_dir, e))?;
        let bin = bin_dir.join("sandbox-sidecar");
        std::fs::copy(&cfg.sidecar, &bin).map_err(|e| io("copying the sidecar to", &bin, e))?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("securing", &bin, e))?;
        let lease_path = root.join(LEASE);
        let lease = File::create(&lease_path).map_err(|e| io("creating", &lease_path, e))?;
        std::fs::set_permissions(&lease_path, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| io("securing", &lease_path, e))?;
        let lease = nix::fcntl::Flock::lock(lease, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| acquire_err(format!("locking {}: {e}", lease_path.display())))?;
        Ok(Self {
            cfg,
            _lease: lease,
            lease_path,
            bin_dir,
            owner,
            counter: AtomicU64::new(0),
        })
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (OWNER_LABEL.to_string(), self.owner.clone()),
            (RUN_LABEL.to_string(), self.cfg.run.clone()),
        ])
    }

    async fn start(&self, pool: &str) -> Result<Sandbox, InfraError> {
        let spec = self
            .cfg
            .pools
            .get(pool)
            .ok_or_else(|| acquire_err(format!("no pool named {pool:?}")))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("selfplay-{}-{pid}-{n}", self.cfg.run);
        let root = self
            .lease_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let dir = root.join(format!("sandbox-{n}"));
        let run_dir = dir.join("run");
        let token_dir = dir.join("token");
        let mk = |d: &Path, mode: u32| -> Result<(), InfraError> {
            std::fs::create_dir_all(d)
                .and_then(|_| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| acquire_err(format!("creating {}: {e}", d.display())))
        };
        // The container's user (not ours) creates the socket; the parent stays private.
        mk(&run_dir, 0o777)?;
        mk(&token_dir, 0o755)?;
        std::fs::hard_link(&self.lease_path, run_dir.join(LEASE))
            .map_err(|e| acquire_err(format!("linking the lease: {e}")))?;
        let token = hex::encode(rand::random::<[u8; 24]>());
        let token_file = token_dir.join(TOKEN_KEY);
        std::fs::write(&token_file, &token)
            .and_then(|_| {
                std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o444))
            })
            .map_err(|e| acquire_err(format!("writing the token: {e}")))?;

        let pod = local_pod(pool, spec);
        let opts = PlanOptions {
            name_prefix: prefix,
            labels: self.labels(),
            network: "none".to_string(),
            host_volumes: BTreeMap::from([
                (
                    BIN_VOLUME.to_string(),
                    HostVolume {
                        path: self.bin_dir.clone(),
                        read_only: true,
                    },
                ),
                (
                    TOKEN_VOLUME.to_string(),
                    HostVolume {
                        path: token_dir.clone(),
                        read_only: true,
                    },
                ),
                (
                    RUN_VOLUME.to_string(),
                    HostVolume {
                        path: run_dir.clone(),
                        read_only: false,
                    },
                ),
            ]),
            skip_init: vec![INSTALL_CONTAINER.to_string()],
            pids_limit: Some(self.cfg.pids_limit),
            holder_binary: Some(self.bin_dir.join("sandbox-sidecar")),
            holder_lease: Some(run_dir.join(LEASE)),
        };
        let plan = plan_pod(&pod, &opts).map_err(|e| acquire_err(e.to_string()))?;
        let lease = DockerLease {
            docker: self.cfg.docker.clone(),
            containers: plan.container_names(),
            volumes: plan.volumes.iter().map(|v| v.name.clone()).collect(),
            dir: Some(dir),
        };
        let socket = run_dir.join(SOCKET);
        let client = run_plan(&self.cfg.docker, &plan, &socket, &token).await?;
        // The socket exists: from now on the sandbox's user (the agent's too) may not replace
        // it or the lease in the directory (a fake sidecar the trainer would reconnect to).
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| acquire_err(format!("securing {}: {e}", run_dir.display())))?;
        Ok(Sandbox::new(
            plan.main.name.clone(),
            pool,
            client,
            None,
            Box::new(lease),
        ))
    }
}

/// Creates the plan's volumes, runs its init containers to completion and starts its main
/// container (detached). An error names the step and carries Docker's message.
pub async fn start_plan(bin: &str, plan: &PodPlan) -> Result<(), String> {
    for v in &plan.volumes {
        let mut args = vec!["volume".to_string(), "create".to_string()];
        args.extend(v.create_args.iter().cloned());
        docker(bin, &args).await?;
    }
    if let Some(h) = &plan.holder {
        docker(bin, &h.args)
            .await
            .map_err(|e| format!("the volumes' holder: {e}"))?;
    }
    for r in &plan.init {
        docker(bin, &r.args)
            .await
            .map_err(|e| format!("init container {}: {e}", r.container))?;
    }
    docker(bin, &plan.main.args).await?;
    Ok(())
}

/// Removes the plan's containers and volumes (whatever of them exists).
pub fn remove_plan(bin: &str, plan: &PodPlan) {
    drop(DockerLease {
        docker: bin.to_string(),
        containers: plan.container_names(),
        volumes: plan.volumes.iter().map(|v| v.name.clone()).collect(),
        dir: Some(PathBuf::new()),
    });
}

/// Starts the plan and connects to its sidecar's socket.
async fn run_plan(
    bin: &str,
    plan: &PodPlan,
    socket: &Path,
    token: &str,
) -> Result<SidecarClient, InfraError> {
    start_plan(bin, plan).await.map_err(acquire_err)?;
    let started = Instant::now();
    let addr = format!("unix:{}", socket.display());
    loop {
        if socket.exists()
            && let Ok(c) = SidecarClient::connect(addr.clone(), token).await
        {
            return Ok(c);
        }
        let state = docker(
            bin,
            &[
                "inspect".to_string(),
                "--format".to_string(),
                "{{.State.Status}} {{.State.ExitCode}}".to_string(),
                plan.main.name.clone(),
            ],
        )
        .await
        .unwrap_or_default();
        if !state.starts_with("running") && !state.starts_with("created") {
            // What the sidecar said (it logs to stderr) and printed.
            let logs = std::process::Command::new(bin)
                .args(["logs", "--tail", "20", &plan.main.name])
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default();
            return Err(acquire_err(format!(
                "sandbox container {} stopped before its sidecar answered ({}): {}",
                plan.main.name,
                state.trim(),
                logs.trim()
            )));
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            return Err(acquire_err(format!(
                "the sidecar of {} did not answer within {STARTUP_TIMEOUT:?}",
                plan.main.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Removes one sandbox's containers, volumes and directory.
struct DockerLease {
    docker: String,
    containers: Vec<String>,
    volumes: Vec<String>,
    dir: Option<PathBuf>,
}

impl DockerLease {
    fn args(&self) -> (Vec<String>, Vec<String>) {
        let mut rm = vec!["rm".to_string(), "-f".to_string(), "-v".to_string()];
        rm.extend(self.containers.iter().cloned());
        let mut vrm = vec!["volume".to_string(), "rm".to_string(), "-f".to_string()];
        vrm.extend(self.volumes.iter().cloned());
        (rm, vrm)
    }
}

impl Lease for DockerLease {
    /// The agent cannot SIGKILL its sandbox's PID 1 (the kernel ignores it from inside the
    /// container, and the sidecar's seccomp filter refuses signals to it): a container that
    /// ended with exit 137 without the OOM killer was killed from outside (`docker kill`, the
    /// engine). An out-of-memory kill, or any other end, may be the agent's doing.
    fn external_failure(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let main = self.containers.last()?;
            let state = docker(
                &self.docker,
                &[
                    "inspect".to_string(),
                    "--format".to_string(),
                    "{{.State.Running}} {{.State.OOMKilled}} {{.State.ExitCode}}".to_string(),
                    main.clone(),
                ],
            )
            .await
            .ok()?;
            let f: Vec<&str> = state.split_whitespace().collect();
            (f.as_slice() == ["false", "false", "137"])
                .then(|| format!("container {main} was killed from outside (exit 137)"))
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), InfraError>> {
        Box::pin(async move {
            let (rm, vrm) = self.args();
            // `rm -f` of a container that never started fails harmlessly.
            let _ = docker(&self.docker, &rm).await;
            if !self.volumes.is_empty() {
                let _ = docker(&self.docker, &vrm).await;
            }
            if let Some(d) = self.dir.take() {
                let _ = tokio::fs::remove_dir_all(&d).await;
            }
            Ok(())
        })
    }
}

impl Drop for DockerLease {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let (rm, vrm) = self.args();
            let _ = std::process::Command::new(&self.docker)
                .args(&rm)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if !self.volumes.is_empty() {
                let _ = std::process::Command::new(&self.docker)
                    .args(&vrm)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            if !d.as_os_str().is_empty() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

impl SandboxProvider for DockerProvider {
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>> {
        Box::pin(self.start(pool))
    }

    fn pools(&self) -> Vec<String> {
        self.cfg.pools.keys().cloned().collect()
    }
}

impl Drop for DockerProvider {
    fn drop(&mut self) {
        if let Some(root) = self.lease_path.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
