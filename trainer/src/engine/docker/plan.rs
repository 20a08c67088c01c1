//! A Kubernetes Pod as `docker` commands: the sandbox pod the operator renders, run by a
//! Docker Engine on one machine.
//!
//! Init containers run one after the other to completion (`docker run --rm`), then the pod's
//! container runs detached. Each security setting maps to its Docker equivalent, and a field
//! this translation cannot honour is an error, never silently dropped:
//!
//! | Pod                                   | docker run                                   |
//! |---------------------------------------|----------------------------------------------|
//! | `runAsUser`/`runAsGroup` (container or pod) | `--user U:G`                           |
//! | `fsGroup`                             | `--group-add G`, and owns `emptyDir`s        |
//! | `runAsNonRoot: true`                  | refused unless a non-zero user is set        |
//! | `capabilities.drop`/`add`             | `--cap-drop`/`--cap-add`                      |
//! | `allowPrivilegeEscalation: false`     | `--security-opt no-new-privileges`           |
//! | `seccompProfile: RuntimeDefault`      | Docker's default profile (no flag)           |
//! | `readOnlyRootFilesystem`              | `--read-only`                                |
//! | `resources.limits` cpu / memory       | `--cpus` / `--memory` (+ same swap)          |
//! | `command` / `args`                    | `--entrypoint` + arguments (image CMD dropped)|
//! | `emptyDir` (+ `sizeLimit`)            | a tmpfs volume of that size, mode 0777, group `fsGroup` |
//! | `secret`, other volumes               | a host directory the caller provides         |
//! | pod network                           | the caller's network (`none` by default)     |
//! | `runtimeClassName`                    | `--runtime` (a runtime registered with Docker) |
//!
//! `activeDeadlineSeconds`, probes and ports have no Docker counterpart here: the caller
//! enforces lifetimes and waits for the sidecar itself.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod, PodSecurityContext, SecurityContext};
use thiserror::Error;

use crate::train::config::quantity_bytes;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the pod has no spec")]
    NoSpec,
    #[error("container {container}: {what} cannot be run with Docker here")]
    Unsupported { container: String, what: String },
    #[error("volume {0}: no host directory was given for it and it is not an emptyDir")]
    UnboundVolume(String),
    #[error("container {container}: runAsNonRoot is set but no non-root user is")]
    RootUser { container: String },
    #[error("container {container}: bad quantity {value:?} for {what}")]
    Quantity {
        container: String,
        what: String,
        value: String,
    },
}

/// A host directory standing in for one of the pod's volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostVolume {
    pub path: PathBuf,
    /// Mounted read-only wherever the pod mounts it (besides the pod's own `readOnly`).
    pub read_only: bool,
}

/// How to run the pod here.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Container and volume names start with this (unique per sandbox).
    pub name_prefix: String,
    /// Docker labels on every container and volume (for reaping).
    pub labels: BTreeMap<String, String>,
    /// `--network` of every container; `none` when empty.
    pub network: String,
    /// Pod volume name → host directory. Volumes not named here must be `emptyDir`s.
    pub host_volumes: BTreeMap<String, HostVolume>,
    /// Init containers not to run (their work is done by a host volume instead).
    pub skip_init: Vec<String>,
    /// `--pids-limit` of every container (the kubelet's pod PID limit on a node).
    pub pids_limit: Option<u64>,
    /// The static sidecar on this machine, run as the pod's holder (`sandbox-sidecar pause`)
    /// when the pod has `emptyDir`s; see [`PodPlan::holder`].
    pub holder_binary: Option<PathBuf>,
    /// A lease file on this machine the holder watches (it stops once the lease is free).
    pub holder_lease: Option<PathBuf>,
}

/// A Docker volume to create before the containers run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePlan {
    pub name: String,
    /// `docker volume create` arguments after `create`.
    pub create_args: Vec<String>,
}

/// One `docker run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPlan {
    /// The pod's container name.
    pub container: String,
    /// The Docker container's name.
    pub name: String,
    /// Arguments after `docker`.
    pub args: Vec<String>,
}

/// Everything to do, in order: create `volumes`, start `holder`, run each of `init` to
/// completion, start `main` detached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub volumes: Vec<VolumePlan>,
    /// Holds the tmpfs volumes mounted from before the first init container until the pod is
    /// removed: Docker mounts a tmpfs volume afresh whenever no running container uses it, so
    /// without a holder what an init container writes would be gone when the next starts
    /// (the kubelet's pause container plays this part for a pod's namespaces).
    pub holder: Option<RunPlan>,
    pub init: Vec<RunPlan>,
    pub main: RunPlan,
}

