//! What every child of the sidecar gets before `exec`: a seccomp filter that keeps it from
//! signalling or tracing the sidecar, and with `serve --confine` a private mount namespace
//! hiding the sidecar's state and token, and no capabilities.
//!
//! The commands are the adversary's: they run as the sidecar's own user, so without this
//! `kill -9 $PPID`, `kill -9 -1` or `kill 1` (the sidecar is PID 1 in a pod) would end the
//! episode on the agent's terms, and `cat $STATE_DIR/objects/*` would read the snapshot of
//! the solution or the stashed oracle files.
//!
//! The filter is plain classic BPF written here (a dozen rules do not justify a seccomp
//! crate). It is built before the child is started, because the child may only make
//! async-signal-safe system calls; [`current`] rebuilds it only when the set of the
//! sidecar's threads changed.
//!
//! Threads matter because `kill(tid)` of any thread signals the whole process, and the
//! threads' ids are listed in `/proc/<pid>/task`. The runtime registers each thread it
//! starts ([`protect_current_thread`]); the CLI also starts the blocking pool's threads up
//! front and keeps them, so a long-lived bash session's filter, built when it started,
//! still covers every thread.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Everything a child applies before `exec`, prepared by the parent.
#[derive(Debug)]
pub struct Prepared {
    /// The seccomp program; `None` on an architecture the filter does not know.
    filter: Option<Vec<libc::sock_filter>>,
    confine: Option<Confinement>,
}

#[derive(Debug)]
struct Confinement {
    hide: Vec<CString>,
}

#[derive(Default)]
struct Registry {
    threads: Vec<i32>,
    confine: Option<Vec<PathBuf>>,
    cached: Option<Arc<Prepared>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    threads: Vec::new(),
    confine: None,
    cached: None,
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Adds the calling thread to the ids no child may signal (from the runtime's
/// `on_thread_start`).
pub fn protect_current_thread() {
    let tid = gettid();
    let mut r = registry();
    if !r.threads.contains(&tid) {
        r.threads.push(tid);
        r.cached = None;
    }
}

/// Removes the calling thread again (from `on_thread_stop`): its id may be reused by one
/// of the agent's processes, which other commands must be able to kill.
pub fn forget_current_thread() {
    let tid = gettid();
    let mut r = registry();
    let before = r.threads.len();
    r.threads.retain(|t| *t != tid);
    if r.threads.len() != before {
        r.cached = None;
    }
}

/// Makes every later child confined, hiding `hide` (see the module's documentation).
pub fn enable_confinement(hide: Vec<PathBuf>) {
    let mut r = registry();
    r.confine = Some(hide);
    r.cached = None;
}

/// Whether the filter can be built on this architecture.
pub fn filter_supported() -> bool {
    AUDIT_ARCH.is_some()
}

/// What the next child applies.
pub fn current() -> io::Result<Arc<Prepared>> {
    let mut r = registry();
    if let Some(p) = &r.cached {
        return Ok(p.clone());
    }
    let me = std::process::id() as i32;
    // SAFETY: getpgrp cannot fail.
    let pgid = unsafe { libc::getpgrp() };
    let mut protected = vec![me, -me, 1, -1];
    if pgid > 1 && pgid != me {
        protected.push(-pgid);
    }
    for t in &r.threads {
        if !protected.contains(t) {
            protected.push(*t);
        }
    }
    let confine = match &r.confine {
        None => None,
        Some(dirs) => Some(Confinement {
            hide: dirs
                .iter()
                .map(|d| {
                    CString::new(d.as_os_str().as_bytes()).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{} contains a NUL byte", d.display()),
                        )
                    })
                })
                .collect::<io::Result<_>>()?,
        }),
    };
    let p = Arc::new(Prepared {
        filter: AUDIT_ARCH.map(|arch| filter_program(arch, me, &protected)),
        confine,
    });
    r.cached = Some(p.clone());
    Ok(p)
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

/// Offsets in `struct seccomp_data`: nr, arch, then six 64-bit arguments after `ip`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of argument `i`: pid_t and int arguments are compared as 32 bits, so
/// `kill(0xffffffff00000001)` cannot slip past a rule for 1.
fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i + if cfg!(target_endian = "big") { 4 } else { 0 }
}

