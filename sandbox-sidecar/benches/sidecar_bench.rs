//! Side-by-side benchmark: this sidecar, SWE-ReX (its own server and client, through
//! bench/swerex_bench.py), and the floors (tonic round trip, a bash builtin in a persistent
//! bash, fork+exec of /bin/true). Prints one table.
//!
//! One-off exec is also measured on a program without libc (written by the bench): where
//! CPUID traps to the hypervisor, libc's start-up makes /bin/true's own floor, and that row
//! shows what the sidecar adds without it.
//!
//! `bench/run.sh` installs the peer in a venv and runs this with `--peer-python`.
//! Alone: `cargo bench -p sandbox-sidecar --bench sidecar_bench [-- --errors-n 10000]`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandbox_sidecar::client::limits_with_timeout;
use sandbox_sidecar::{SidecarClient, SpawnOptions, SpawnedSidecar};

struct Args {
    peer_python: Option<String>,
    openhands_python: Option<String>,
    errors_n: usize,
    peer_errors_n: usize,
    session_n: usize,
    exec_n: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        peer_python: None,
        openhands_python: None,
        errors_n: 10_000,
        peer_errors_n: 500,
        session_n: 2000,
        exec_n: 1000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--peer-python" => a.peer_python = Some(val),
            "--openhands-python" => a.openhands_python = Some(val),
            "--errors-n" => a.errors_n = val.parse().unwrap_or(a.errors_n),
            "--peer-errors-n" => a.peer_errors_n = val.parse().unwrap_or(a.peer_errors_n),
            "--session-n" => a.session_n = val.parse().unwrap_or(a.session_n),
            "--exec-n" => a.exec_n = val.parse().unwrap_or(a.exec_n),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn p50(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn processes_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

#[derive(Default)]
struct Ours {
    session_p50: f64,
    exec: ExecRow,
    /// The same for a program without libc, whose start-up is only the kernel's exec.
    exec_bare: Option<ExecRow>,
    throughput_ratio: f64,
    big_output_ms: f64,
    idle_rss_mb: f64,
    cold_start_ms: f64,
    errors: usize,
    errors_n: usize,
    left_after_timeout: usize,
    tonic_rtt_ms: f64,
}

/// One-off exec of a program, with its floors measured in the same loop: on a VM they drift
/// by half a millisecond within a minute (every new process's libc start-up makes CPUID
/// calls, each a trap to the hypervisor), so separate loops would compare different machines.
#[derive(Default)]
struct ExecRow {
    p50: f64,
    /// The sidecar's own `duration_us`: from spawning the command to having reaped it.
    inside_p50: f64,
    /// fork+exec of the same program from this process.
    fork_exec: f64,
    /// A `health` round trip.
    rtt: f64,
}

async fn exec_vs_floor(c: &SidecarClient, program: &str, n: usize) -> ExecRow {
    let (mut lat, mut inside, mut floor, mut rtt) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        let out = c.exec_argv(&[program], None).await.expect("exec");
        lat.push(t.elapsed());
        inside.push(Duration::from_micros(out.duration_us));
        assert_eq!(out.exit_code, 0, "{program}: {out:?}");
        let t = Instant::now();
        let st = Command::new(program).status().expect("fork+exec");
        floor.push(t.elapsed());
        assert!(st.success());
        let t = Instant::now();
        c.health().await.expect("health");
        rtt.push(t.elapsed());
    }
    ExecRow {
        p50: ms(p50(lat)),
        inside_p50: ms(p50(inside)),
        fork_exec: ms(p50(floor)),
        rtt: ms(p50(rtt)),
    }
}

/// Writes a static x86-64 program that only calls `exit(0)` (no libc, so no CPUID calls at
/// start-up) and returns its path; `None` on other architectures.
fn bare_program(dir: &std::path::Path) -> Option<String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return None;
    }
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    // xor edi, edi; mov eax, 60 (exit); syscall
    let code: [u8; 9] = [0x31, 0xff, 0xb8, 60, 0, 0, 0, 0x0f, 0x05];
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    let path = dir.join("bare-exit0");
    std::fs::write(&path, &elf).ok()?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).ok()?;
    Some(path.to_string_lossy().into_owned())
}

fn opts(ws: &std::path::Path) -> SpawnOptions {
    let mut o = SpawnOptions::new(ws);
    o.binary = Some(env!("CARGO_BIN_EXE_sandbox-sidecar").into());
    o
}