impl PodPlan {
    /// Names of the Docker containers, the sandbox last.
    pub fn container_names(&self) -> Vec<String> {
        self.holder
            .iter()
            .chain(self.init.iter())
            .chain(std::iter::once(&self.main))
            .map(|r| r.name.clone())
            .collect()
    }
}

/// Translates `pod` (one main container) into Docker commands.
pub fn plan_pod(pod: &Pod, opts: &PlanOptions) -> Result<PodPlan, PlanError> {
    let spec = pod.spec.as_ref().ok_or(PlanError::NoSpec)?;
    let pod_sec = spec.security_context.clone().unwrap_or_default();
    let fs_group = pod_sec.fs_group;
    let runtime = spec.runtime_class_name.as_deref();
    if spec.containers.len() != 1 {
        return Err(PlanError::Unsupported {
            container: "(pod)".to_string(),
            what: format!("{} containers (one is supported)", spec.containers.len()),
        });
    }

    let mut volume_plans = Vec::new();
    // Pod volume name → Docker `--mount` source and whether it is a host path.
    let mut sources: BTreeMap<String, (String, bool, bool)> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(h) = opts.host_volumes.get(&v.name) {
            sources.insert(
                v.name.clone(),
                (h.path.to_string_lossy().into_owned(), true, h.read_only),
            );
        } else if let Some(ed) = &v.empty_dir {
            let name = format!("{}-{}", opts.name_prefix, v.name);
            // An emptyDir is a directory of mode 0777 that fsGroup owns; a tmpfs volume is
            // the Docker volume that starts empty with an owner and a size of our choosing.
            let mut o = vec!["mode=0777".to_string()];
            if let Some(g) = fs_group {
                o.push(format!("gid={g}"));
            }
            if let Some(limit) = &ed.size_limit {
                let bytes = quantity_bytes(&limit.0).ok_or_else(|| PlanError::Quantity {
                    container: "(pod)".to_string(),
                    what: format!("volume {} sizeLimit", v.name),
                    value: limit.0.clone(),
                })?;
                o.push(format!("size={bytes}"));
            }
            let mut create_args = vec![
                "--driver".to_string(),
                "local".to_string(),
                "--opt".to_string(),
                "type=tmpfs".to_string(),
                "--opt".to_string(),
                "device=tmpfs".to_string(),
                "--opt".to_string(),
                format!("o={}", o.join(",")),
            ];
            for (k, val) in &opts.labels {
                create_args.extend(["--label".to_string(), format!("{k}={val}")]);
            }
            create_args.push(name.clone());
            volume_plans.push(VolumePlan {
                name: name.clone(),
                create_args,
            });
            sources.insert(v.name.clone(), (name, false, false));
        } else {
            return Err(PlanError::UnboundVolume(v.name.clone()));
        }
    }

    let mut init = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        if opts.skip_init.contains(&c.name) {
            continue;
        }
        init.push(run_plan(c, &pod_sec, runtime, &sources, opts, true)?);
    }
    let main = run_plan(
        &spec.containers[0],
        &pod_sec,
        runtime,
        &sources,
        opts,
        false,
    )?;
    let holder = if volume_plans.is_empty() {
        None
    } else {
        let binary = opts
            .holder_binary
            .as_ref()
            .ok_or_else(|| PlanError::Unsupported {
                container: "(pod)".to_string(),
                what: "emptyDir volumes without a holder binary".to_string(),
            })?;
        Some(holder_plan(
            &spec.containers[0],
            &pod_sec,
            &volume_plans,
            binary,
            opts,
        )?)
    };
    Ok(PodPlan {
        volumes: volume_plans,
        holder,
        init,
        main,
    })
}

/// Where the holder sees its binary, lease and volumes (nothing else of it is used).
const HOLDER_DIR: &str = "/selfplay-holder";