const F_SETOWN_EX: u32 = 15;
const FIOSETOWN: u32 = 0x8901;
const SIOCSPGRP: u32 = 0x8902;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Dispatch,
    Pid,
    Tgid,
    Fcntl,
    Owner,
    Ioctl,
    Deny,
    NoSys,
}

enum Op {
    Load(u32),
    Ret(u32),
    /// `if A <cmp> k goto label`, else the next instruction.
    JumpIf(u16, u32, Label),
    At(Label),
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Assembles `ops`: each conditional jump becomes `j<cmp> k, 0, 1` followed by an
/// unconditional `ja` (32-bit offset), so no target is ever out of a u8 jump's reach.
fn assemble(ops: &[Op]) -> Vec<libc::sock_filter> {
    let mut labels: Vec<(Label, usize)> = Vec::new();
    let mut pos = 0usize;
    for op in ops {
        match op {
            Op::At(l) => labels.push((*l, pos)),
            Op::JumpIf(..) => pos += 2,
            _ => pos += 1,
        }
    }
    let target = |l: Label| labels.iter().find(|(x, _)| *x == l).map_or(0, |(_, p)| *p);
    let mut out = Vec::with_capacity(pos);
    for op in ops {
        match op {
            Op::Load(off) => out.push(stmt(
                (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                *off,
            )),
            Op::Ret(v) => out.push(stmt((libc::BPF_RET | libc::BPF_K) as u16, *v)),
            Op::JumpIf(cmp, k, l) => {
                out.push(libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_K) as u16 | *cmp,
                    jt: 0,
                    jf: 1,
                    k: *k,
                });
                let next = out.len() + 1;
                out.push(stmt(
                    (libc::BPF_JMP | libc::BPF_JA) as u16,
                    (target(*l) - next) as u32,
                ));
            }
            Op::At(_) => {}
        }
    }
    out
}