async fn measure_ours(a: &Args, ws: &std::path::Path) -> Ours {
    let mut r = Ours {
        errors_n: a.errors_n,
        ..Default::default()
    };
    // Cold start: process start until the first answered call.
    let mut colds = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let s = SpawnedSidecar::spawn(opts(ws)).await.expect("spawn");
        let c = s.connect().await.expect("connect");
        c.health().await.expect("health");
        colds.push(t.elapsed());
        s.shutdown(Duration::from_secs(2)).await;
    }
    r.cold_start_ms = ms(p50(colds));

    let s = SpawnedSidecar::spawn(opts(ws)).await.expect("spawn");
    let c: SidecarClient = s.connect().await.expect("connect");
    c.health().await.expect("health");
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.idle_rss_mb = rss_mb(s.pid());

    let mut lat = Vec::new();
    for _ in 0..a.session_n.max(100) {
        let t = Instant::now();
        c.health().await.expect("health");
        lat.push(t.elapsed());
    }
    r.tonic_rtt_ms = ms(p50(lat));

    for _ in 0..50 {
        c.session_run("s", "echo hello", None)
            .await
            .expect("warm up");
    }
    let mut lat = Vec::new();
    for _ in 0..a.session_n {
        let t = Instant::now();
        let out = c
            .session_run("s", "echo hello", None)
            .await
            .expect("session");
        lat.push(t.elapsed());
        assert_eq!(out.stdout, b"hello\n");
    }
    r.session_p50 = ms(p50(lat));

    r.exec = exec_vs_floor(&c, "/bin/true", a.exec_n).await;
    if let Some(bare) = bare_program(ws) {
        r.exec_bare = Some(exec_vs_floor(&c, &bare, a.exec_n).await);
    }

    // Throughput on `sleep 0.1`, one-off commands: 8 concurrent clients vs 1.
    let per_client = 10;
    let t = Instant::now();
    for _ in 0..per_client {
        c.exec_argv(&["sleep", "0.1"], None).await.expect("sleep");
    }
    let one = per_client as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // Separate connections, as separate clients would have.
        let cc = s.connect().await.expect("connect");
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                cc.exec_argv(&["sleep", "0.1"], None).await.expect("sleep");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    let eight = (8 * per_client) as f64 / t.elapsed().as_secs_f64();
    r.throughput_ratio = eight / one;

    // 10 MB of output in a session: answered (capped) how fast?
    let mut lat = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = c
            .session_run("s", "head -c 10000000 /dev/zero | tr '\\0' x; echo", None)
            .await
            .expect("big");
        lat.push(t.elapsed());
        assert!(out.truncated && out.stdout_total_bytes == 10_000_001);
    }
    r.big_output_ms = ms(p50(lat));

    // Errors over many session commands: any wrong output, exit code or failed call.
    for i in 0..a.errors_n {
        match c.session_run("e", &format!("echo {i}"), None).await {
            Ok(o) if o.exit_code == 0 && o.stdout == format!("{i}\n").as_bytes() => {}
            _ => r.errors += 1,
        }
    }

    // Children left after a timeout.
    let marker = "sleep 100.8181";
    let _ = c
        .session_run(
            "t",
            &format!("bash -c '{marker} & {marker}'"),
            Some(limits_with_timeout(Duration::from_millis(500))),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = processes_matching(marker);
    r.left_after_timeout = left.len();
    for pid in left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    s.shutdown(Duration::from_secs(2)).await;
    r
}

/// A builtin's round trip in a persistent bash over pipes.
fn bash_builtin_floor(n: usize) -> f64 {
    let mut child = Command::new("bash")
        .args(["--noprofile", "--norc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bash");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lat = Vec::new();
    let mut line = String::new();
    for i in 0..n + 100 {
        let t = Instant::now();
        stdin.write_all(b"echo x\n").expect("write");
        stdin.flush().expect("flush");
        line.clear();
        stdout.read_line(&mut line).expect("read");
        if i >= 100 {
            lat.push(t.elapsed());
        }
    }
    drop(stdin);
    let _ = child.wait();
    ms(p50(lat))
}

fn run_peer(python: &str, script: &str, errors_n: usize) -> Option<serde_json::Value> {
    eprintln!("running {script} with {python} (SWE-ReX's 10 MB case alone takes about a minute)");
    let out = Command::new(python)
        .arg(script)
        .args(["--errors-n", &errors_n.to_string()])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.starts_with('{'))?;
    serde_json::from_str(last).ok()
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) => format!("{x:.digits$}"),
        None => "n/a".into(),
    }
}

