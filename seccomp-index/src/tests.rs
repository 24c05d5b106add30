// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};

use super::verify::{against_seccompiler, run, VerifyError};
use super::*;

const X32: u32 = X32_SYSCALL_BIT;

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).unwrap()
}

fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).unwrap()
}

/// A deny list of this crate's own (the jail's real one is checked by the
/// reflector's tests): calls denied outright, clone denied when any of
/// some flags is set, setns unless its type is a network namespace.
fn deny_list() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_init_module,
        libc::SYS_kexec_load,
        libc::SYS_reboot,
        libc::SYS_mount,
        libc::SYS_unshare,
        libc::SYS_io_uring_setup,
        libc::SYS_open_by_handle_at,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    let flags = [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWPID].map(|flag| {
        let flag = flag as u64;
        rule(vec![condition(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)])
    });
    rules.insert(libc::SYS_clone, flags.to_vec());
    let not_network = condition(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::CLONE_NEWNET as u64);
    rules.insert(libc::SYS_setns, vec![rule(vec![not_network])]);
    rules
}

/// An allow list of this crate's own (the vmm's real ones are checked by
/// its tests): plain calls, mmap without PROT_EXEC, ioctl with two
/// requests, and a call whose one rule ANDs comparisons of every kind,
/// 32- and 64-bit.
fn allow_list() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_poll,
        libc::SYS_epoll_wait,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    let exec = libc::PROT_EXEC as u64;
    rules.insert(
        libc::SYS_mmap,
        vec![rule(vec![condition(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0)])],
    );
    let request = |value| rule(vec![condition(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)]);
    rules.insert(libc::SYS_ioctl, vec![request(0xae80), request(0x8090_ae81)]);
    let every_kind = rule(vec![
        condition(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Ge, 0x1_0000_0000),
        condition(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Lt, 0x2_0000_0005),
        condition(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Gt, 7),
        condition(3, SeccompCmpArgLen::Dword, SeccompCmpOp::Le, 9),
        condition(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, 0xffff_ffff_0000_0001),
        condition(5, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(0xff00_0000_0000_00ff), 0x0100_0000_0000_0001),
    ]);
    rules.insert(libc::SYS_fcntl, vec![every_kind]);
    rules
}

#[test]
fn a_deny_list_behind_the_index_answers_every_call_as_seccompilers_own() {
    let eperm = || SeccompAction::Errno(libc::EPERM as u32);
    against_seccompiler(deny_list(), SeccompAction::Allow, eperm(), &[]).unwrap();
    let checked = against_seccompiler(
        deny_list(),
        SeccompAction::Allow,
        eperm(),
        &[Early::From(X32, eperm()), Early::Call(libc::SYS_clone3, SeccompAction::Errno(libc::ENOSYS as u32))],
    )
    .unwrap();
    // Past 2,000 numbers, each under six architecture values.
    assert!(checked.calls > 12_000, "{checked:?}");
}

#[test]
fn an_allow_list_behind_the_index_answers_every_call_as_seccompilers_own() {
    against_seccompiler(allow_list(), SeccompAction::KillProcess, SeccompAction::Allow, &[]).unwrap();
    against_seccompiler(BTreeMap::new(), SeccompAction::KillProcess, SeccompAction::Allow, &[]).unwrap();
    let one = [(libc::SYS_read, Vec::new())].into_iter().collect();
    against_seccompiler(one, SeccompAction::KillProcess, SeccompAction::Allow, &[]).unwrap();
}

