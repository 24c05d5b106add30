//! The jail's seccomp filters: the calls no part of the project makes
//! ([`NEVER`], denied to the reflector and every vmm), and what only a
//! jailed vmm may not do ([`JAIL_ONLY`]). These are deny lists, installed
//! before exec so that they bind whatever binary runs; the vmm adds its own
//! per-thread allow lists once its VM is built (`vmm/src/seccomp.rs`).

use super::JailError;

/// System calls neither the reflector nor a vmm makes, and a compromised
/// one would want: tracing and reading other processes, BPF, perf,
/// userfaultfd, keyrings, kernel modules, kexec, reboot, swap, file handles.
const NEVER: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_setns,
];

/// What a vmm may not do besides [`NEVER`]: build namespaces and mounts
/// (the reflector needs these to build jails, so only the jail denies them).
const JAIL_ONLY: &[libc::c_long] =
    &[libc::SYS_unshare, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_chroot];

/// Confines the reflector process (all its threads, and children before
/// their own jail adds more): [`NEVER`] fails with EPERM. Call
/// once at start, before it starts threads.
pub fn confine_reflector() -> Result<(), JailError> {
    let fail = |e: &dyn std::fmt::Display| JailError::Io {
        what: "confining the reflector with seccomp".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let rules = NEVER.iter().map(|call| (*call, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(|e| fail(&e))?;
    let program = seccompiler::BpfProgram::try_from(filter).map_err(|e| fail(&e))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| fail(&e))
}

/// The outer filters: [`NEVER`], [`JAIL_ONLY`] and clone with any namespace flag fail
/// with EPERM; clone3 (whose flags sit in memory a filter cannot read) with
/// ENOSYS, so the C library falls back to clone. Two filters: the kernel
/// runs both and the stricter answer wins.
pub(super) fn outer_filters() -> Result<Vec<seccompiler::BpfProgram>, JailError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let fail = |e: &dyn std::fmt::Display| JailError::Io {
        what: "building the jail's seccomp filter".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let compile = |rules: std::collections::BTreeMap<i64, Vec<SeccompRule>>, errno: i32| {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            seccompiler::TargetArch::x86_64,
        )
        .map_err(|e| fail(&e))?;
        seccompiler::BpfProgram::try_from(filter).map_err(|e| fail(&e))
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        NEVER.iter().chain(JAIL_ONLY).map(|call| (*call, Vec::new())).collect();
    let namespaces = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    // A rule matches (and so denies) when its flag is set.
    let clone_rules = namespaces
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            let set = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
                .map_err(|e| fail(&e))?;
            SeccompRule::new(vec![set]).map_err(|e| fail(&e))
        })
        .collect::<Result<Vec<_>, JailError>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let clone3 = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok(vec![compile(rules, libc::EPERM)?, compile(clone3, libc::ENOSYS)?])
}