/// The holder: the main container's image and user, nothing but the static sidecar pausing,
/// with every tmpfs volume mounted.
fn holder_plan(
    main: &Container,
    pod_sec: &PodSecurityContext,
    volumes: &[VolumePlan],
    binary: &std::path::Path,
    opts: &PlanOptions,
) -> Result<RunPlan, PlanError> {
    let name = format!("{}-holder", opts.name_prefix);
    let mut a = vec![
        "run".to_string(),
        "--detach".to_string(),
        "--name".to_string(),
        name.clone(),
        "--network".to_string(),
        "none".to_string(),
    ];
    for (k, v) in &opts.labels {
        a.extend(["--label".to_string(), format!("{k}={v}")]);
    }
    security_args(main, pod_sec, &mut a)?;
    a.extend([
        "--memory".to_string(),
        "32m".to_string(),
        "--pids-limit".to_string(),
        "8".to_string(),
        "--mount".to_string(),
        format!(
            "type=bind,source={},target={HOLDER_DIR}/sandbox-sidecar,readonly",
            binary.display()
        ),
    ]);
    for (i, v) in volumes.iter().enumerate() {
        a.extend([
            "--mount".to_string(),
            format!(
                "type=volume,source={},target={HOLDER_DIR}/volume-{i}",
                v.name
            ),
        ]);
    }
    let mut rest = vec!["pause".to_string()];
    if let Some(lease) = &opts.holder_lease {
        a.extend([
            "--mount".to_string(),
            format!(
                "type=bind,source={},target={HOLDER_DIR}/lease,readonly",
                lease.display()
            ),
        ]);
        rest.extend(["--lease-file".to_string(), format!("{HOLDER_DIR}/lease")]);
    }
    a.extend([
        "--entrypoint".to_string(),
        format!("{HOLDER_DIR}/sandbox-sidecar"),
    ]);
    a.push(
        main.image
            .clone()
            .ok_or_else(|| unsupported(main, "a container without an image"))?,
    );
    a.extend(rest);
    Ok(RunPlan {
        container: "holder".to_string(),
        name,
        args: a,
    })
}

fn unsupported(c: &Container, what: impl Into<String>) -> PlanError {
    PlanError::Unsupported {
        container: c.name.clone(),
        what: what.into(),
    }
}

fn run_plan(
    c: &Container,
    pod_sec: &PodSecurityContext,
    runtime: Option<&str>,
    sources: &BTreeMap<String, (String, bool, bool)>,
    opts: &PlanOptions,
    is_init: bool,
) -> Result<RunPlan, PlanError> {
    let name = format!("{}-{}", opts.name_prefix, c.name);
    let mut a: Vec<String> = vec!["run".to_string()];
    if is_init {
        a.push("--rm".to_string());
    } else {
        a.push("--detach".to_string());
    }
    a.extend(["--name".to_string(), name.clone()]);
    for (k, v) in &opts.labels {
        a.extend(["--label".to_string(), format!("{k}={v}")]);
    }
    let network = if opts.network.is_empty() {
        "none"
    } else {
        &opts.network
    };
    a.extend(["--network".to_string(), network.to_string()]);
    // A RuntimeClass names the OCI runtime's handler (`runsc` for gVisor, `kata`): Docker
    // calls registered runtimes by name.
    if let Some(r) = runtime {
        a.extend(["--runtime".to_string(), r.to_string()]);
    }

    security_args(c, pod_sec, &mut a)?;

    if let Some(res) = &c.resources
        && let Some(limits) = &res.limits
    {
        if let Some(mem) = limits.get("memory") {
            let bytes = quantity_bytes(&mem.0).ok_or_else(|| PlanError::Quantity {
                container: c.name.clone(),
                what: "memory limit".to_string(),
                value: mem.0.clone(),
            })?;
            // The same swap limit: a pod on a node has no swap.
            a.extend([
                "--memory".to_string(),
                bytes.to_string(),
                "--memory-swap".to_string(),
                bytes.to_string(),
            ]);
        }
        if let Some(cpu) = limits.get("cpu") {
            let cores = cpu_cores(&cpu.0).ok_or_else(|| PlanError::Quantity {
                container: c.name.clone(),
                what: "cpu limit".to_string(),
                value: cpu.0.clone(),
            })?;
            a.extend(["--cpus".to_string(), format!("{cores}")]);
        }
        for k in limits.keys() {
            if k != "memory" && k != "cpu" && k != "ephemeral-storage" {
                return Err(unsupported(c, format!("the resource limit {k}")));
            }
        }
    }
    if let Some(p) = opts.pids_limit {
        a.extend(["--pids-limit".to_string(), p.to_string()]);
    }

    for e in c.env.iter().flatten() {
        if e.value_from.is_some() {
            return Err(unsupported(c, format!("env {} from a reference", e.name)));
        }
        a.extend([
            "--env".to_string(),
            format!("{}={}", e.name, e.value.clone().unwrap_or_default()),
        ]);
    }
    if c.env_from.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(unsupported(c, "envFrom"));
    }
    if let Some(w) = &c.working_dir {
        a.extend(["--workdir".to_string(), w.clone()]);
    }
    for m in c.volume_mounts.iter().flatten() {
        let (src, host, host_ro) = sources
            .get(&m.name)
            .ok_or_else(|| PlanError::UnboundVolume(m.name.clone()))?;
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            return Err(unsupported(c, format!("subPath on {}", m.name)));
        }
        let ro = m.read_only.unwrap_or(false) || *host_ro;
        let kind = if *host { "bind" } else { "volume" };
        let mut spec = format!("type={kind},source={src},target={}", m.mount_path);
        if ro {
            spec.push_str(",readonly");
        }
        a.extend(["--mount".to_string(), spec]);
    }

    let image = c
        .image
        .clone()
        .ok_or_else(|| unsupported(c, "a container without an image"))?;
    let command = c.command.clone().unwrap_or_default();
    let args = c.args.clone().unwrap_or_default();
    let mut rest = Vec::new();
    match command.split_first() {
        Some((entry, tail)) => {
            a.extend(["--entrypoint".to_string(), entry.clone()]);
            rest.extend(tail.iter().cloned());
            rest.extend(args);
        }
        None if !args.is_empty() => rest.extend(args),
        None => {}
    }
    a.push(image);
    a.extend(rest);
    Ok(RunPlan {
        container: c.name.clone(),
        name,
        args: a,
    })
}