fn filter_program(arch: u32, me: i32, protected: &[i32]) -> Vec<libc::sock_filter> {
    use Label::*;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
    let allow = libc::SECCOMP_RET_ALLOW;
    let eq = libc::BPF_JEQ as u16;
    let mut ops = vec![
        Op::Load(OFF_ARCH),
        Op::JumpIf(eq, arch, Dispatch),
        // A system call of another ABI (i386 through int 0x80) has other numbers: refused
        // as a whole rather than let `kill` through under a number not checked here.
        Op::Ret(errno(libc::EPERM)),
        Op::At(Dispatch),
        Op::Load(OFF_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        // The x32 ABI: same architecture, numbers with bit 30 set.
        ops.push(Op::JumpIf(libc::BPF_JGE as u16, 0x4000_0000, Deny));
    }
    for (n, l) in [
        (libc::SYS_kill, Pid),
        (libc::SYS_rt_sigqueueinfo, Pid),
        (libc::SYS_pidfd_open, Pid),
        (libc::SYS_tgkill, Tgid),
        (libc::SYS_rt_tgsigqueueinfo, Tgid),
        // A thread id alone cannot be told apart from one of the agent's own.
        (libc::SYS_tkill, Deny),
        (libc::SYS_ptrace, Deny),
        (libc::SYS_process_vm_writev, Deny),
        // Takes a pidfd or a /proc/<pid> directory fd, which a filter cannot look into;
        // ENOSYS makes libraries (Go's os, util-linux) fall back to kill(2).
        (libc::SYS_pidfd_send_signal, NoSys),
        // F_SETOWN / FIOSETOWN pick who gets SIGIO (or, with F_SETSIG, any signal) when
        // the fd becomes ready: a signal sent by the kernel on the command's behalf.
        (libc::SYS_fcntl, Fcntl),
        (libc::SYS_ioctl, Ioctl),
    ] {
        ops.push(Op::JumpIf(eq, n as u32, l));
    }
    ops.push(Op::Ret(allow));
    ops.push(Op::At(Pid));
    ops.push(Op::Load(off_arg_lo(0)));
    ops.extend(protected.iter().map(|v| Op::JumpIf(eq, *v as u32, Deny)));
    ops.push(Op::Ret(allow));
    ops.extend([
        Op::At(Tgid),
        Op::Load(off_arg_lo(0)),
        Op::JumpIf(eq, me as u32, Deny),
        Op::JumpIf(eq, 1, Deny),
        Op::Ret(allow),
        Op::At(Fcntl),
        Op::Load(off_arg_lo(1)),
        Op::JumpIf(eq, F_SETOWN_EX, Deny),
        Op::JumpIf(eq, libc::F_SETOWN as u32, Owner),
        Op::Ret(allow),
        Op::At(Owner),
        Op::Load(off_arg_lo(2)),
    ]);
    ops.extend(protected.iter().map(|v| Op::JumpIf(eq, *v as u32, Deny)));
    ops.extend([
        Op::Ret(allow),
        Op::At(Ioctl),
        Op::Load(off_arg_lo(1)),
        Op::JumpIf(eq, FIOSETOWN, Deny),
        Op::JumpIf(eq, SIOCSPGRP, Deny),
        Op::Ret(allow),
        Op::At(Deny),
        Op::Ret(errno(libc::EPERM)),
        Op::At(NoSys),
        Op::Ret(errno(libc::ENOSYS)),
    ]);
    assemble(&ops)
}

/// Applies `p` in a child between fork (or vfork-like clone) and exec. Only system calls:
/// no allocation, no locks. Returns 0 or the errno of the step that failed.
///
/// # Safety
/// Must be called in a freshly started child that is about to `exec`; it changes the
/// calling thread's mount namespace, capabilities and seccomp filter for good.
pub unsafe fn apply(p: &Prepared) -> libc::c_int {
    // SAFETY: raw system calls on data prepared by the parent.
    unsafe {
        if let Some(c) = &p.confine {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return errno();
            }
            // Without this the tmpfs mounts could propagate back to the sidecar's namespace.
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return errno();
            }
            for dir in &c.hide {
                if libc::mount(
                    c"none".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=4k,mode=000".as_ptr().cast(),
                ) != 0
                {
                    return errno();
                }
            }
            // Without CAP_SYS_ADMIN the command cannot unmount the covers; the bounding set
            // keeps exec (of a uid-0 program) from granting capabilities back.
            let mut cap = 0;
            while libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) == 0 {
                cap += 1;
            }
            if cap == 0 {
                return errno();
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return errno();
            }
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0 {
                return errno();
            }
        }
        if let Some(f) = &p.filter {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                return errno();
            }
            let prog = libc::sock_fprog {
                len: f.len() as libc::c_ushort,
                filter: f.as_ptr().cast_mut(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &raw const prog,
                0,
                0,
            ) != 0
            {
                return errno();
            }
        }
    }
    0
}

fn errno() -> libc::c_int {
    // SAFETY: reading the calling thread's errno.
    unsafe { (*libc::__errno_location()).max(1) }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// An anonymous in-memory file holding `content` (close-on-exec; give it to a child with
/// [`crate::child::CommandSpec::inherit_fd`]). Scripts the sidecar runs travel this way
/// rather than through its state directory, which confined commands cannot see and
/// unconfined ones could rewrite between write and exec.
pub fn memfd_with(name: &std::ffi::CStr, content: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    use std::io::Write as _;
    use std::os::fd::FromRawFd as _;
    // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(content)?;
    Ok(f.into())
}

/// Replaces the whole content of the in-memory file `fd`.
pub fn memfd_replace(fd: &std::os::fd::OwnedFd, content: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::from(fd.try_clone()?);
    f.set_len(0)?;
    f.write_all_at(content, 0)
}

/// The directory holding `file`, refused when that is `/` (hiding it would hide everything).
pub fn parent_to_hide(file: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(file).ok()?;
    let parent = abs.parent()?;
    (parent != Path::new("/")).then(|| parent.to_path_buf())
}

static ONCE_WARNED: OnceLock<()> = OnceLock::new();

/// Logs once when the filter cannot be used here.
pub fn warn_if_unsupported() {
    if !filter_supported() {
        ONCE_WARNED.get_or_init(|| {
            tracing::warn!(
                arch = std::env::consts::ARCH,
                "no seccomp filter for this architecture: commands can signal the sidecar"
            );
        });
    }
}