#[test]
fn the_comparison_sees_a_program_that_answers_one_call_wrongly() {
    let rules = allow_list();
    let plain: BpfProgram =
        SeccompFilter::new(rules.clone(), SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
            .unwrap()
            .try_into()
            .unwrap();
    let listed: BTreeSet<u32> = rules.keys().map(|call| *call as u32).collect();
    let mut indexed = compile(rules, SeccompAction::KillProcess, SeccompAction::Allow, &[]).unwrap();
    verify::compare(&plain, &indexed, &listed, &[]).unwrap();
    // The fcntl rule's "matched": only one argument set in hundreds takes it.
    let (answer, _) = run(&indexed, libc::SYS_fcntl as u32, AUDIT_ARCH_X86_64, [0; 6]).unwrap();
    assert_eq!(answer, libc::SECCOMP_RET_KILL_PROCESS);
    let allow = u32::from(SeccompAction::Allow);
    let fcntl = indexed.iter().position(|insn| insn.code == JUMP_IF_EQUAL && insn.k == libc::SYS_fcntl as u32).unwrap();
    let answer =
        fcntl + indexed[fcntl + 1..].iter().position(|insn| insn.code == RETURN && insn.k == allow).unwrap() + 1;
    indexed[answer].k = libc::SECCOMP_RET_KILL_PROCESS;
    assert!(
        matches!(verify::compare(&plain, &indexed, &listed, &[]), Err(VerifyError::Differs { number, .. }) if number == libc::SYS_fcntl as u32)
    );
    // And one that jumps out of itself.
    indexed[answer].code = JUMP_IF_EQUAL;
    indexed[answer].jt = 255;
    assert!(matches!(verify::compare(&plain, &indexed, &listed, &[]), Err(VerifyError::Program { .. })));
}

#[test]
fn a_call_the_list_does_not_name_is_answered_in_a_handful_of_steps() {
    // 30 listed calls: a chain walks 60 instructions past them all; the
    // index, about log2(30) comparisons.
    let rules: BTreeMap<i64, Vec<SeccompRule>> = (100..130).map(|call| (call, Vec::new())).collect();
    let indexed = compile(rules, SeccompAction::Allow, SeccompAction::Errno(1), &[]).unwrap();
    let longest = (0..600)
        .filter(|number| !(100..130).contains(number))
        .map(|number| run(&indexed, number, AUDIT_ARCH_X86_64, [0; 6]).unwrap().1)
        .max()
        .unwrap();
    // The architecture (2), the number (1), five levels, a last test and
    // its return.
    assert!(longest <= 10, "an unlisted call ran {longest} instructions");
}

#[test]
fn numbers_that_are_not_system_calls_are_refused() {
    let rules = [(-1, Vec::new())].into_iter().collect();
    assert!(matches!(compile(rules, SeccompAction::Allow, SeccompAction::Errno(1), &[]), Err(IndexError::Number(-1))));
    let early = [Early::Call(1 << 40, SeccompAction::Allow)];
    assert!(matches!(
        compile(BTreeMap::new(), SeccompAction::Allow, SeccompAction::Errno(1), &early),
        Err(IndexError::Number(_))
    ));
}

#[test]
fn programs_classic_bpf_cannot_hold_are_refused_and_say_why() {
    let deny = || (SeccompAction::Allow, SeccompAction::Errno(1));
    // Calls without rules: two instructions each and a test per level.
    let calls = |n: i64| -> BTreeMap<i64, Vec<SeccompRule>> { (0..n).map(|call| (call, Vec::new())).collect() };
    let (allow, errno) = deny();
    let fits = compile(calls(120), allow, errno, &[]).unwrap();
    assert!(fits.len() < MAX_PROGRAM);
    let (allow, errno) = deny();
    let error = compile(calls(200), allow, errno, &[]).unwrap_err();
    assert!(matches!(error, IndexError::TooMany { calls: 100, .. }), "{error}");
    // One call with more rules than a jump passes.
    let ge = |value| rule(vec![condition(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)]);
    let long: BTreeMap<i64, Vec<SeccompRule>> = [(7, (0..40).map(ge).collect())].into_iter().collect();
    let (allow, errno) = deny();
    let error = compile(long, allow, errno, &[]).unwrap_err();
    assert!(matches!(error, IndexError::CallTooLong { call: 7, .. }), "{error}");
    // Early answers without bound: longer than the kernel takes.
    let early: Vec<Early> = (0..2100).map(|call| Early::Call(call, SeccompAction::Errno(2))).collect();
    let (allow, errno) = deny();
    let error = compile(BTreeMap::new(), allow, errno, &early).unwrap_err();
    assert!(matches!(error, IndexError::TooLong(4205)), "{error}");
}

#[test]
fn the_kernel_takes_the_program_and_answers_by_it() {
    let rules = [(libc::SYS_getppid, Vec::new())].into_iter().collect();
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let program = compile(rules, SeccompAction::Allow, eperm.clone(), &[Early::From(X32, eperm)]).unwrap();
    let errno =
        |value: libc::c_long| if value < 0 { std::io::Error::last_os_error().raw_os_error().unwrap() } else { 0 };
    // seccompiler's apply_filter binds the calling thread only.
    let (ppid, pid, x32) = std::thread::spawn(move || {
        seccompiler::apply_filter(&program).unwrap();
        // SAFETY: getppid(2) and getpid(2) have no arguments and no
        // effect; the x32 number of getpid likewise (ENOSYS without x32).
        unsafe {
            (
                errno(libc::syscall(libc::SYS_getppid)),
                errno(libc::syscall(libc::SYS_getpid)),
                errno(libc::syscall(libc::c_long::from(X32) | libc::SYS_getpid)),
            )
        }
    })
    .join()
    .unwrap();
    assert_eq!((ppid, pid, x32), (libc::EPERM, 0, libc::EPERM));
}