fn security_args(
    c: &Container,
    pod: &PodSecurityContext,
    a: &mut Vec<String>,
) -> Result<(), PlanError> {
    let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        return Err(unsupported(c, "privileged"));
    }
    let user = sc.run_as_user.or(pod.run_as_user);
    let group = sc.run_as_group.or(pod.run_as_group);
    let non_root = sc.run_as_non_root.or(pod.run_as_non_root).unwrap_or(false);
    match (user, group) {
        (Some(u), Some(g)) => a.extend(["--user".to_string(), format!("{u}:{g}")]),
        (Some(u), None) => a.extend(["--user".to_string(), u.to_string()]),
        (None, Some(_)) => return Err(unsupported(c, "runAsGroup without runAsUser")),
        (None, None) => {}
    }
    // The kubelet refuses to start a runAsNonRoot container whose user is root or unknown
    // numerically; without a numeric user we cannot check the image's, so refuse as well.
    if non_root && user.is_none_or(|u| u == 0) {
        return Err(PlanError::RootUser {
            container: c.name.clone(),
        });
    }
    if let Some(g) = pod.fs_group {
        a.extend(["--group-add".to_string(), g.to_string()]);
    }
    for g in pod.supplemental_groups.iter().flatten() {
        a.extend(["--group-add".to_string(), g.to_string()]);
    }
    if let Some(caps) = &sc.capabilities {
        for d in caps.drop.iter().flatten() {
            a.extend(["--cap-drop".to_string(), d.clone()]);
        }
        for d in caps.add.iter().flatten() {
            a.extend(["--cap-add".to_string(), d.clone()]);
        }
    }
    if sc.allow_privilege_escalation == Some(false) {
        a.extend([
            "--security-opt".to_string(),
            "no-new-privileges".to_string(),
        ]);
    }
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(pod.seccomp_profile.as_ref())
        .map(|s| s.type_.as_str());
    match seccomp {
        // Docker applies its default profile unless told otherwise.
        Some("RuntimeDefault") | None => {}
        Some("Unconfined") => a.extend([
            "--security-opt".to_string(),
            "seccomp=unconfined".to_string(),
        ]),
        Some(other) => return Err(unsupported(c, format!("seccomp profile {other}"))),
    }
    if sc.read_only_root_filesystem == Some(true) {
        a.push("--read-only".to_string());
    }
    Ok(())
}

/// Cores of a CPU quantity (`1`, `0.5`, `500m`).
fn cpu_cores(q: &str) -> Option<f64> {
    let q = q.trim();
    let v = match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => q.parse::<f64>().ok()?,
    };
    (v > 0.0 && v.is_finite()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(cpu_cores("500m"), Some(0.5));
        assert_eq!(cpu_cores("2"), Some(2.0));
        assert_eq!(cpu_cores("0"), None);
        assert_eq!(cpu_cores("x"), None);
    }
}