fn main() {
    let a = parse_args();
    let ws = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    eprintln!("measuring sandbox-sidecar ...");
    let ours = rt.block_on(measure_ours(&a, ws.path()));
    eprintln!("measuring floors ...");
    let builtin = bash_builtin_floor(2000);
    let dir = env!("CARGO_MANIFEST_DIR");
    let peer = a
        .peer_python
        .as_deref()
        .and_then(|p| run_peer(p, &format!("{dir}/bench/swerex_bench.py"), a.peer_errors_n));
    let oh = a.openhands_python.as_deref().and_then(|p| {
        run_peer(
            p,
            &format!("{dir}/bench/openhands_bench.py"),
            a.peer_errors_n,
        )
    });
    let pf = |k: &str| {
        peer.as_ref()
            .and_then(|p| p.get(k))
            .and_then(|v| v.as_f64())
    };
    let of = |k: &str| oh.as_ref().and_then(|p| p.get(k)).and_then(|v| v.as_f64());

    println!();
    println!("| metric | goal | ours | SWE-ReX | OpenHands | floor | SWE-ReX ÷ ours |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let ratio = |peer: Option<f64>, ours: f64| match peer {
        Some(p) if ours > 0.0 => format!("{:.1}×", p / ours),
        _ => "n/a".into(),
    };
    println!(
        "| session command p50 (ms) | ≤ 0.5 | {:.3} | {} | no session call | {:.3} (bash builtin) + {:.3} (tonic round trip) | {} |",
        ours.session_p50,
        fmt(pf("session_p50_ms"), 1),
        builtin,
        ours.tonic_rtt_ms,
        ratio(pf("session_p50_ms"), ours.session_p50)
    );
    println!(
        "| one-off exec p50 (ms) | ≤ 1.5 | {:.3} | {} | {} | {:.3} (fork+exec /bin/true) + {:.3} (tonic) = {:.3} | {} |",
        ours.exec.p50,
        fmt(pf("exec_p50_ms"), 2),
        fmt(of("exec_p50_ms"), 2),
        ours.exec.fork_exec,
        ours.exec.rtt,
        ours.exec.fork_exec + ours.exec.rtt,
        ratio(pf("exec_p50_ms"), ours.exec.p50)
    );
    println!(
        "| of which inside the sidecar, spawn to reaped, p50 (ms) | — | {:.3} | — | — | {:.3} (fork+exec /bin/true) | — |",
        ours.exec.inside_p50, ours.exec.fork_exec,
    );
    if let Some(bare) = &ours.exec_bare {
        println!(
            "| one-off exec p50 of a program without libc start-up (ms) | — | {:.3} | — | — | {:.3} (fork+exec of it) + {:.3} (tonic) = {:.3} | — |",
            bare.p50,
            bare.fork_exec,
            bare.rtt,
            bare.fork_exec + bare.rtt
        );
        println!(
            "| of which inside the sidecar (ms) | — | {:.3} | — | — | {:.3} (fork+exec of it) | — |",
            bare.inside_p50, bare.fork_exec
        );
    }
    println!(
        "| throughput, 8 clients ÷ 1 client, `sleep 0.1` | ≥ 6 | {:.2} | {} | {} | 8 | {} |",
        ours.throughput_ratio,
        fmt(pf("throughput_ratio_8v1"), 2),
        fmt(of("throughput_ratio_8v1"), 2),
        match pf("throughput_ratio_8v1") {
            Some(p) => format!("{:.1}× (ours ÷ SWE-ReX)", ours.throughput_ratio / p),
            None => "n/a".into(),
        }
    );
    println!(
        "| 10 MB output (ms; ours and SWE-ReX in a session) | ≤ 100 | {:.1} (capped to 480 KB) | {} (uncapped) | {} (one-off, uncapped) | — | {} |",
        ours.big_output_ms,
        fmt(pf("big_output_ms"), 0),
        fmt(of("big_output_ms"), 0),
        ratio(pf("big_output_ms"), ours.big_output_ms)
    );
    println!(
        "| idle RSS (MB) | ≤ 10 | {:.1} | {} | {} | — | {} |",
        ours.idle_rss_mb,
        fmt(pf("idle_rss_mb"), 1),
        fmt(of("idle_rss_mb"), 1),
        ratio(pf("idle_rss_mb"), ours.idle_rss_mb)
    );
    println!(
        "| cold start to first answer (ms) | ≤ 50 | {:.1} | {} | {} | — | {} |",
        ours.cold_start_ms,
        fmt(pf("cold_start_ms"), 0),
        fmt(of("cold_start_ms"), 0),
        ratio(pf("cold_start_ms"), ours.cold_start_ms)
    );
    println!(
        "| errors in N commands | 0 in 10,000 | {} in {} | {} | {} | 0 | — |",
        ours.errors,
        ours.errors_n,
        match (pf("errors"), pf("errors_n")) {
            (Some(e), Some(n)) => format!("{e} in {n}"),
            _ => "n/a".into(),
        },
        match (of("errors"), of("errors_n")) {
            (Some(e), Some(n)) => format!("{e} in {n}"),
            _ => "n/a".into(),
        }
    );
    println!(
        "| processes left after a timeout | 0 | {} | {} | {} | 0 | — |",
        ours.left_after_timeout,
        fmt(pf("left_after_timeout"), 0),
        fmt(of("left_after_timeout"), 0)
    );
    println!();
    if let Some(p) = &peer {
        println!("SWE-ReX raw: {p}");
    }
    if let Some(p) = &oh {
        println!("OpenHands raw: {p}");
    }
}
